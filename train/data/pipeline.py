"""Pretraining data pipeline (InternLM2 report §3.1) on datatrove.

    python -m train.data.pipeline --input DIR_OR_GLOB --output OUT [--executor local|ray] [--tasks N]
        [--workers N] [--config configs/data_pipeline.toml] [--ray-address ADDR]

Stages (each a datatrove executor run after the previous one; logs and completion markers under
``OUT/logs/<stage>/``, so a rerun with the same OUT skips the tasks that completed):

1. ``filter`` (tasks): read -> normalise -> language -> url -> wordlist -> safety_classifier -> gopher_repetition
   -> gopher_quality -> c4_quality -> fineweb_quality -> quality_classifier; code files (``repo`` + ``path`` with a
   supported extension) skip the prose steps after the safety lists and are routed to the join stage.
2. ``code_join`` (code.join_tasks): one document per repository, files in import order (train.data.filters.code).
3. exact dedup, datatrove's 3 stages (signature, find, filter); 4. MinHash-LSH, datatrove's 4 stages (signature,
   buckets with ``num_buckets`` tasks, cluster, filter) -> ``OUT/kept/``.
5. ``long_context``: long kept documents, perplexity-scored when a checkpoint is configured -> ``OUT/long_context/``.

Every removed document is in ``OUT/removed/<step>/`` with ``metadata.filter_reason``; ``OUT/stats.json`` has per step
the documents / bytes / input records in and out and removed per reason, the long-context selection, per-``kind``
retention when the input labels documents with ``kind``, and the check in = kept + sum(removed) (the run fails if it
does not hold).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
from collections import defaultdict

import orjson
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
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
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter

from train.data.filters.classifier import classifier_filter, train_classifier
from train.data.filters.code import CodeRouter, RepoJoiner, is_code
from train.data.filters.language import ScriptLanguageFilter
from train.data.filters.long_context import LongContextSelector, PerplexityScorer
from train.data.filters.normalise import Normaliser
from train.data.filters.reader import InputReader, split_input
from train.data.filters.safety import OfflineURLFilter, WordListFilter, read_terms
from train.data.filters.steps import TALLY_DIR, FilterStep, PassStep, removed_writer
from train.data.pipeline_config import PipelineConfig, for_language, load_pipeline_config, repo_path, validate

# The steps that remove documents, in pipeline order (their folders under OUT/removed/ and OUT/work/tally/).
FILTER_STEPS = ["read", "normalise", "language", "url", "wordlist", "safety_classifier", "gopher_repetition",
                "gopher_quality", "c4_quality", "fineweb_quality", "quality_classifier"]
STEPS = FILTER_STEPS + ["code_join", "exact_dedup", "minhash_dedup"]


class InputCheck(BaseFilter):
    """Removes the records the reader could not turn into documents, under the reader's reason."""
    name = "📥 input check"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        reason = doc.metadata.get("bad_input")
        return (False, reason) if reason else True


class ByLanguage(BaseFilter):
    """One filter per language (datatrove's word-based filters take their tokenizer from ``language``);
    documents of other languages pass."""
    name = "🌐 by language"

    def __init__(self, filters: dict[str, BaseFilter]):
        super().__init__()
        self.filters = filters

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        f = self.filters.get(doc.metadata.get("language"))
        return True if f is None else f.filter(doc)


class WorkReader(JsonlReader):
    """Reads the pipeline's own intermediate files; a folder a stage left empty (everything removed) is no error."""

    def __init__(self, folder: str):
        super().__init__(folder, glob_pattern="**/*.jsonl.gz", add_file_path=False)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if not self.data_folder.list_files(recursive=True, glob_pattern=self.glob_pattern):
            return
        yield from super().run(data, rank, world_size)


def text_of(doc: Document) -> str:
    """Exact dedup's content: the normalised text (a named function: datatrove reads its return annotation)."""
    return doc.text


def _per_language(section, make) -> ByLanguage:
    return ByLanguage({lang: make(lang, for_language(section, lang)) for lang in section.languages})


def filter_stage(cfg: PipelineConfig, folder: str, glob: str | None, out: str, models: dict[str, str]) -> list:
    work = os.path.join(out, "work")
    langs = tuple(cfg.code.languages)

    def prose(doc: Document) -> bool:
        return not is_code(doc, langs)

    steps = {
        "read": (InputCheck(), None, False),
        "normalise": (Normaliser(cfg.normalise.form, cfg.normalise.collapse_spaces, cfg.normalise.max_blank_lines,
                                 is_code=lambda doc: not prose(doc)), None, True),
        "language": (ScriptLanguageFilter(cfg.language.keep, cfg.language.zh_min_han, cfg.language.en_min_latin,
                                          cfg.language.min_letters), prose, True),
        "url": (OfflineURLFilter(read_terms(repo_path(cfg.url.extra_domains)) if cfg.url.extra_domains else None,
                                 cfg.url.soft_word_threshold, cfg.url.datatrove_list), None, False),
        "wordlist": (WordListFilter({lang: read_terms(repo_path(p)) for lang, p in cfg.wordlist.files.items()},
                                    cfg.wordlist.min_hits, cfg.wordlist.max_hits_per_kchar), None, False),
        "safety_classifier": (classifier_filter(models["safety_classifier"], cfg.safety_classifier.remove_label,
                                                cfg.safety_classifier.threshold), prose, False),
        "gopher_repetition": (_per_language(cfg.gopher_repetition, lambda lang, gr: GopherRepetitionFilter(
            gr.dup_line_frac, gr.dup_para_frac, gr.dup_line_char_frac, gr.dup_para_char_frac,
            tuple((int(n), f) for n, f in gr.top_n_grams), tuple((int(n), f) for n, f in gr.dup_n_grams),
            language=lang)), prose, False),
        "gopher_quality": (_per_language(cfg.gopher_quality, lambda lang, gq: GopherQualityFilter(
            gq.min_doc_words, gq.max_doc_words, gq.min_avg_word_length, gq.max_avg_word_length,
            gq.max_symbol_word_ratio, gq.max_bullet_lines_ratio, gq.max_ellipsis_lines_ratio,
            gq.max_non_alpha_words_ratio, gq.min_stop_words, language=lang)), prose, False),
        "c4_quality": (_per_language(cfg.c4_quality, lambda lang, c4: C4QualityFilter(
            filter_no_terminal_punct=c4.filter_no_terminal_punct, min_num_sentences=c4.min_num_sentences,
            min_words_per_line=c4.min_words_per_line, max_word_length=c4.max_word_length,
            filter_lorem_ipsum=c4.filter_lorem_ipsum, filter_javascript=c4.filter_javascript,
            filter_curly_bracket=c4.filter_curly_bracket, filter_policy=c4.filter_policy, language=lang)),
            prose, False),
        "fineweb_quality": (_per_language(cfg.fineweb_quality, lambda lang, fw: FineWebQualityFilter(
            line_punct_thr=fw.line_punct_thr, line_punct_exclude_zero=fw.line_punct_exclude_zero,
            short_line_thr=fw.short_line_thr, short_line_length=fw.short_line_length,
            char_duplicates_ratio=fw.char_duplicates_ratio, new_line_ratio=fw.new_line_ratio, language=lang)),
            prose, False),
        "quality_classifier": (classifier_filter(models["quality_classifier"], cfg.quality_classifier.remove_label,
                                                 cfg.quality_classifier.threshold), prose, False),
    }
    assert list(steps) == FILTER_STEPS
    pipeline: list[PipelineStep] = [InputReader(folder, glob_pattern=glob)]
    pipeline += [FilterStep(name, f, out, applies, edits) for name, (f, applies, edits) in steps.items()]
    pipeline += [CodeRouter(work, cfg.code.join_tasks, langs),
                 JsonlWriter(os.path.join(work, "docs", "prose"), output_filename="${rank}.jsonl.gz",
                             compression="gzip")]
    return pipeline


def stage_plan(cfg: PipelineConfig, folder: str, glob: str | None, out: str, models: dict[str, str]):
    """[(stage name, pipeline, tasks)] in run order."""
    work = os.path.join(out, "work")
    tasks = cfg.run.tasks
    plan = [("filter", filter_stage(cfg, folder, glob, out, models), tasks),
            ("code_join", [RepoJoiner(work, out, cfg.code.languages, cfg.code.header, cfg.code.footer)],
             cfg.code.join_tasks)]
    docs = os.path.join(work, "docs")
    final = os.path.join(out, "kept")
    if cfg.dedup.exact:
        ex = ExactDedupConfig(content_getter=text_of)
        exact_out = os.path.join(work, "exact_kept") if cfg.dedup.minhash else final
        plan += [
            ("exact_signature", [WorkReader(docs), ExactDedupSignature(os.path.join(work, "exact", "sigs"), ex)],
             tasks),
            ("exact_find", [ExactFindDedups(os.path.join(work, "exact", "sigs"), os.path.join(work, "exact", "dups"),
                                            config=ex)], 1),
            ("exact_filter", [WorkReader(docs),
                              PassStep("exact_dedup", ExactDedupFilter(os.path.join(work, "exact", "dups"), ex,
                                                                       removed_writer(out, "exact_dedup")),
                                       out, "exact_duplicate"),
                              JsonlWriter(exact_out, output_filename="${rank}.jsonl.gz", compression="gzip")], tasks),
        ]
        docs = exact_out
    if cfg.dedup.minhash:
        mh = MinhashConfig(n_grams=cfg.dedup.n_grams, num_buckets=cfg.dedup.num_buckets,
                           hashes_per_bucket=cfg.dedup.hashes_per_bucket)
        sigs, buckets, ids = (os.path.join(work, "minhash", d) for d in ("sigs", "buckets", "remove_ids"))
        plan += [
            ("minhash_signature", [WorkReader(docs), MinhashDedupSignature(sigs, config=mh)], tasks),
            # datatrove: one task per bucket (the bucket stage's tasks must be a multiple of num_buckets)
            ("minhash_buckets", [MinhashDedupBuckets(sigs, buckets, config=mh)], mh.num_buckets),
            ("minhash_cluster", [MinhashDedupCluster(buckets, ids, config=mh)], 1),
            ("minhash_filter", [WorkReader(docs),
                                PassStep("minhash_dedup", MinhashDedupFilter(ids, removed_writer(out, "minhash_dedup")),
                                         out, "near_duplicate"),
                                JsonlWriter(final, output_filename="${rank}.jsonl.gz", compression="gzip")], tasks),
        ]
    elif not cfg.dedup.exact:
        plan.append(("collect", [WorkReader(docs), JsonlWriter(final, output_filename="${rank}.jsonl.gz",
                                                               compression="gzip")], tasks))
    lc = cfg.long_context
    if lc.enabled:
        scorer = PerplexityScorer(repo_path(lc.checkpoint), lc.tokenizer, lc.max_tokens) if lc.checkpoint else None
        plan.append(("long_context", [WorkReader(final), LongContextSelector(out, lc.min_chars, scorer,
                                                                             lc.max_perplexity)], tasks))
    return plan


def run_stages(plan, out: str, executor: str, workers: int) -> None:
    """Runs the stages one after the other, each with its own datatrove executor (logs and completion markers in
    OUT/logs/<stage>/). They are not chained with ``depends``: datatrove pickles an executor's whole ``depends``
    chain into its logging folder, and after the filter stage ran that chain holds the URL filter's loaded
    4.5M-domain set (14 s per later stage on the reference machine)."""
    for stage, pipeline, tasks in plan:
        logs = os.path.join(out, "logs", stage)
        w = min(workers, tasks)
        if executor == "local":
            from datatrove.executor import LocalPipelineExecutor
            LocalPipelineExecutor(pipeline, tasks=tasks, workers=w, logging_dir=logs).run()
        else:
            from datatrove.executor import RayPipelineExecutor
            RayPipelineExecutor(pipeline, tasks=tasks, workers=w, logging_dir=logs, mem_per_cpu_gb=1).run()


def train_models(cfg: PipelineConfig, out: str) -> dict[str, str]:
    models = {}
    for name in ("safety_classifier", "quality_classifier"):
        c = getattr(cfg, name)
        path = os.path.join(out, "work", "models", f"{name}.bin")
        if not os.path.isfile(path):  # a resumed run keeps the model its completed tasks used
            train_classifier(repo_path(c.seed), path, c.epoch, c.lr, c.word_ngrams, c.dim, c.bucket, c.minn, c.maxn)
        models[name] = path
    return models


# ---------------------------------------------------------------------------------------------------------------
# stats.json


def _read_docs(folder: str):
    if not os.path.isdir(folder):
        return
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith(".jsonl.gz"):
                with gzip.open(os.path.join(root, name), "rb") as f:
                    for line in f:
                        yield orjson.loads(line)


def _sum_tallies(out: str, step: str) -> dict | None:
    folder = os.path.join(out, TALLY_DIR, step)
    if not os.path.isdir(folder):
        return None
    total = {"in": [0, 0, 0], "out": [0, 0, 0], "removed": defaultdict(lambda: [0, 0, 0])}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(folder, name)) as f:
            t = json.load(f)
        for k in ("in", "out"):
            total[k] = [a + b for a, b in zip(total[k], t[k])]
        for reason, v in t["removed"].items():
            total["removed"][reason] = [a + b for a, b in zip(total["removed"][reason], v)]
    return total


def _entry(slot):
    return {"docs": slot[0], "bytes": slot[1], "inputs": slot[2]}


def build_stats(out: str, cfg: PipelineConfig, seconds: float) -> dict:
    steps = {}
    removed_inputs = 0
    for step in STEPS:
        t = _sum_tallies(out, step)
        if t is None:
            continue
        steps[step] = {"in": _entry(t["in"]), "out": _entry(t["out"]),
                       "removed": {r: _entry(v) for r, v in sorted(t["removed"].items())}}
        removed_inputs += sum(v[2] for v in t["removed"].values())
    kept_docs = kept_bytes = kept_inputs = 0
    kinds: dict[str, dict] = defaultdict(lambda: {"in": 0, "kept": 0, "removed": defaultdict(int)})
    for rec in _read_docs(os.path.join(out, "kept")):
        n = int(rec["metadata"].get("n_inputs", 1))
        kept_docs += 1
        kept_bytes += len(rec["text"].encode("utf-8"))
        kept_inputs += n
        if "kind" in rec["metadata"]:
            kinds[rec["metadata"]["kind"]]["kept"] += n
    files_removed = {}
    for step in STEPS:
        count = 0
        for rec in _read_docs(os.path.join(out, "removed", step)):
            n = int(rec["metadata"].get("n_inputs", 1))
            count += n
            if "kind" in rec["metadata"]:
                kinds[rec["metadata"]["kind"]]["removed"][step] += n
        files_removed[step] = count
    for k in kinds.values():
        k["in"] = k["kept"] + sum(k["removed"].values())
        k["kept_fraction"] = round(k["kept"] / k["in"], 4) if k["in"] else None
        k["removed"] = dict(k["removed"])
    total_in = steps["read"]["in"]["inputs"] if "read" in steps else 0
    tallied = {s: sum(r["inputs"] for r in v["removed"].values()) for s, v in steps.items()}
    check = {
        "inputs_in": total_in, "inputs_kept": kept_inputs, "inputs_removed": removed_inputs,
        "balanced": total_in == kept_inputs + removed_inputs,
        "removed_files_match_tallies": all(files_removed[s] == tallied.get(s, 0) for s in STEPS),
    }
    lc = _sum_tallies(out, "long_context")
    long_context = None
    if lc is not None:
        long_context = {"candidates_in": _entry(lc["in"]), "selected": _entry(lc["out"]),
                        "not_selected": {r: _entry(v) for r, v in sorted(lc["removed"].items())},
                        "min_chars": cfg.long_context.min_chars,
                        "perplexity": (f"scored with {cfg.long_context.checkpoint}" if cfg.long_context.checkpoint
                                       else "skipped: no long_context.checkpoint configured")}
    return {"documents_in": total_in, "kept": {"docs": kept_docs, "bytes": kept_bytes, "inputs": kept_inputs},
            "steps": steps, "check": check, "long_context": long_context,
            "by_kind": {k: kinds[k] for k in sorted(kinds)}, "seconds": round(seconds, 2),
            "executor": cfg.run.executor, "tasks": cfg.run.tasks, "workers": cfg.run.workers}


def run_pipeline(input_spec: str, out: str, cfg: PipelineConfig, ray_address: str = "") -> dict:
    """Runs every stage (resuming the completed tasks of an earlier run into ``out``) and writes stats.json."""
    folder, glob = split_input(input_spec)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    for d in ("work/docs", "work/code", "kept"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    start = time.perf_counter()
    models = train_models(cfg, out)
    plan = stage_plan(cfg, os.path.abspath(folder), glob, out, models)
    if cfg.run.executor == "ray":
        import ray

        if not ray.is_initialized():
            # local: workers import train.* from this checkout; on a cluster the checkout must be on every node
            # at the same path (or installed), and OUT on a shared filesystem (datatrove's requirement)
            ray.init(address=ray_address or cfg.run.ray_address or None, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": repo_path(".")}})
    run_stages(plan, out, cfg.run.executor, cfg.run.workers)
    stats = build_stats(out, cfg, time.perf_counter() - start)
    with open(os.path.join(out, "stats.json.tmp"), "w") as f:
        json.dump(stats, f, indent=1, ensure_ascii=False)
    os.replace(os.path.join(out, "stats.json.tmp"), os.path.join(out, "stats.json"))
    if not (stats["check"]["balanced"] and stats["check"]["removed_files_match_tallies"]):
        raise RuntimeError(f"{out}/stats.json: documents in != kept + removed: {stats['check']}")
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a directory, a file or a glob of jsonl / jsonl.gz / parquet")
    p.add_argument("--output", required=True, help="output folder (rerun with the same folder to resume)")
    p.add_argument("--config", default=repo_path("configs/data_pipeline.toml"))
    p.add_argument("--executor", choices=("local", "ray"))
    p.add_argument("--tasks", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--ray-address", default="")
    p.add_argument("--overwrite", action="store_true", help="delete OUT first instead of resuming")
    args = p.parse_args(argv)
    cfg = load_pipeline_config(args.config)
    for key in ("executor", "tasks", "workers"):
        if getattr(args, key) is not None:
            setattr(cfg.run, key, getattr(args, key))
    validate(cfg)
    if args.overwrite and os.path.isdir(args.output):
        shutil.rmtree(args.output)
    stats = run_pipeline(args.input, args.output, cfg, args.ray_address)
    steps = ", ".join(f"{s} -{sum(r['docs'] for r in v['removed'].values())}" for s, v in stats["steps"].items())
    print(f"{stats['documents_in']} records in, {stats['kept']['docs']} documents kept "
          f"({stats['kept']['inputs']} records) -> {args.output}/kept; removed: {steps}; "
          f"long-context: {stats['long_context'] and stats['long_context']['selected']['docs']}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # datatrove's executors need the guard (worker processes re-import this module)
    sys.exit(main())
