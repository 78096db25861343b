"""Checkpoints: written atomically, keep-last-N, everything needed to continue bit-for-bit.

Layout of ``<run_dir>/checkpoints/step_00000120/``:
    model/               HF safetensors + config.json in transformers' Llama layout (``save_pretrained(layout="llama")``):
                         ``transformers.LlamaForCausalLM.from_pretrained`` loads it as is, and so does our
                         ``InternLM2ForCausalLM.from_pretrained`` (wqkv is split/merged exactly, no rounding)
    optimizer.pt         the optimizer's state_dict (fp32 master weights and moments)
    trainer_state.pt     step counters, stage, scheduler, data-stream position, RNG states, tokens seen
    tokenizer.json       which tokenizer the ids belong to (written by the trainer through ``extra_writer``)
    meta.json            a human-readable summary of the above

Atomicity: everything is written into ``step_XXXXXXXX.tmp-<pid>``, every file and directory is fsync'ed, then the
directory is renamed to its final name (an atomic rename on POSIX) and the parent is fsync'ed. A crash at any
point leaves either the complete new checkpoint or no new checkpoint; ``latest_checkpoint`` never returns a
temporary directory, and the next save removes stale ones. Old checkpoints are deleted only after the new one is
in place.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Callable

import numpy as np
import torch

from models.checkpoint import fsync_path

_NAME = re.compile(r"^step_(\d{8})$")
_TMP = re.compile(r"^step_\d{8}\.tmp-\d+$")


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _NAME.match(n))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, step: int, model, optimizer: torch.optim.Optimizer, trainer_state: dict,
                    keep_last: int = 2, extra_writer: Callable[[str], None] | None = None) -> str:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep_last``; returns its directory.

    ``model`` needs ``save_pretrained(dir, layout=...)``; ``trainer_state`` is saved with torch.save (plain containers,
    numbers, strings, tensors). ``extra_writer(tmp_dir)``, if given, adds files before the commit.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = checkpoint_root(run_dir)
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of a crashed save: never complete, safe to drop
        if _TMP.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    model.save_pretrained(os.path.join(tmp, "model"), layout="llama")
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    if extra_writer is not None:
        extra_writer(tmp)
    meta = {k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str, bool))}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    _fsync_tree(tmp)
    if os.path.exists(final):  # re-saving the same step (e.g. a resumed run that ends where it resumed)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_trainer_state(path: str) -> dict:
    file = os.path.join(path, "trainer_state.pt")
    if not os.path.isfile(file):
        raise ValueError(f"checkpoint {path!r} has no trainer_state.pt (not a checkpoint directory?)")
    # Our own file: it holds numpy RNG state and python tuples, so it is not loaded weights-only.
    return torch.load(file, map_location="cpu", weights_only=False)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str) -> None:
    """Restore the optimizer of checkpoint ``path`` onto ``optimizer`` (built over the same parameters).
    FusedAdamW keeps fp32 master weights and moments fp32 when loaded onto bf16 parameters."""
    file = os.path.join(path, "optimizer.pt")
    if not os.path.isfile(file):
        raise ValueError(f"checkpoint {path!r} has no optimizer.pt")
    optimizer.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
