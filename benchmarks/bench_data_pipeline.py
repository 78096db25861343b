"""The data pipeline (train.data.pipeline): documents/s per core, whole pipeline and per step, ours on the local and
the Ray executor, beside plain datatrove running the same datatrove steps in the same run.

Corpora: the shipped sample (train/data/sample, 65 records) and a generated corpus of ``DATA_BENCH_DOCS`` documents
(default 2,000 for the shared 2-core machine; ``DATA_BENCH_DOCS=100000`` for the issue's size): paragraphs of the
sample's clean documents recombined, with near-duplicates (3% of words changed), exact copies, spam and junk mixed
in (generate_corpus). ``DATA_BENCH_RAY=0`` leaves Ray out.

Peer ("datatrove"): datatrove's own components with the thresholds of configs/data_pipeline.toml: JsonlReader ->
URLFilter (datatrove's list) -> GopherRepetition -> GopherQuality -> C4Quality -> FineWebQuality -> exact dedup
(3 stages) -> MinHash (4 stages) -> JsonlWriter. Ours runs those same steps plus normalisation, language ID, the word
list, both fastText classifiers, the code join, the accounting and the long-context stage. The per-step rows
compare the shared datatrove steps (inside our FilterStep wrapper vs bare): the wrapper must not slow them down.
PEER_ON_SAMPLE: datatrove's JsonlReader cannot read the sample's parquet code file and stops at its broken files,
and its URLFilter asserts on a document without a URL, so on the sample the peer reads the 50 records of
web.jsonl and zh.jsonl.gz.

docs/s per core = input records / wall seconds / cores used (local: workers=1, one core; Ray: 2 workers on the
2 cores). Per-step figures are docs in / seconds inside the step (datatrove's per-step timers), one core.
Run: ``DATA_BENCH_DOCS=2000 python -m pytest -q benchmarks/bench_data_pipeline.py -s``; the table is printed and
stored in each test's extra_info.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import re
import shutil
import time

import pytest

pytest.importorskip("datatrove")

from benchmarks.common import card_name  # noqa: E402
from train.data.pipeline import run_pipeline, text_of  # noqa: E402
from train.data.pipeline_config import load_pipeline_config, repo_path  # noqa: E402

SAMPLE = repo_path("train/data/sample")
CONFIG = repo_path("configs/data_pipeline.toml")
N_DOCS = int(os.environ.get("DATA_BENCH_DOCS", "2000"))
WITH_RAY = os.environ.get("DATA_BENCH_RAY", "1") != "0"
SHARED_STEPS = ["gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"]
ROWS: list[dict] = []


def generate_corpus(path: str, n: int, seed: int = 0) -> None:
    """``n`` documents made from the sample's paragraphs: 80% recombined clean documents (4-8 paragraphs of one
    language), 8% near-duplicates of earlier ones (3% of words changed), 4% exact copies, 4% spam, 4% junk."""
    rng = random.Random(seed)
    web = [json.loads(line) for line in open(os.path.join(SAMPLE, "web.jsonl"))]
    zh = [json.loads(line) for line in gzip.open(os.path.join(SAMPLE, "zh.jsonl.gz"))]
    paras = {"en": [p for d in web if d["kind"] == "technical" for p in d["text"].split("\n\n")],
             "zh": [p for d in zh if d["kind"] == "chinese" for p in d["text"].split("\n\n")]}
    spam = [d["text"] for d in web if d["kind"] == "spam"]
    junk = [d["text"] for d in web if d["kind"] == "junk"]
    made: list[str] = []
    with open(path, "w") as f:
        for i in range(n):
            r = rng.random()
            if r < 0.08 and made:
                words = rng.choice(made).split(" ")
                for j in rng.sample(range(len(words)), max(1, len(words) * 3 // 100)):
                    words[j] = rng.choice(["the", "value", "method", "result", "data"])
                text = " ".join(words)
            elif r < 0.12 and made:
                text = rng.choice(made)
            elif r < 0.16:
                text = rng.choice(spam)
            elif r < 0.20:
                text = rng.choice(junk)
            else:
                lang = "zh" if rng.random() < 0.2 else "en"
                text = "\n\n".join(rng.sample(paras[lang], min(len(paras[lang]), rng.randint(4, 8))))
                made.append(text)
            f.write(json.dumps({"id": f"gen-{i}", "url": f"https://site{i % 97}.example.org/p/{i}", "text": text},
                               ensure_ascii=False) + "\n")


def plain_datatrove(input_dir: str, out: str, cfg) -> float:
    """datatrove's own steps with our thresholds, on the local executor, one worker; returns wall seconds."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        URLFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from tldextract import TLDExtract

    url = URLFilter()
    url.tldextractor = TLDExtract(suffix_list_urls=())
    gr, gq, c4, fw = cfg.gopher_repetition, cfg.gopher_quality, cfg.c4_quality, cfg.fineweb_quality
    filters = [url,
               GopherRepetitionFilter(gr.dup_line_frac, gr.dup_para_frac, gr.dup_line_char_frac, gr.dup_para_char_frac,
                                      tuple((int(n), f) for n, f in gr.top_n_grams),
                                      tuple((int(n), f) for n, f in gr.dup_n_grams)),
               GopherQualityFilter(gq.min_doc_words, gq.max_doc_words, gq.min_avg_word_length, gq.max_avg_word_length,
                                   gq.max_symbol_word_ratio, gq.max_bullet_lines_ratio, gq.max_ellipsis_lines_ratio,
                                   gq.max_non_alpha_words_ratio, gq.min_stop_words),
               C4QualityFilter(filter_no_terminal_punct=c4.filter_no_terminal_punct,
                               min_num_sentences=c4.min_num_sentences, filter_curly_bracket=c4.filter_curly_bracket),
               FineWebQualityFilter(line_punct_thr=fw.line_punct_thr, short_line_thr=fw.short_line_thr,
                                    char_duplicates_ratio=fw.char_duplicates_ratio, new_line_ratio=fw.new_line_ratio)]
    ex = ExactDedupConfig(content_getter=text_of)
    mh = MinhashConfig(n_grams=cfg.dedup.n_grams, num_buckets=cfg.dedup.num_buckets,
                       hashes_per_bucket=cfg.dedup.hashes_per_bucket)
    w = os.path.join(out, "work")
    stages = [
        ([JsonlReader(input_dir, glob_pattern="*.jsonl*"), *filters, JsonlWriter(os.path.join(w, "filtered"))], 1),
        ([JsonlReader(os.path.join(w, "filtered")), ExactDedupSignature(os.path.join(w, "esig"), ex)], 1),
        ([ExactFindDedups(os.path.join(w, "esig"), os.path.join(w, "edup"), config=ex)], 1),
        ([JsonlReader(os.path.join(w, "filtered")), ExactDedupFilter(os.path.join(w, "edup"), ex),
          JsonlWriter(os.path.join(w, "exact"))], 1),
        ([JsonlReader(os.path.join(w, "exact")), MinhashDedupSignature(os.path.join(w, "msig"), config=mh)], 1),
        ([MinhashDedupBuckets(os.path.join(w, "msig"), os.path.join(w, "mbuck"), config=mh)], mh.num_buckets),
        ([MinhashDedupCluster(os.path.join(w, "mbuck"), os.path.join(w, "mids"), config=mh)], 1),
        ([JsonlReader(os.path.join(w, "exact")), MinhashDedupFilter(os.path.join(w, "mids")),
          JsonlWriter(os.path.join(out, "kept"))], 1),
    ]
    start = time.perf_counter()
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=os.path.join(out, "logs", str(i))).run()
    return time.perf_counter() - start


def step_seconds(logs: str) -> dict[str, float]:
    """Seconds inside each step of a stage (datatrove's per-step timers, summed over tasks), by step name."""
    with open(os.path.join(logs, "stats.json")) as f:
        stats = json.load(f)
    return {s["name"]: s["time_stats"]["total"] for s in stats if isinstance(s.get("time_stats"), dict)}


def _key(name: str) -> str:
    """Our step names are "<step> (<Class>)"; datatrove's are "<type>: <emoji> <Name>"."""
    m = re.search(r"FILTER: (\w+) \(", name)
    if m:
        return m.group(1)
    for step, cls in [("gopher_repetition", "Gopher Repetition"), ("gopher_quality", "Gopher Quality"),
                      ("c4_quality", "C4 Quality"), ("fineweb_quality", "FineWeb Quality"), ("url", "Url-filter")]:
        if cls.lower() in name.lower():
            return step
    return name


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpora")
    (tmp / "generated").mkdir()
    generate_corpus(str(tmp / "generated" / "docs.jsonl"), N_DOCS)
    yield {"sample": (SAMPLE, 65), f"generated-{N_DOCS}": (str(tmp / "generated"), N_DOCS)}
    print("\n| corpus | impl | executor | docs | wall s | docs/s/core | per step docs/s (1 core) |")
    print("|---|---|---|---|---|---|---|")
    for r in ROWS:
        steps = ", ".join(f"{k} {v:.0f}" for k, v in r["per_step"].items())
        print(f"| {r['corpus']} | {r['impl']} | {r['executor']} | {r['docs']} | {r['seconds']:.1f} | "
              f"{r['docs_per_s_per_core']:.1f} | {steps} |")


def _record(benchmark, corpus, impl, executor, docs, seconds, cores, per_step):
    row = dict(corpus=corpus, impl=impl, executor=executor, docs=docs, seconds=seconds,
               docs_per_s_per_core=docs / seconds / cores, per_step=per_step)
    ROWS.append(row)
    benchmark.extra_info.update(group=f"data pipeline {corpus}", impl=f"{impl}-{executor}", metric="docs/s/core",
                                value=row["docs_per_s_per_core"], ms=seconds * 1e3, card=card_name(),
                                per_step=per_step)


CASES = [("sample", "ours", "local"), ("sample", "datatrove", "local"), ("sample", "ours", "ray"),
         ("generated", "ours", "local"), ("generated", "datatrove", "local")]


@pytest.mark.parametrize("corpus,impl,executor", CASES)
def test_data_pipeline(benchmark, corpora, tmp_path, corpus, impl, executor):
    if executor == "ray" and not WITH_RAY:
        pytest.skip("DATA_BENCH_RAY=0")
    name = corpus if corpus == "sample" else f"generated-{N_DOCS}"
    input_dir, docs = corpora[name]
    if impl == "datatrove" and corpus == "sample":
        docs = 50   # the peer reads web.jsonl and zh.jsonl.gz only (see PEER_ON_SAMPLE)
    cfg = load_pipeline_config(CONFIG)
    out = str(tmp_path / "out")
    per_step: dict[str, float] = {}
    seconds = 0.0

    def once():
        nonlocal seconds
        shutil.rmtree(out, ignore_errors=True)
        if impl == "datatrove":
            seconds = plain_datatrove(input_dir, out, cfg)
            return
        cfg.run = dataclasses.replace(cfg.run, executor=executor, tasks=2, workers=2 if executor == "ray" else 1)
        if executor == "ray":
            import ray

            try:
                start = time.perf_counter()
                run_pipeline(input_dir, out, cfg)
                seconds = time.perf_counter() - start
            finally:
                ray.shutdown()
        else:
            start = time.perf_counter()
            run_pipeline(input_dir, out, cfg)
            seconds = time.perf_counter() - start

    benchmark.pedantic(once, rounds=1, iterations=1)
    filter_logs = os.path.join(out, "logs", "0" if impl == "datatrove" else "filter")
    times = {_key(k): v for k, v in step_seconds(filter_logs).items()}
    counts = _step_docs(filter_logs)
    per_step = {s: counts[s] / times[s] for s in ["url"] + SHARED_STEPS if times.get(s) and counts.get(s)}
    cores = 2 if executor == "ray" else 1
    _record(benchmark, name, impl, executor, docs, seconds, cores, per_step)


def _step_docs(logs: str) -> dict[str, int]:
    """Documents each step of a stage examined (datatrove's counters: ``total`` of a bare filter, forwarded +
    dropped of our FilterStep, which counts only the documents the step applies to, as its timer does)."""
    with open(os.path.join(logs, "stats.json")) as f:
        stats = json.load(f)
    def n(v) -> int:   # a plain count, or (in a Ray run's merged stats) a summary with its total
        return int(v["total"] if isinstance(v, dict) else v)

    out = {}
    for s in stats:
        c = s.get("stats", {})
        out[_key(s["name"])] = n(c["total"]) if "total" in c else n(c.get("forwarded", 0)) + n(c.get("dropped", 0))
    return out
