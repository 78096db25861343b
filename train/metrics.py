"""Observability: JSONL metrics, a console progress bar, PNG plots, and MFU.

Inside a step every number stays on the device (no host read, so the accelerator queue never drains); the
trainer sums them per ``metrics.log_every`` window and reads the window once, when it writes a line.

``metrics.jsonl`` has one JSON object per line with a ``kind``: ``train`` (step, stage, loss, lr, grad_norm,
tokens, tokens_per_s, mfu) or ``eval`` (step, stage, what was measured). A resumed run first drops the lines
written after its checkpoint, so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name substring, for MFU. The order matters: first match wins.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0),
                    ("L40S", 362.0), ("4090", 165.0))


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


class MetricsLog:
    """Append-only JSONL writer (rank 0 only)."""

    def __init__(self, path: str, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            kept = [line for line in read_jsonl(path) if line.get("step", 0) <= resume_step]
            with open(path, "w") as f:
                for rec in kept:
                    f.write(json.dumps(rec) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """tqdm bar over optimizer steps with tokens/s, loss and lr; tqdm shows the ETA. A no-op when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train"):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             file=sys.stderr, smoothing=0.1)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def show(self, loss: float, lr: float, tokens_per_s: float, stage: str) -> None:
        """The numbers of the last metrics read (every metrics.log_every steps)."""
        if self._bar is not None:
            self._bar.set_postfix_str(f"{stage} loss {loss:.3f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s")

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_training(records: list[dict], out_dir: str) -> dict[str, str]:
    """loss.png (per step and smoothed, stages marked) and throughput.png; returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return {}
    os.makedirs(out_dir, exist_ok=True)
    steps = [r["step"] for r in train]
    starts = [(r["step"], r["stage"]) for i, r in enumerate(train) if i == 0 or r["stage"] != train[i - 1]["stage"]]
    paths = {}

    fig, ax = plt.subplots(figsize=(7, 4))
    losses = [r["loss"] for r in train]
    ax.plot(steps, losses, lw=0.8, alpha=0.35, label="loss")
    ax.plot(steps, _smooth(losses, max(1, len(losses) // 50)), lw=1.6, label="smoothed")
    evals = [r for r in records if r.get("kind") == "eval" and "heldout_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["heldout_loss"] for r in evals], "o", label="held-out")
    for step, stage in starts:
        ax.axvline(step, color="gray", ls=":", lw=0.8)
        ax.text(step, ax.get_ylim()[1], f" {stage}", va="top", fontsize=8, color="gray")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.set_title("training loss")
    ax.legend()
    fig.tight_layout()
    paths["loss"] = os.path.join(out_dir, "loss.png")
    fig.savefig(paths["loss"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    tps = [r["tokens_per_s"] for r in train]
    ax.plot(steps, tps, lw=0.8, alpha=0.4, label="tokens/s")
    ax.plot(steps, _smooth(tps, max(1, len(tps) // 50)), lw=1.6, label="smoothed")
    for step, _ in starts:
        ax.axvline(step, color="gray", ls=":", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens/s")
    ax.set_title("throughput")
    ax.legend()
    fig.tight_layout()
    paths["throughput"] = os.path.join(out_dir, "throughput.png")
    fig.savefig(paths["throughput"], dpi=110)
    plt.close(fig)
    return paths
