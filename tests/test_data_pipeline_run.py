"""The data pipeline end to end (python -m train.data.pipeline) on the shipped raw sample: the planted
duplicates / spam / blocklisted / junk / bad records are removed at the expected steps and nothing else is;
in = kept + removed; the repository document is in import order; MinHash recall; Ray = local; resume after a kill."""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("datatrove")

from train.data.filters.code import javascript_imports, python_imports  # noqa: E402
from train.data.pipeline import STEPS, run_pipeline  # noqa: E402
from train.data.pipeline_config import load_pipeline_config, repo_path  # noqa: E402

SAMPLE = repo_path("train/data/sample")
CONFIG = repo_path("configs/data_pipeline.toml")

# Where each planted kind of train/data/sample/ is removed (kind -> step -> records); the clean kinds keep all.
EXPECTED_REMOVED = {
    "blocklisted": {"url": 3},                       # 2 on datatrove's shipped list, 1 on ours
    "spam": {"url": 2, "wordlist": 3},               # 2 on spam domains of our list, 3 by their words
    "unsafe": {"safety_classifier": 1},
    "low_quality": {"quality_classifier": 1},
    "junk": {"language": 2, "gopher_repetition": 5, "gopher_quality": 1},
    "exact_duplicate": {"exact_dedup": 3},
    "near_duplicate": {"minhash_dedup": 4},          # ~3% of words changed
}
CLEAN = {"technical": 20, "chinese": 6, "code": 9}
BAD_RECORDS = {"malformed_json": 1, "missing_text": 1, "text_not_string": 1, "undecodable_line": 1,
               "undecodable_file": 1}


def read_docs(folder):
    docs = []
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith(".jsonl.gz"):
                with gzip.open(os.path.join(root, name), "rt") as f:
                    docs += [json.loads(line) for line in f]
    return docs


def input_records() -> int:
    """Counted here independently of the pipeline: lines of the jsonl files, rows of the parquet file, and one
    record for the gzip file that cannot be decompressed."""
    import pyarrow.parquet as pq

    n = 0
    for root, _, files in os.walk(SAMPLE):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".parquet"):
                n += pq.read_metadata(path).num_rows
            elif name.endswith(".gz"):
                try:
                    n += sum(1 for line in gzip.open(path) if line.strip())
                except (OSError, EOFError):
                    n += 1
            else:
                n += sum(1 for line in open(path, "rb") if line.strip())
    return n


def light_config(tmp_path, tasks=2):
    """The shipped config without datatrove's 4.5M-domain list (13 s to load per process) and with 4 MinHash
    bands instead of 20 (a Ray task each): for the runs that compare executors and resumption, not filtering.
    Returns the config and the path of its TOML file (for the command line)."""
    text = open(CONFIG).read()
    for key, value in [("datatrove_list", "false"), ("num_buckets", "4"), ("tasks", str(tasks))]:
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, key
    path = tmp_path / "light.toml"
    path.write_text(text)
    return load_pipeline_config(str(path)), str(path)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "out"
    cfg = load_pipeline_config(CONFIG)
    cfg.run = dataclasses.replace(cfg.run, tasks=2)
    stats = run_pipeline(SAMPLE, str(out), cfg)
    return out, stats


def test_planted_documents_removed_and_nothing_else(sample_run):
    out, stats = sample_run
    by_kind = stats["by_kind"]
    for kind, steps in EXPECTED_REMOVED.items():
        assert by_kind[kind]["removed"] == steps, kind
        assert by_kind[kind]["kept"] == 0, kind
    for kind, n in CLEAN.items():
        assert by_kind[kind] == {"in": n, "kept": n, "removed": {}, "kept_fraction": 1.0}, kind
    assert {r: v["docs"] for r, v in stats["steps"]["read"]["removed"].items()} == BAD_RECORDS
    kept = read_docs(out / "kept")
    assert {d["metadata"]["kind"] for d in kept} == set(CLEAN)
    removed = {s: read_docs(out / "removed" / s) for s in STEPS}
    for step, docs in removed.items():   # every removed document says why
        assert all(d["metadata"].get("filter_reason") or step.endswith("dedup") for d in docs), step


def test_in_equals_kept_plus_removed(sample_run):
    out, stats = sample_run
    n_in = input_records()
    kept = sum(d["metadata"].get("n_inputs", 1) for d in read_docs(out / "kept"))
    removed = sum(len(read_docs(out / "removed" / s)) for s in STEPS)
    assert n_in == stats["documents_in"] == kept + removed
    assert stats["check"] == {"inputs_in": n_in, "inputs_kept": kept, "inputs_removed": removed, "balanced": True,
                              "removed_files_match_tallies": True}
    for step, s in stats["steps"].items():   # each step: in = out + removed, in records (and documents, except
        for unit in ("docs", "inputs") if step != "code_join" else ("inputs",):   # where files become one)
            assert s["in"][unit] == s["out"][unit] + sum(r[unit] for r in s["removed"].values()), (step, unit)
    # the code join turns 9 file records into one document and keeps them all
    assert stats["steps"]["code_join"]["in"]["docs"] == 9 and stats["steps"]["code_join"]["out"]["docs"] == 1
    assert stats["steps"]["code_join"]["out"]["inputs"] == 9


def test_repository_document_in_import_order(sample_run):
    out, _ = sample_run
    (repo,) = [d for d in read_docs(out / "kept") if d["id"].startswith("repo:")]
    files = re.findall(r'<file path="([^"]+)">\n(.*?)\n</file>', repo["text"], flags=re.S)
    assert [p for p, _ in files] == repo["metadata"]["files"] and len(files) == 9
    paths = {p for p, _ in files}
    seen = set()
    n_edges = 0
    for path, text in files:
        deps = python_imports(path, text, paths) if path.endswith(".py") else javascript_imports(path, text, paths)
        assert deps <= seen, (path, deps - seen)
        n_edges += len(deps)
        seen.add(path)
    assert n_edges >= 8   # the sample repository has real dependencies to order (python and javascript)


def test_long_context_set(sample_run):
    out, stats = sample_run
    lc = stats["long_context"]
    assert lc["perplexity"].startswith("skipped")
    chosen = read_docs(out / "long_context")
    assert len(chosen) == lc["selected"]["docs"] >= 1
    assert all(len(d["text"]) >= lc["min_chars"] for d in chosen)
    kept_long = [d for d in read_docs(out / "kept") if len(d["text"]) >= lc["min_chars"]]
    assert sorted(d["id"] for d in chosen) == sorted(d["id"] for d in kept_long)


def test_minhash_recall_on_three_percent_edits(tmp_path):
    """40 documents of 300 words and a copy of each with 3% of the words replaced, through datatrove's four
    MinHash stages with our configured bands: >= 90% of the copies removed, one survivor per pair."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    d = load_pipeline_config(CONFIG).dedup
    vocab = sorted({w for doc in read_docs_jsonl(os.path.join(SAMPLE, "web.jsonl")) for w in doc["text"].split()})
    rng = random.Random(0)
    rows = []
    for i in range(40):
        words = [rng.choice(vocab) for _ in range(300)]
        rows.append({"id": f"orig-{i}", "text": " ".join(words)})
        for j in rng.sample(range(300), 9):
            words[j] = rng.choice(vocab)
        rows.append({"id": f"copy-{i}", "text": " ".join(words)})
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mh = MinhashConfig(n_grams=d.n_grams, num_buckets=d.num_buckets, hashes_per_bucket=d.hashes_per_bucket)
    w = tmp_path / "work"
    stages = [([JsonlReader(str(tmp_path / "in")), MinhashDedupSignature(str(w / "sigs"), config=mh)], 1),
              ([MinhashDedupBuckets(str(w / "sigs"), str(w / "buckets"), config=mh)], mh.num_buckets),
              ([MinhashDedupCluster(str(w / "buckets"), str(w / "ids"), config=mh)], 1),
              ([JsonlReader(str(tmp_path / "in")), MinhashDedupFilter(str(w / "ids")),
                JsonlWriter(str(tmp_path / "kept"))], 1)]
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(w / f"logs{i}")).run()
    kept = {r["id"] for r in read_docs(tmp_path / "kept")}
    pairs_merged = sum(1 for i in range(40) if (f"orig-{i}" in kept) != (f"copy-{i}" in kept))
    assert all(f"orig-{i}" in kept or f"copy-{i}" in kept for i in range(40))   # one survivor per pair
    assert pairs_merged / 40 >= 0.9


def read_docs_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def light_local(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("light")
    cfg, _ = light_config(tmp)
    run_pipeline(SAMPLE, str(tmp / "out"), cfg)
    return tmp / "out"


def _result(out):
    kept = sorted((d["id"], d["text"]) for d in read_docs(out / "kept"))
    removed = {s: sorted(d["id"] for d in read_docs(out / "removed" / s)) for s in STEPS}
    return kept, removed


@pytest.mark.slow
def test_ray_executor_same_as_local(light_local, tmp_path):
    ray = pytest.importorskip("ray")
    cfg, _ = light_config(tmp_path)
    cfg.run = dataclasses.replace(cfg.run, executor="ray", workers=2)
    # The local run's classifiers: fastText's training is not bit-reproducible (train/data/filters/classifier.py),
    # so two trainings can put a document near a threshold on either side; this test compares executors.
    shutil.copytree(light_local / "work" / "models", tmp_path / "ray" / "work" / "models")
    try:
        stats = run_pipeline(SAMPLE, str(tmp_path / "ray"), cfg)
    finally:
        ray.shutdown()
    assert stats["check"]["balanced"]
    assert _result(tmp_path / "ray") == _result(light_local)


@pytest.mark.slow
def test_killed_run_resumes_from_completed_tasks(light_local, tmp_path):
    _, config = light_config(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "train.data.pipeline", "--input", SAMPLE, "--output", str(out), "--config", config]
    proc = subprocess.Popen(cmd, cwd=repo_path("."), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = out / "logs" / "filter" / "completions" / "00000"
    try:
        deadline = time.monotonic() + 300
        while not done.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done.exists(), "the first task never completed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "stats.json").exists()    # killed before the end
    tally0 = out / "work" / "tally" / "read" / "00000.json"
    before = tally0.stat().st_mtime_ns
    cfg, _ = light_config(tmp_path)
    stats = run_pipeline(SAMPLE, str(out), cfg)
    assert tally0.stat().st_mtime_ns == before   # the completed task was not run again
    assert stats["check"]["balanced"]
    assert _result(out) == _result(light_local)
