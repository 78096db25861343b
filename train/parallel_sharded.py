"""The sharded ``[parallel]`` modes: ``zero1`` / ``zero2`` (internlm_kernels.distributed.ZeroDataParallel, hybrid
sharding over ``shard_size`` ranks, collectives overlapped unless ``overlap = false``) and ``fsdp`` (FSDP2 per
InternLM2 block with explicit prefetch; HSDP when ``shard_size`` < world). Registered on import by
train/parallel.py. docs/distributed.md describes them and their communication volumes.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .parallel import Parallel, ParallelDims, Runtime, register_mode


class _ShardedMode(Parallel):
    """What the sharded modes share: their key checks and the HF export of a model whose state may be sharded."""

    @classmethod
    def check_config(cls, parallel) -> None:
        if parallel.tp != 1:
            raise ValueError(f"parallel.tp: mode {parallel.mode!r} runs tp = 1 (tensor parallelism runs in mode "
                             f"'fsdp' with tp = world size), got {parallel.tp}")

    @classmethod
    def check_dims(cls, dims: ParallelDims) -> None:
        super().check_dims(dims)
        if dims.shard_size and dims.world % dims.shard_size:
            raise ValueError(f"parallel.shard_size ({dims.shard_size}) must divide the world size ({dims.world})")

    @property
    def shard_size(self) -> int | None:
        return self.dims.shard_size or None


class _Zero(_ShardedMode):
    stage: int

    def __init__(self, model: nn.Module, runtime: Runtime):
        super().__init__(model, runtime)
        self.zero = None        # built with the optimizer: ZeroDataParallel owns the (sharded) optimizer

    def build_optimizer(self, make):
        from internlm_kernels.distributed import ZeroDataParallel

        if not self.dims.distributed:
            return make(self.module.parameters())
        self.zero = ZeroDataParallel(self.module, stage=self.stage, shard_size=self.shard_size,
                                     overlap=self.dims.overlap, make_optimizer=make)
        self.model = self.zero
        return self.zero.optimizer

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.zero.no_sync() if self.zero is not None else contextlib.nullcontext()

    def finish_gradients(self, total_targets: torch.Tensor) -> None:
        if self.zero is None:
            return super().finish_gradients(total_targets)
        self.zero.scale_gradients_(self.dims.dp / total_targets)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        if self.zero is None:
            return super().clip_grad_norm_(max_norm)
        return self.zero.clip_grad_norm_(max_norm if max_norm > 0 else float("inf"))

    def state_dict(self, optimizer) -> dict:
        if self.zero is None:
            return super().state_dict(optimizer)
        return {"model": self.zero.state_dict(), "optimizer": optimizer.state_dict()}

    def load_state_dict(self, optimizer, state: dict) -> None:
        if self.zero is None:
            return super().load_state_dict(optimizer, state)
        optimizer.load_state_dict(state["optimizer"])    # DCP filled the live tensors; this syncs the masters

    def export(self, path: str, layout: str) -> None:
        if self.zero is not None:
            self.zero.wait_for_parameters()
        super().export(path, layout)


@register_mode("zero1")
class Zero1(_Zero):
    """ZeRO stage 1: optimizer state (fp32 master + moments) sharded, gradient buffers kept for the run."""
    stage = 1


@register_mode("zero2")
class Zero2(_Zero):
    """ZeRO stage 2: also the reduced gradients sharded (full buffers freed after each reduce-scatter)."""
    stage = 2


class _FullModel:
    """What models.checkpoint.save_model reads (config, state_dict) for a gathered full state."""

    def __init__(self, config, state: dict):
        self.config, self._state = config, state

    def state_dict(self) -> dict:
        return self._state


@register_mode("fsdp")
class FullyShardedDataParallel(_ShardedMode):
    """FSDP2 (ZeRO-3): parameters, gradients and optimizer state sharded; one unit per block, explicit prefetch.
    FusedAdamW and clip_grad_norm_ run on the DTensor shards.

    With ``tp`` > 1 the model is tensor + sequence parallel instead (internlm_kernels.distributed.tensor_parallel:
    wqkv split by KV group, vocabulary-parallel loss); the trainer runs it with tp = world size (one
    data-parallel rank): combining both is refused."""

    @classmethod
    def check_config(cls, parallel) -> None:
        if not parallel.overlap:
            raise ValueError("parallel.overlap: mode 'fsdp' always prefetches and overlaps its collectives (true)")
        if parallel.tp > 1 and parallel.shard_size:
            raise ValueError(f"parallel.shard_size: with parallel.tp = {parallel.tp} nothing is sharded by FSDP (0), "
                             f"got {parallel.shard_size}")

    @classmethod
    def check_dims(cls, dims: ParallelDims) -> None:
        super().check_dims(dims)
        if dims.tp > 1 and dims.dp != 1:
            raise ValueError(f"parallel.tp ({dims.tp}) must equal the world size ({dims.world}): tensor parallelism "
                             f"is not combined with data parallelism (FSDP over the tp groups) yet")

    def __init__(self, model: nn.Module, runtime: Runtime):
        super().__init__(model, runtime)
        if self.dims.tp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            from internlm_kernels.distributed.tensor_parallel import check_tp, parallelize_internlm2

            check_tp(model.config, self.dims.tp, key="parallel.tp")
            parallelize_internlm2(model, init_device_mesh(runtime.device.type, (self.dims.tp,)))
        elif self.dims.distributed:
            from internlm_kernels.distributed.fsdp import fsdp_mesh, fully_shard_blocks

            fully_shard_blocks(model, fsdp_mesh(self.shard_size, runtime.device.type))

    @property
    def _fsdp(self) -> bool:
        return self.dims.distributed and self.dims.tp == 1

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.dims.tp > 1:   # one data-parallel rank: every tp rank already holds the same sums
            return t
        return super().all_reduce_(t)

    def no_sync(self) -> contextlib.AbstractContextManager:
        if not self._fsdp:
            return contextlib.nullcontext()
        from internlm_kernels.distributed.fsdp import no_sync

        return no_sync(self.module)

    def finish_gradients(self, total_targets: torch.Tensor) -> None:
        from torch.distributed.tensor import DTensor

        grads = [g.to_local() if isinstance(g, DTensor) else g for g in self._grads()]
        if grads:
            torch._foreach_mul_(grads, (self.dims.dp / total_targets).to(grads[0].dtype))

    def export(self, path: str, layout: str) -> None:
        if not self.dims.distributed:
            return super().export(path, layout)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from models.checkpoint import save_model

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dims.is_main:
            save_model(_FullModel(self.module.config, full), path, layout=layout)
