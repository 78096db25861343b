"""FSDP2 (ZeRO-3) for block-structured models: ``fully_shard`` per block (the model names its blocks:
``models.tensor_parallel.internlm2_blocks`` for InternLM2), explicit prefetch, our FusedAdamW.

Each block is one FSDP unit (its parameters are one all-gather / one reduce-scatter); the root unit holds what is
left (embeddings, final norm, output head). Explicit prefetch: block i issues the all-gather of blocks
i+1..i+prefetch when its forward starts and of blocks i-1..i-prefetch when its backward starts, so the gathers
run behind the compute of the block before them instead of waiting for FSDP's implicit one-ahead order.

``internlm_kernels.FusedAdamW`` and ``clip_grad_norm_`` take the resulting DTensor parameters directly (the
kernels run on the local shards; the norm is reduced over the mesh).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import nn


def fsdp_mesh(shard_size: int | None = None, device_type: str = "cpu"):
    """A device mesh over the whole world: 1-D (shard over all ranks), or 2-D ("replicate", "shard") when
    ``shard_size`` ranks shard and the ``world / shard_size`` groups replicate (HSDP)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if shard_size is None or shard_size == world:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1 or world % shard_size:
        raise ValueError(f"shard_size ({shard_size!r}) must be a positive int dividing the world size ({world})")
    return init_device_mesh(device_type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def fully_shard_blocks(model: nn.Module, mesh=None, *, blocks: Sequence[nn.Module],
                       prefetch: int = 1, reshard_after_forward: bool = True, mp_policy=None) -> nn.Module:
    """Shard ``model`` in place with FSDP2: one unit per block of ``blocks`` (e.g. the decoder layers), then
    the root. ``prefetch``: how many blocks ahead (forward) / behind (backward) each block gathers; 0 leaves FSDP's
    implicit prefetch. ``reshard_after_forward=False`` keeps gathered blocks until the backward (ZeRO-2-like
    memory, no second gather). ``mp_policy``: an FSDP2 MixedPrecisionPolicy. Returns ``model``."""
    from torch.distributed.fsdp import fully_shard

    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
    blocks = list(blocks)
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    if prefetch:
        for i, block in enumerate(blocks):
            ahead = blocks[i + 1:i + 1 + prefetch]
            behind = blocks[max(0, i - prefetch):i][::-1]
            if ahead:
                block.set_modules_to_forward_prefetch(ahead)
            if behind:
                block.set_modules_to_backward_prefetch(behind)
    return model


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Micro-steps inside accumulate unsharded gradients without reduce-scatter (the last one reduces)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
