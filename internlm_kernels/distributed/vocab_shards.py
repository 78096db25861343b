"""What the vocabulary-parallel head ops share (vocab_parallel_ce.py, vocab_parallel_logprobs.py): the token rows
gathered from the sequence shards, each target's place in this rank's vocabulary slice, the argument checks, and
reading the local shards and the slice's start from DTensor arguments."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._collectives import all_gather_flat


def gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """Every rank's rows of ``local``, rank-major."""
    out = local.new_empty(local.shape[0] * dist.get_world_size(group), *local.shape[1:])
    all_gather_flat(out, local.contiguous(), group=group)
    return out


def local_target(target, valid, vocab_start: int, vocab_local: int):
    """(mine, index): whether each row's target lies in this rank's slice, and its (T, 1) index there (0 when not)."""
    local = target - vocab_start
    mine = valid & (local >= 0) & (local < vocab_local)
    return mine, torch.where(mine, local, 0).unsqueeze(1)


def check_shard_args(hidden, weight, target, group, sequence_parallel: bool, chunk_rows) -> None:
    """ValueError naming the argument when hidden / weight / target / chunk_rows do not fit one another."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (rows, H) and weight (V_r, H) must agree, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    rows = hidden.shape[0] * (dist.get_world_size(group) if sequence_parallel else 1)
    if target.shape != (rows,):
        raise ValueError(f"target must be ({rows},) (every token), got {tuple(target.shape)}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")


def dtensor_shards(hidden, weight, target, what: str):
    """(hidden's local tensor, weight's local tensor, plain target, process group, vocab_start, sequence_parallel)
    of ``weight`` a DTensor sharded on dim 0 (vocabulary) over a 1-D mesh and ``hidden`` a DTensor sharded on dim 0
    (tokens, sequence parallel) or replicated on the same mesh; ``target`` plain or a DTensor (gathered). ``what``
    names the op in the errors."""
    from torch.distributed.tensor import DTensor

    if not (isinstance(weight, DTensor) and isinstance(hidden, DTensor)):
        raise ValueError(f"hidden and weight must both be DTensors for the vocabulary-parallel {what}")
    mesh = weight.device_mesh
    if mesh.ndim != 1 or hidden.device_mesh != mesh or not weight.placements[0].is_shard(0):
        raise ValueError("weight must be sharded on dim 0 over a 1-D mesh shared with hidden")
    sequence_parallel = hidden.placements[0].is_shard(0)
    if not (sequence_parallel or hidden.placements[0].is_replicate()):
        raise ValueError(f"hidden must be Shard(0) or Replicate(), got {hidden.placements}")
    chunk = math.ceil(weight.shape[0] / mesh.size())     # torch.chunk's split, as Shard(0) lays the rows out
    vocab_start = min(chunk * mesh.get_local_rank(), weight.shape[0])
    if isinstance(target, DTensor):
        target = target.full_tensor()
    return hidden.to_local(), weight.to_local(), target, mesh.get_group(), vocab_start, sequence_parallel
