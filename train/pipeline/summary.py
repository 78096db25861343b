"""``runs/summary.json``: the figures of ``make demo`` in one machine-readable file (issue 21).

Written by ``python -m train.pipeline`` at ``<run.output_dir>/summary.json``. Each stage contributes one plain dict
(pretraining: ``pretrain_summary``; SFT / reward model / PPO: ``train.pipeline.align`` and ``train.pipeline.ppo``)
and the pipeline adds the run's facts (seed, threads, CPU, ISA override, wall time per stage). ``check_summary``
is the contract: every key of ``SCHEMA`` present, fractions in [0, 1], lengths >= 0, flagged rounds a list of
ints, ``final_flagged`` a bool. A metric that the code of a stage does not measure is ``null`` (the report then
says "not measured"), never a made-up number.
"""
from __future__ import annotations

import json
import math
import os
import platform

from internlm_kernels.cpu.gemm_choice import LIBRARY_ISA_CAPS

SUMMARY_FILE = "summary.json"
PASSKEY_LENGTHS = ("256", "512", "1024")
# The demo's bars for the default seed (issue 21): retrieval after the long stage, and what the long stage adds.
PASSKEY_BARS = {"256": 0.9, "512": 0.9, "1024": 0.6}
PASSKEY_GAIN_LENGTH, PASSKEY_GAIN = "1024", 0.2
FRACTION, NONNEGATIVE, ROUND, ROUNDS, FLAG, PASSKEY = "fraction", "nonnegative", "round", "rounds", "flag", "passkey"

# Dotted key -> kind of value.
SCHEMA: dict[str, str] = {
    "pretrain.passkey_after_short": PASSKEY,
    "pretrain.passkey_final": PASSKEY,
    "sft.exact_match_before": FRACTION,
    "sft.exact_match_after": FRACTION,
    "sft.tool_call_exact_after": FRACTION,
    "reward.pair_accuracy.concise": FRACTION,
    "reward.pair_accuracy.helpful": FRACTION,
    "reward.unconditional_pair_accuracy": FRACTION,
    "reward.correct_over_wrong": FRACTION,
    "ppo.accuracy.sft": FRACTION,
    "ppo.accuracy.final": FRACTION,         # the released round's (train.rlhf.release)
    "ppo.accuracy.last_round": FRACTION,
    "ppo.released_round": ROUND,            # 0: every round flagged, SFT released
    "ppo.length.sft": NONNEGATIVE,
    "ppo.length.final": NONNEGATIVE,
    "ppo.flagged_rounds": ROUNDS,
    "ppo.final_flagged": FLAG,
}


def _get(d: dict, dotted: str):
    node = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"summary: missing key {dotted!r}")
        node = node[part]
    return node


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"summary: {key} must be a finite number, got {value!r}")
    return float(value)


def _check_value(kind: str, value, key: str) -> None:
    if value is None and kind != PASSKEY:
        return                                  # not measured by this code (the report says so)
    if kind == FRACTION and not 0.0 <= _number(value, key) <= 1.0:
        raise ValueError(f"summary: {key} is a fraction and must be in [0, 1], got {value!r}")
    if kind == NONNEGATIVE and _number(value, key) < 0:
        raise ValueError(f"summary: {key} must be >= 0, got {value!r}")
    if kind == ROUND and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"summary: {key} must be a round number (an int >= 0), got {value!r}")
    if kind == ROUNDS and not (isinstance(value, list)
                               and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in value)):
        raise ValueError(f"summary: {key} must be a list of round numbers (ints >= 1), got {value!r}")
    if kind == FLAG and not isinstance(value, bool):
        raise ValueError(f"summary: {key} must be true or false, got {value!r}")
    if kind == PASSKEY:
        if not isinstance(value, dict) or sorted(value) != sorted(PASSKEY_LENGTHS):
            raise ValueError(f"summary: {key} must map exactly the lengths {list(PASSKEY_LENGTHS)} to accuracies, "
                             f"got {value!r}")
        for n in PASSKEY_LENGTHS:
            _check_value(FRACTION, _number(value[n], f"{key}.{n}"), f"{key}.{n}")


def check_summary(d: dict) -> dict:
    """``d`` unchanged when it satisfies the contract; otherwise ValueError naming the first bad key."""
    if not isinstance(d, dict):
        raise ValueError(f"summary: expected a dict, got {type(d).__name__}")
    seed = d.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"summary: seed must be an int, got {seed!r}")
    for key, kind in SCHEMA.items():
        _check_value(kind, _get(d, key), key)
    threads = d.get("threads")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"summary: threads must be an int >= 0, got {threads!r}")
    if not isinstance(d.get("cpu"), str):
        raise ValueError(f"summary: cpu must be the CPU model string, got {d.get('cpu')!r}")
    if not isinstance(d.get("wall_s"), dict):
        raise ValueError(f"summary: wall_s must map each stage to its seconds, got {d.get('wall_s')!r}")
    for stage, s in d["wall_s"].items():
        _check_value(NONNEGATIVE, s, f"wall_s.{stage}")
    return d


def pretrain_summary(after_short: dict, final: dict) -> dict:
    """The pretraining entries from two ``passkey_probe`` results: accuracy per length, averaged over depths."""
    def means(result: dict, which: str) -> dict[str, float]:
        got = {str(n): sum(a) / len(a) for n, a in zip(result["lengths"], result["accuracy"])}
        missing = [n for n in PASSKEY_LENGTHS if n not in got]
        if missing:
            raise ValueError(f"eval.passkey_lengths must include {list(PASSKEY_LENGTHS)} for the summary; the "
                             f"{which} probe lacks {missing}")
        return {n: got[n] for n in PASSKEY_LENGTHS}
    return {"passkey_after_short": means(after_short, "after-short"), "passkey_final": means(final, "final")}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_summary(seed: int, pretrain: dict, sft: dict, reward: dict, ppo: dict, wall_s: dict[str, float],
                  threads: int) -> dict:
    """The whole summary: the stage dicts plus the run's facts (checked)."""
    return check_summary({
        "seed": seed, "pretrain": pretrain, "sft": sft, "reward": reward, "ppo": ppo,
        "wall_s": {k: round(v, 1) for k, v in wall_s.items()}, "threads": threads, "cpu": cpu_model(),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY") or None,
        # MKL's and oneDNN's own ISA caps: with ATEN_CPU_CAPABILITY they run the process as on a narrower CPU
        "library_isa_caps": {var: os.environ[var] for var in LIBRARY_ISA_CAPS if os.environ.get(var)},
    })


def write_summary(path: str, summary: dict) -> str:
    """Check ``summary`` and write it as JSON atomically (a temporary file fsync'ed, then renamed over ``path``):
    a reader never sees half a file, and a failed check leaves the previous file in place."""
    check_summary(summary)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
