"""``make eval`` = ``python -m train.eval.suite``: the shipped lm-eval tasks and the long-context suite on the demo's
final checkpoints (pretrain, SFT, PPO), side by side.

Checkpoints (under ``--runs``, default ``runs``; each the newest of its kind, or ``--checkpoint NAME=DIR``):
    pretrain  <runs>/tiny_cpu/checkpoints/step_*/model
    sft       <runs>/sft_tiny/checkpoints/step_*/model
    ppo       <runs>/ppo_tiny/rounds/round_*/actor
Each runs through lm-eval's own evaluator (``simple_evaluate`` on ``InternLMKernelsLM``) on the tasks of
``train/eval/tasks`` and through ``train.eval.needle`` (three kinds x English/Chinese, plus the passkey format).
Writes ``<runs>/eval/<name>/{lm_eval.json,needle.json,needle.png}``, one table ``<runs>/eval/report.md``, and the
figures under ``"eval"`` in ``<runs>/summary.json`` (merged into the file when it exists; other keys are kept).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time
from typing import Sequence

TASKS = ("ik_arithmetic", "ik_choice", "ik_chat", "ik_tool", "ik_heldout")
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
# (task, lm-eval metric key, shown name)
METRICS = (("ik_arithmetic", "exact_match,none", "arithmetic exact match"),
           ("ik_choice", "acc,none", "multiple choice accuracy"),
           ("ik_choice", "acc_norm,none", "multiple choice accuracy (length-normalized)"),
           ("ik_chat", "exact_match,none", "chat exact match"),
           ("ik_tool", "exact_match,none", "tool call exact match"),
           ("ik_heldout", "byte_perplexity,none", "held-out byte perplexity"),
           ("ik_heldout", "bits_per_byte,none", "held-out bits per byte"))
PATTERNS = {"pretrain": "tiny_cpu/checkpoints/step_*/model", "sft": "sft_tiny/checkpoints/step_*/model",
            "ppo": "ppo_tiny/rounds/round_*/actor"}


def find_checkpoints(runs: str, given: Sequence[str] = ()) -> dict[str, str]:
    """{name: export dir}: the newest match of each pattern under ``runs``, overridden by NAME=DIR pairs."""
    found = {}
    for name, pattern in PATTERNS.items():
        matches = sorted(glob.glob(os.path.join(runs, pattern)))
        if matches:
            found[name] = matches[-1]
    for item in given:
        name, sep, path = item.partition("=")
        if not sep or not name or not os.path.isdir(path):
            raise ValueError(f"--checkpoint: expected NAME=DIR with an existing DIR, got {item!r}")
        found[name] = path
    if not found:
        raise ValueError(f"no checkpoints under {runs!r} ({', '.join(PATTERNS.values())}): run `make demo` first, "
                         "or pass --checkpoint NAME=DIR")
    return found


def write_json_atomic(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def merge_summary(path: str, eval_figures: dict) -> None:
    """Set ``"eval"`` in the summary JSON at ``path``, keeping every other key of an existing file."""
    summary = {}
    if os.path.isfile(path):
        with open(path) as f:
            summary = json.load(f)
    summary["eval"] = eval_figures
    write_json_atomic(path, summary)


def report_table(results: dict[str, dict]) -> str:
    """Markdown: one row per task metric and per needle kind/language, one column per checkpoint."""
    names = list(results)
    rows = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for task, key, shown in METRICS:
        cells = []
        for n in names:
            v = results[n]["tasks"].get(task, {}).get(key)
            cells.append("–" if v is None else (f"{v:.3f}" if "perplexity" in key or "bits" in key else f"{v:.1%}"))
        rows.append(f"| {shown} | " + " | ".join(cells) + " |")
    kinds = list(results[names[0]]["needle"])
    for kind in kinds:
        for lang in results[names[0]]["needle"][kind]:
            cells = [f"{results[n]['needle'][kind][lang]:.1%}" for n in names]
            rows.append(f"| needle {kind} ({lang}), mean over the grid | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def evaluate_checkpoint(name: str, path: str, out_dir: str, args) -> dict:
    """lm-eval tasks and the needle suite on one export; returns its figures."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from train.eval.lm_adapter import InternLMKernelsLM
    from train.eval.needle import main as needle_main

    t0 = time.perf_counter()
    lm = InternLMKernelsLM(pretrained=path, device=args.device, tokenizer=args.tokenizer, threads=args.threads)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), limit=args.limit,
                                  task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False))
    tasks = {t: {k: v for k, v in r.items() if isinstance(v, (int, float))} for t, r in res["results"].items()}
    write_json_atomic(os.path.join(out_dir, "lm_eval.json"), {"checkpoint": path, "results": tasks})
    argv = ["--model", path, "--lengths", args.lengths, "--depths", args.depths, "--trials", str(args.trials),
            "--passkey", "--out", out_dir, "--seed", "0"]
    for flag in ("device", "tokenizer"):
        if getattr(args, flag):
            argv += [f"--{flag}", getattr(args, flag)]
    needle = needle_main(argv)
    print(f"[eval] {name}: {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"checkpoint": path, "tasks": tasks,
            "needle": {k: {lang: g["mean"] for lang, g in by.items()} for k, by in needle.items()},
            "needle_grid": {k: {lang: {"lengths": g["lengths"], "depths": g["depths"], "accuracy": g["accuracy"]}
                                for lang, g in by.items()} for k, by in needle.items()},
            "heatmap": os.path.join(out_dir, "needle.png"), "wall_s": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m train.eval.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs", help="the demo's output root (default: runs)")
    p.add_argument("--checkpoint", action="append", default=[], help="NAME=DIR, added to or replacing the found ones")
    p.add_argument("--limit", type=int, default=None, help="documents per lm-eval task (default: all)")
    p.add_argument("--lengths", default="512,768,1024")   # 3 English needles + question need ~350 byte tokens
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--tokenizer", default=None, help="'byte' or a SentencePiece model, for exports without one")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: see configs/tiny_cpu.toml)")
    args = p.parse_args(argv)
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")
    checkpoints = find_checkpoints(args.runs, args.checkpoint)
    out_root = os.path.join(args.runs, "eval")
    results = {name: evaluate_checkpoint(name, path, os.path.join(out_root, name), args)
               for name, path in checkpoints.items()}
    table = report_table(results)
    lines = ["# Evaluation of the demo's checkpoints", "",
             "Shipped lm-eval tasks (`train/eval/tasks`, through lm-eval's evaluator on the `internlm_kernels` "
             "adapter) and the NeedleBench-style suite (`python -m train.eval.needle`; accuracy averaged over "
             f"lengths {args.lengths} x depths {args.depths}, {args.trials} trials per cell). Greedy decoding.", "",
             table, "", "Checkpoints:"]
    lines += [f"- {n}: `{r['checkpoint']}` (heatmaps: `{r['heatmap']}`)" for n, r in results.items()]
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    figures = {n: {k: v for k, v in r.items() if k != "wall_s"} for n, r in results.items()}
    merge_summary(os.path.join(args.runs, "summary.json"), figures)
    print(table)
    return results


if __name__ == "__main__":
    main()
