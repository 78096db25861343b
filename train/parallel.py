"""The parallelism seam: how a model is spread over the ranks, and everything that depends on it.

A stage never touches DDP, shards or process groups. The ``Trainer`` asks one ``Parallel`` object (built by
``parallelize(model, dims)`` from the ``[parallel]`` config section) for:
    model                  the module the loss function calls (a DDP wrapper, an FSDP-sharded module, ...)
    module                 the plain model underneath (evaluation, generation, export)
    build_optimizer(make)  the optimizer over what this rank updates (all parameters; a shard under ZeRO)
    no_sync()              a context for micro-batches whose gradients are not communicated yet
    all_reduce_(t)         sum a device tensor over the data-parallel ranks (loss sums, target counts)
    plain_model()          a full, unsharded copy when the mode shards the model (generation), else the module
    finish_gradients(n)    after the last backward: turn whatever gradient the mode holds into the gradient of
                           (sum of the global batch's losses) / n, n a device tensor (no host read)
    clip_grad_norm_(c)     the global gradient norm (a device tensor), gradients clipped to ``c``
    state_dict / load_state_dict   model + optimizer state for torch.distributed.checkpoint (sharded or not),
                           so a checkpoint saved on N ranks loads on M
    export(path, layout)   a transformers-loadable safetensors directory of the full model

Adding a mode (ZeRO-1/2, FSDP2, tensor parallelism) = one subclass of ``Parallel`` registered with
``@register_mode("name")``; ``ParallelConfig`` already carries its keys (``shard_size``, ``tp``, ``overlap``) and
``check_config`` lets each mode refuse the values it does not support before any work starts.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import torch
import torch.distributed as dist
from torch import nn

import internlm_kernels as ik


@dataclass(frozen=True)
class ParallelDims:
    """The ranks of a run and how the parallel config splits them."""
    mode: str = "ddp"
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    tp: int = 1              # tensor-parallel degree
    shard_size: int = 0      # data-parallel ranks one optimizer/parameter state is sharded over (ZeRO/FSDP); 0 = all
    overlap: bool = True     # overlap gradient communication with backward

    @property
    def dp(self) -> int:
        """Data-parallel degree."""
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: the tp ranks of one group (consecutive ranks) share the same data."""
        return self.rank // self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    dims: ParallelDims = field(default_factory=ParallelDims)

    @property
    def rank(self) -> int:
        return self.dims.rank

    @property
    def world(self) -> int:
        return self.dims.world

    @property
    def is_main(self) -> bool:
        return self.dims.is_main

    @property
    def distributed(self) -> bool:
        return self.dims.distributed


def init_runtime(run, parallel) -> Runtime:
    """Device, dtype and (under torchrun) the process group: NCCL on CUDA, gloo on CPU. ``run`` is a RunConfig
    (or the PPO stage's, which has no ``dtype``: bf16 on CUDA, fp32 on CPU), ``parallel`` a ParallelConfig."""
    if run.threads:
        torch.set_num_threads(run.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device = 'cuda' but no CUDA device is available")
    use_cuda = run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(getattr(run, "dtype", "auto"))
    if dtype is None:
        dtype = torch.bfloat16 if use_cuda else torch.float32
    dims = ParallelDims(parallel.mode, world, rank, local_rank, parallel.tp, parallel.shard_size, parallel.overlap)
    MODES[dims.mode].check_dims(dims)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(device, dtype, dims)


def barrier(dims: ParallelDims) -> None:
    if dims.distributed:
        dist.barrier()


def plain_copy(model: nn.Module) -> nn.Module:
    """``model`` when it holds its parameters as plain tensors; else (FSDP, tensor parallel: DTensor parameters)
    an unsharded copy of the model's own class built from the gathered full state (collective: every rank calls).
    Generation runs on it: a decoding step of a sharded model would be a collective forward whose shapes the
    sharding plan does not take (one token per sequence, a KV cache of all heads)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model
    from torch.distributed.fsdp import FSDPModule

    from internlm_kernels.distributed.tensor_parallel import full_state_dict

    state = full_state_dict(model)
    # The model's own class: FSDP2 swaps the module's class for a subclass of (FSDPModule, the class).
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        copy = cls(model.config)
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.eval()


# ---------------------------------------------------------------------------------------------------------------
# Modes


MODES: dict[str, type["Parallel"]] = {}


def register_mode(name: str):
    def add(cls):
        cls.name = name
        MODES[name] = cls
        return cls
    return add


def parallelize(model: nn.Module, runtime: Runtime) -> "Parallel":
    """Place ``model`` (already on ``runtime.device``) on the ranks as ``runtime.dims.mode`` says."""
    return MODES[runtime.dims.mode].implementation(runtime.dims)(model, runtime)


class Parallel:
    """One way to spread a model over the ranks. Subclasses override what differs; the defaults are those of a
    model whose every rank holds the full parameters and full optimizer state (one process, or DDP)."""
    name: ClassVar[str]

    @classmethod
    def check_config(cls, parallel) -> None:
        """Raise ValueError naming the ``parallel.*`` key this mode cannot run (called at config load)."""

    @classmethod
    def check_dims(cls, dims: ParallelDims) -> None:
        """Raise ValueError when the world size does not fit this mode (called when the ranks are known)."""
        if dims.world % dims.tp:
            raise ValueError(f"parallel.tp ({dims.tp}) must divide the world size ({dims.world})")

    @classmethod
    def implementation(cls, dims: ParallelDims) -> type["Parallel"]:
        """The class that runs this mode at these dims (a mode may run tensor parallelism through another)."""
        return cls

    def __init__(self, model: nn.Module, runtime: Runtime):
        self.module, self.runtime, self.dims = model, runtime, runtime.dims
        self.model: nn.Module = model
        self.dp_group = None     # the process group of the data-parallel ranks (None: the whole world)

    def build_optimizer(self, make: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]):
        return make(self.module.parameters())

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def all_reduce_(self, t: torch.Tensor, max: bool = False) -> torch.Tensor:
        """Sum (``max``: the maximum of) ``t`` over the data-parallel ranks, in place."""
        if self.dims.dp > 1:     # the tp ranks of a data-parallel group already hold the same sums
            dist.all_reduce(t, op=dist.ReduceOp.MAX if max else dist.ReduceOp.SUM, group=self.dp_group)
        return t

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.module.parameters() if p.grad is not None]

    def finish_gradients(self, total_targets: torch.Tensor) -> None:
        """The default for modes that average gradients over the data-parallel ranks (DDP, and one process): the
        gradients hold mean over ranks of each rank's summed loss, so times dp / n is the global token mean.
        (A multiply by dp / n, not a divide by n: with dp a power of two, 1 rank and dp ranks round alike.)"""
        from torch.distributed.tensor import DTensor

        grads = [g.to_local() if isinstance(g, DTensor) else g for g in self._grads()]   # tensor parallel / FSDP
        if grads:
            torch._foreach_mul_(grads, (self.dims.dp / total_targets).to(grads[0].dtype))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        return ik.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """{"model": ..., "optimizer": ...} keyed by parameter name, for torch.distributed.checkpoint."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def load_state_dict(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def model_state_dict(self) -> dict:
        """The model's state alone, keyed by parameter name, for torch.distributed.checkpoint (a model trained
        without carrying its optimizer across checkpoints: the refreshed reward model)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module)

    def load_model_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, state)

    def load_weights(self, state: dict) -> None:
        """Copy a state dict of the same layout (e.g. another model sharded alike) into the module."""
        self.module.load_state_dict(state)

    def reset_optimizer(self, optimizer) -> None:
        """Fresh optimizer state: moments from zero, fp32 masters from the current parameters (FusedAdamW creates
        its state lazily at the next step)."""
        optimizer.state.clear()

    def plain_model(self) -> nn.Module:
        """The model as plain tensors that one rank alone can run (generation): ``plain_copy(module)``
        (collective under FSDP and tensor parallelism: every rank calls)."""
        return plain_copy(self.module)

    def export(self, path: str, layout: str) -> None:
        """The model's ``save_pretrained(path, layout=...)`` by rank 0 (every rank holds the full model)."""
        if self.dims.is_main:
            self.module.save_pretrained(path, layout=layout)


@register_mode("ddp")
class DataParallel(Parallel):
    """Every rank holds the full model and optimizer; DDP all-reduces (averages) gradients in buckets during
    the backward of the last micro-batch of a step. With ``tp`` > 1 every data-parallel rank holds the full
    model of its tp group: parallel_sharded.ReplicatedTensorParallel (torch's DDP does not take the DTensor
    parameters of tensor parallelism)."""

    @classmethod
    def implementation(cls, dims: ParallelDims) -> type[Parallel]:
        if dims.tp > 1:
            from train.parallel_sharded import ReplicatedTensorParallel

            return ReplicatedTensorParallel
        return cls

    @classmethod
    def check_config(cls, parallel) -> None:
        if parallel.shard_size != 0:
            raise ValueError(f"parallel.shard_size: mode 'ddp' shards nothing (0), got {parallel.shard_size}")
        if not parallel.overlap:
            raise ValueError("parallel.overlap: mode 'ddp' always overlaps its all-reduce with backward (true)")

    def __init__(self, model: nn.Module, runtime: Runtime):
        super().__init__(model, runtime)
        if self.dims.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.model.no_sync() if self.dims.distributed else contextlib.nullcontext()


from train import parallel_sharded  # noqa: E402,F401  (registers the zero1, zero2 and fsdp modes)
