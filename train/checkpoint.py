"""Checkpoints: torch.distributed.checkpoint state, written atomically, keep-last-N, resume bit-for-bit.

Layout of ``<run_dir>/checkpoints/step_00000120/``:
    state/               torch.distributed.checkpoint (DCP) of {"model", "optimizer"} keyed by parameter name,
                         optimizer incl. FusedAdamW's fp32 master weights and moments. Every rank writes its own
                         part (its shard under a sharded mode, a deduplicated share of replicated tensors under
                         DDP), and any number of ranks can read it back: saved on 2 ranks, resumed on 1, or back.
    trainer_state.pt     step counters, stage, scheduler, data-stream position, RNG states, tokens seen (rank 0)
    model/               at stage ends: HF safetensors + config.json in transformers' Llama layout
                         (``transformers.LlamaForCausalLM.from_pretrained`` loads it as is, and so does our
                         ``InternLM2ForCausalLM.from_pretrained``): the export format, never read to resume
    tokenizer.json       which tokenizer the ids belong to (written by the trainer through ``extra_writer``)
    meta.json            a human-readable summary of the above

Atomicity: everything is written into ``step_XXXXXXXX.tmp-<pid of rank 0>``, every file and directory is fsync'ed,
then rank 0 renames the directory to its final name (an atomic rename on POSIX) and fsyncs the parent. A crash at
any point leaves either the complete new checkpoint or no new checkpoint; ``latest_checkpoint`` never returns a
temporary directory, and the next save removes stale ones. Old checkpoints are deleted only after the new one is
in place.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from models.checkpoint import fsync_path, fsync_tree
from train.parallel import Parallel, Runtime

_NAME = re.compile(r"^step_(\d{8})$")
_TMP = re.compile(r"^step_\d{8}\.tmp-\d+$")


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that it runs without a process group, which is the one-process case, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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


def _single_process(model) -> Parallel:
    param = next(model.parameters())
    return Parallel(model, Runtime(param.device, param.dtype))


def write_state_dir(final: str, dims, state: Callable[[], dict], write_main: Callable[[str], None],
                    write_all: Callable[[str], None] | None = None) -> None:
    """The one atomic checkpoint writer (the trainer's step checkpoints, PPO's round checkpoints); every rank of
    ``dims`` calls it. Into ``<final>.tmp-<pid of rank 0>``: ``write_all(tmp)`` on every rank (HF exports, which
    gather collectively), then ``state()`` through torch.distributed.checkpoint into ``state/`` (each rank its part),
    ``write_main(tmp)`` on rank 0; then rank 0 fsyncs the tree, renames it over ``final`` and fsyncs the parent.
    Leftover temporaries of ``final`` from a crashed save are removed first."""
    import torch.distributed.checkpoint as dcp

    root, name = os.path.split(final)
    tmp = [f"{final}.tmp-{os.getpid()}"]
    if dims.is_main:
        os.makedirs(root, exist_ok=True)
        for other in os.listdir(root):
            if other.startswith(f"{name}.tmp-"):
                shutil.rmtree(os.path.join(root, other), ignore_errors=True)
        os.makedirs(tmp[0])
    if dims.distributed:
        dist.broadcast_object_list(tmp, src=0)
    tmp = tmp[0]
    if write_all is not None:
        write_all(tmp)
    with _quiet_dcp():
        dcp.save(state(), checkpoint_id=os.path.join(tmp, "state"))
    if dims.is_main:
        write_main(tmp)
        fsync_tree(tmp)
        if os.path.exists(final):  # re-saving the same step (e.g. a resumed run that ends where it resumed)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(root)
    if dims.distributed:
        dist.barrier()


def read_state_dir(path: str, state: dict) -> None:
    """Fill ``state`` (live tensors, any sharding, any number of ranks; a subset of the saved keys is fine) from
    the ``state/`` of checkpoint directory ``path``."""
    import torch.distributed.checkpoint as dcp

    state_dir = os.path.join(path, "state")
    if not os.path.isdir(state_dir):
        raise ValueError(f"checkpoint {path!r} has no state/ directory (not a checkpoint of this trainer?)")
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=state_dir)


def save_checkpoint(run_dir: str, step: int, model, optimizer: torch.optim.Optimizer, trainer_state: dict,
                    keep_last: int = 2, extra_writer: Callable[[str], None] | None = None,
                    export: str | None = "llama", parallel: Parallel | None = None) -> str:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep_last``; returns its directory.

    Called by every rank of ``parallel`` (one process without it). ``export`` (a ``save_pretrained`` layout:
    "llama", "internlm2") adds the HF ``model/`` directory; None leaves it out. ``trainer_state`` is saved with torch.save (plain containers,
    numbers, strings, tensors) by rank 0, as is whatever ``extra_writer(tmp_dir)`` adds before the commit.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    parallel = parallel or _single_process(model)
    main = parallel.dims.is_main
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"step_{step:08d}")
    if main and os.path.isdir(root):
        for name in os.listdir(root):  # leftovers of a crashed save at any step: never complete, safe to drop
            if _TMP.match(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def write_main(tmp: str) -> None:
        torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
        if extra_writer is not None:
            extra_writer(tmp)
        meta = {k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str, bool))}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)

    def write_all(tmp: str) -> None:
        if export:
            parallel.export(os.path.join(tmp, "model"), export)

    write_state_dir(final, parallel.dims, lambda: parallel.state_dict(optimizer), write_main, write_all)
    if main:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    if parallel.dims.distributed:
        dist.barrier()
    return final


def load_checkpoint(path: str, parallel: Parallel, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer of checkpoint ``path`` into ``parallel``'s model and ``optimizer`` (built over
    the same parameters, on any number of ranks); returns the trainer state. FusedAdamW keeps fp32 master weights
    and moments fp32 when loaded onto bf16 parameters."""
    if not os.path.isdir(os.path.join(path, "state")):
        raise ValueError(f"checkpoint {path!r} has no state/ directory (not a checkpoint of this trainer?)")
    trainer_state = load_trainer_state(path)
    state = parallel.state_dict(optimizer)
    read_state_dir(path, state)
    parallel.load_state_dict(optimizer, state)
    return trainer_state


def read_saved_state(path: str) -> dict:
    """The whole {"model", "optimizer"} state of checkpoint ``path`` as plain tensors in one process (inspection,
    tests), whatever the number of ranks that wrote it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp, _quiet_dcp():
        file = os.path.join(tmp, "state.pt")
        dcp_to_torch_save(os.path.join(path, "state"), file)
        return torch.load(file, map_location="cpu", weights_only=False)


def load_trainer_state(path: str) -> dict:
    file = os.path.join(path, "trainer_state.pt")
    if not os.path.isfile(file):
        raise ValueError(f"checkpoint {path!r} has no trainer_state.pt (not a checkpoint directory?)")
    # Our own file: it holds numpy RNG state and python tuples, so it is not loaded weights-only.
    return torch.load(file, map_location="cpu", weights_only=False)
