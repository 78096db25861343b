"""The sharded ``[parallel]`` modes: ``zero1`` / ``zero2`` (internlm_kernels.distributed.ZeroDataParallel, hybrid
sharding over ``shard_size`` ranks, collectives overlapped unless ``overlap = false``) and ``fsdp`` (FSDP2 per
InternLM2 block with explicit prefetch; HSDP when ``shard_size`` < world), and tensor x data parallelism
(``tp`` > 1): ``fsdp`` shards over the data-parallel ranks of a 2-D (dp, tp) layout as torchtitan does, ``ddp``
replicates over them (``ReplicatedTensorParallel``). Registered on import by train/parallel.py.
docs/distributed.md describes them and their communication volumes.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from train.parallel import Parallel, ParallelDims, Runtime, register_mode


class _FullModel:
    """What models.checkpoint.save_model reads (config, state_dict) for a gathered full state."""

    def __init__(self, config, state: dict):
        self.config, self._state = config, state

    def state_dict(self) -> dict:
        return self._state


class _ShardedMode(Parallel):
    """What the sharded modes share: their key checks and the HF export of a model whose state may be sharded."""

    @classmethod
    def check_dims(cls, dims: ParallelDims) -> None:
        super().check_dims(dims)
        if dims.shard_size and dims.dp % dims.shard_size:
            raise ValueError(f"parallel.shard_size ({dims.shard_size}) must divide the data-parallel size "
                             f"({dims.dp} = world {dims.world} / tp {dims.tp})")

    @property
    def shard_size(self) -> int | None:
        return self.dims.shard_size or None

    def _tensor_parallel(self, model: nn.Module, shard_size: int | None):
        """Make ``model`` tensor + sequence parallel over the "tp" dimension of a (replicate, shard, tp) mesh
        (``shard_size`` data-parallel ranks per shard group) and return the mesh; the loss sums are then reduced
        over the data-parallel ranks of this rank's tp position."""
        import torch.distributed as dist

        from internlm_kernels.distributed.mesh import parallel_mesh
        from models.tensor_parallel import check_tp, parallelize_internlm2

        dims = self.dims
        check_tp(model.config, dims.tp, key="parallel.tp")
        mesh = parallel_mesh(dims.tp, shard_size, self.runtime.device.type)
        parallelize_internlm2(model, mesh["tp"])
        if dims.dp > 1:
            self.dp_group, _ = dist.new_subgroups_by_enumeration(
                [[d * dims.tp + t for d in range(dims.dp)] for t in range(dims.tp)])
        return mesh

    def _export_gathered(self, path: str, layout: str) -> None:
        """The HF export of a model whose parameters are DTensors: the full state gathered (every rank calls),
        written by rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from models.checkpoint import save_model

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dims.is_main:
            save_model(_FullModel(self.module.config, full), path, layout=layout)


class _Zero(_ShardedMode):
    stage: int

    def __init__(self, model: nn.Module, runtime: Runtime):
        super().__init__(model, runtime)
        self.zero = None        # built with the optimizer: ZeroDataParallel owns the (sharded) optimizer
        self.mesh = self._tensor_parallel(model, self.shard_size) if self.dims.tp > 1 else None

    def build_optimizer(self, make):
        from internlm_kernels.distributed import ZeroDataParallel

        if self.dims.dp == 1:       # one process, or tensor parallel only: FusedAdamW over the (DTensor) parameters
            return make(self.module.parameters())
        sharding = {"mesh": self.mesh} if self.mesh is not None else {"shard_size": self.shard_size}
        self.zero = ZeroDataParallel(self.module, stage=self.stage, overlap=self.dims.overlap, make_optimizer=make,
                                     **sharding)
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

    def model_state_dict(self) -> dict:
        return self.zero.state_dict() if self.zero is not None else super().model_state_dict()

    def load_model_state_dict(self, state: dict) -> None:
        if self.zero is None:
            return super().load_model_state_dict(state)
        self.zero.optimizer.refresh_masters()          # DCP filled the live tensors; the masters follow them

    def load_weights(self, state: dict) -> None:
        if self.zero is None:
            return super().load_weights(state)
        self.zero.load_state_dict(state)       # after the pending all-gathers, which would overwrite it; masters follow

    def reset_optimizer(self, optimizer) -> None:
        if self.zero is None:
            return super().reset_optimizer(optimizer)
        if optimizer.inner is not None:
            optimizer.inner.state.clear()
        optimizer.refresh_masters()

    def plain_model(self) -> nn.Module:
        if self.zero is not None:
            self.zero.wait_for_parameters()
        return super().plain_model()

    def export(self, path: str, layout: str) -> None:
        if self.zero is not None:
            self.zero.wait_for_parameters()
        if self.dims.tp > 1:
            return self._export_gathered(path, layout)
        super().export(path, layout)


@register_mode("zero1")
class Zero1(_Zero):
    """ZeRO stage 1: optimizer state (fp32 master + moments) sharded, gradient buffers kept for the run."""
    stage = 1


@register_mode("zero2")
class Zero2(_Zero):
    """ZeRO stage 2: also the reduced gradients sharded (full buffers freed after each reduce-scatter)."""
    stage = 2


@register_mode("fsdp")
class FullyShardedDataParallel(_ShardedMode):
    """FSDP2 (ZeRO-3): parameters, gradients and optimizer state sharded; one unit per block, explicit prefetch.
    FusedAdamW and clip_grad_norm_ run on the DTensor shards.

    With ``tp`` > 1 the model is first made tensor + sequence parallel over the "tp" dimension of a
    (replicate, shard, tp) mesh (internlm_kernels.distributed: wqkv split by KV group, vocabulary-parallel loss),
    then FSDP2 shards those DTensors over the data-parallel ranks (HSDP over ``shard_size`` of them): the 2-D
    layout of torchtitan. With tp = world size there is one data-parallel rank and no FSDP."""
    reshard_after_forward = True

    @classmethod
    def check_config(cls, parallel) -> None:
        if not parallel.overlap:
            raise ValueError("parallel.overlap: mode 'fsdp' always prefetches and overlaps its collectives (true)")

    def _shard_size(self) -> int | None:
        """Data-parallel ranks per shard group (None: all)."""
        return self.shard_size

    def __init__(self, model: nn.Module, runtime: Runtime):
        super().__init__(model, runtime)
        from internlm_kernels.distributed.fsdp import fsdp_mesh, fully_shard_blocks
        from models.tensor_parallel import internlm2_blocks

        if self.dims.tp > 1:
            from internlm_kernels.distributed.mesh import data_parallel_mesh

            mesh = self._tensor_parallel(model, self._shard_size())
            if self.dims.dp > 1:
                fully_shard_blocks(model, data_parallel_mesh(mesh), blocks=internlm2_blocks(model),
                                   reshard_after_forward=self.reshard_after_forward)
        elif self.dims.distributed:
            fully_shard_blocks(model, fsdp_mesh(self._shard_size(), runtime.device.type), blocks=internlm2_blocks(model),
                               reshard_after_forward=self.reshard_after_forward)

    def no_sync(self) -> contextlib.AbstractContextManager:
        if self.dims.dp == 1:
            return contextlib.nullcontext()
        from internlm_kernels.distributed.fsdp import no_sync

        return no_sync(self.module)

    def export(self, path: str, layout: str) -> None:
        if not self.dims.distributed:
            return super().export(path, layout)
        self._export_gathered(path, layout)


class ReplicatedTensorParallel(FullyShardedDataParallel):
    """Mode ``ddp`` with ``tp`` > 1: tensor parallel inside each data-parallel group, every data-parallel rank
    holding its group's full (tp-sharded) parameters and optimizer state, gradients all-reduced over the
    data-parallel ranks in the backward, block by block. Runs on FSDP2 with shard groups of one rank (HSDP whose
    shard dimension has size 1: nothing sharded, the all-reduce across replicas), because torch's DDP does not
    take DTensor parameters; the parameters stay gathered between forward and backward."""
    name = "ddp"
    reshard_after_forward = False

    def _shard_size(self) -> int | None:
        return 1
