"""Hybrid ZeRO stage 1/2 with overlapped collectives on torch.distributed (NCCL on GPUs, gloo on CPU).

Parameters stay replicated for forward and backward; the optimizer state (stage 1) and the reduced gradients
(stage 2) are sharded over a *shard group* of ``shard_size`` ranks and replicated across the ``world /
shard_size`` groups (InternEvo shards within a node: its 7B run got 3625 tokens/GPU/s sharding over 8 ranks
against 2271 over all 1024).

Files: zero.py (hooks, collectives, step), zero_layout.py (buckets), zero_optimizer.py (FusedAdamW over the
shards, state dicts).

Layout. Parameters are packed, in forward use order, into flat buckets of about ``bucket_numel`` elements.
Each parameter is split along dim 0 into ``shard_size`` chunks of ceil(rows / shard_size) rows (torch.chunk's
split, the one DTensor's ``Shard(0)`` uses); a bucket is rank-major: shard r is the concatenation of chunk r of
each of its parameters (zero-padded to the common chunk length). So one collective per bucket moves every chunk
to its owner, and each rank's optimizer state of a parameter is exactly the ``Shard(0)`` local tensor of a DTensor
on the shard mesh: checkpoints go through torch.distributed.checkpoint and load into FSDP2, another shard size
or a single process (``state_dict``).

One optimizer step (``overlap=True``):
    backward, final micro-step: post-accumulate-grad hook adds p.grad into its bucket's flat gradient buffer
        (and frees p.grad); when the bucket's last gradient arrives, async reduce_scatter_tensor(bucket) over
        the shard group starts, so the reduction runs behind the rest of the backward. Across groups the
        reduced shard is then all-reduced (async, issued as soon as the reduce-scatter is seen complete).
    backward, other micro-steps (``no_sync()``): gradients only accumulate in the buffers; no communication.
    clip_grad_norm_: squared norm of the local gradient shards, one all_reduce over the shard group.
    step: FusedAdamW's multi-tensor kernel updates the fp32 master shard of every bucket (moments sharded),
        then async all_gather_into_tensor per bucket of the updated shard back into the full parameters.
    next forward: a forward pre-hook waits a bucket's gather right before the first module that uses it and
        copies the gathered chunks into the parameters, so gathers overlap the forward of earlier buckets.
``overlap=False`` runs the same collectives blocking (reduce-scatters after the backward, gathers inside step).

Stage 1 keeps the full gradient buffers allocated for the whole run (no reallocation); stage 2 frees each full
buffer once its reduce-scatter is done, so between the reduction and the next backward only the gradient shards
are held. Accumulation (several micro-steps per step) holds full buffers in both stages, as no communication
happens before the final micro-step.

Forward use order is the order in which modules owning parameters start in the forward right before the first
backward (an evaluation forward before training may take another path, e.g. through the output module instead
of the fused loss). A parameter whose module never runs (read directly by a parent, as InternLM2's loss reads
``output.weight``) is used by the nearest ancestor that runs, and its bucket is waited there. If the recorded order differs from the
order the buckets were built in, they are rebuilt before the first reduction (state moves with its parameter).

Tensor parallelism (``mesh``: a ``mesh.parallel_mesh`` with tp > 1, the model already ``parallelize_internlm2``-d
on ``mesh["tp"]``): the data-parallel ranks of one tensor-parallel position form the shard and replica groups, and
a tensor-parallel parameter takes part by its local shard, so every collective above runs among the ranks that
hold the same tp shard. Clipping adds the squared norms of tp-sharded parameters over the tp ranks (a second
all-reduce); norm weights, replicated over tp, count once. State dicts lay the parameters out as FSDP2 + TP does.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..optim import FusedAdamW
from ._collectives import all_gather_flat, reduce_scatter_flat
from .zero_layout import Bucket, Slot, local_tensor
from .zero_optimizer import ShardedAdamW

DEFAULT_BUCKET_NUMEL = 1 << 24    # 16M elements: 32 MB of bf16 gradients per reduce-scatter
STAGES = (1, 2)


@dataclass
class CollectiveEvent:
    """One entry of the recorded schedule: what happened (``kind``), to which bucket, where."""
    kind: str        # grad | reduce_scatter | all_reduce | backward_end | wait_reduce | step | all_gather |
    bucket: int      # wait_all_gather | use  (-1: not about one bucket)
    where: str = ""  # the parameter (grad) or module (wait_all_gather, use) concerned


@dataclass
class CollectiveSchedule:
    """Events in the order this rank issued them; filled only when ``ZeroDataParallel(record_schedule=True)``."""
    enabled: bool = False
    events: list[CollectiveEvent] = field(default_factory=list)

    def record(self, kind: str, bucket: int = -1, where: str = "") -> None:
        if self.enabled:
            self.events.append(CollectiveEvent(kind, bucket, where))

    def index(self, kind: str, bucket: int | None = None) -> list[int]:
        """Positions of the events of ``kind`` (and ``bucket``)."""
        return [i for i, e in enumerate(self.events) if e.kind == kind and (bucket is None or e.bucket == bucket)]


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class ZeroDataParallel(nn.Module):
    """Wraps ``module`` for hybrid ZeRO data parallelism; ``.optimizer`` is its sharded FusedAdamW.

    Use like DDP + an optimizer: ``with zero.no_sync():`` around non-final micro-steps, then
    ``zero.clip_grad_norm_(max_norm)`` (optional) and ``zero.optimizer.step()``. ``param_groups`` (or
    ``module.parameters()``) take FusedAdamW's options; a bucket never spans two groups.

    stage: 1 or 2 (see the module docstring). shard_size: ranks per shard group (divides the world; default the
    world). bucket_numel: target elements per bucket. overlap: issue collectives from hooks (True) or blocking
    after backward / inside step (False); the numbers are the same. grad_dtype: dtype of the gradient buffers
    and of the reduction (default the parameters' dtype). The data-parallel group is the whole world, or with
    ``mesh`` (an ``internlm_kernels.distributed.mesh.parallel_mesh``, instead of shard_size) its "replicate" x
    "shard" ranks, tensor parallel over "tp" (module docstring).
    make_optimizer: instead of keyword options, a callable (param groups -> FusedAdamW), e.g. a trainer's
    factory. record_schedule: keep a CollectiveSchedule of this rank's collectives in ``.schedule`` (tests).
    """

    def __init__(self, module: nn.Module, param_groups=None, *, stage: int = 2, shard_size: int | None = None,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL, overlap: bool = True, grad_dtype: torch.dtype | None = None,
                 record_schedule: bool = False, make_optimizer=None, mesh=None, **optimizer_options):
        super().__init__()
        if not dist.is_initialized():
            raise ValueError("ZeroDataParallel needs torch.distributed to be initialized (init_process_group)")
        if stage not in STAGES:
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        _check_int("bucket_numel", bucket_numel, 1)
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be a bool, got {overlap!r}")
        self.module = module
        self.stage, self.bucket_numel, self.overlap = stage, bucket_numel, overlap
        self.grad_dtype = grad_dtype
        self.schedule = CollectiveSchedule(enabled=record_schedule)

        named = list(module.named_parameters())
        self._names = {p: n for n, p in named}
        groups = list(param_groups) if param_groups is not None else [{"params": [p for _, p in named]}]
        if not groups or not all(isinstance(g, dict) for g in groups):
            groups = [{"params": groups}]
        self._group_of: dict[nn.Parameter, int] = {}
        self._group_options = []
        for i, g in enumerate(groups):
            for p in g["params"]:
                if p not in self._names:
                    raise ValueError("param_groups hold a parameter that is not in module")
                self._group_of[p] = i
            self._group_options.append({k: v for k, v in g.items() if k != "params"})
        # Frozen parameters stay plain replicated tensors: no bucket, no master, no weight decay.
        self._params = [p for _, p in named if p in self._group_of and p.requires_grad]
        if not self._params:
            raise ValueError("module has no parameter that requires grad")
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise ValueError(f"module's parameters must be on one device, got {sorted(map(str, devices))}")
        if mesh is not None and shard_size is not None:
            raise ValueError("pass shard_size or mesh (whose 'shard' dimension is the shard group), not both")
        self._build_groups(shard_size, devices.pop().type, mesh)
        if make_optimizer is not None and optimizer_options:
            raise ValueError("pass FusedAdamW options either as keywords or through make_optimizer, not both")
        self.optimizer = ShardedAdamW(self, make_optimizer or (lambda groups: FusedAdamW(groups, **optimizer_options)))

        self._owner = {}        # parameter -> the module that registers it
        self._parent = {}       # module -> parent module
        for m in module.modules():
            for p in m.parameters(recurse=False):
                self._owner.setdefault(p, m)
            for child in m.children():
                self._parent.setdefault(child, m)
        self._module_names = {m: n for n, m in module.named_modules()}
        self._fired: list[nn.Module] = []  # modules in the order they ran in the forward before the 1st backward
        self._order_final = False
        self._waits: dict[nn.Module, list[Bucket]] = {}
        self._sync = True
        self._in_backward = False
        self._reducing: list[Bucket] = []   # reduce-scatters whose cross-group all-reduce is not issued yet
        self._hooks = [m.register_forward_pre_hook(self._pre_forward) for m in module.modules()]
        self._hooks += [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]
        self._layout(list(self._params))

    # ------------------------------------------------------------------ groups and layout
    def _build_groups(self, shard_size, device_type: str, mesh) -> None:
        self.tp_group = None
        if mesh is not None:
            if tuple(mesh.mesh_dim_names or ()) != ("replicate", "shard", "tp"):
                raise ValueError(f"mesh must be a parallel_mesh (replicate, shard, tp), got dims {mesh.mesh_dim_names}")
            self.shard_size, self.n_replicas = mesh["shard"].size(), mesh["replicate"].size()
            self.world = self.shard_size * self.n_replicas
            self.shard, self.replica = mesh["shard"].get_local_rank(), mesh["replicate"].get_local_rank()
            self.mesh = mesh
            self.tp_group = mesh.get_group("tp") if mesh["tp"].size() > 1 else None
        else:
            world, rank = dist.get_world_size(), dist.get_rank()
            shard_size = world if shard_size is None else _check_int("shard_size", shard_size, 1)
            if world % shard_size:
                raise ValueError(f"shard_size ({shard_size}) must divide the data-parallel world size ({world})")
            self.world, self.shard_size, self.n_replicas = world, shard_size, world // shard_size
            self.shard, self.replica = rank % shard_size, rank // shard_size
            from torch.distributed.device_mesh import init_device_mesh

            # Rank = replica * shard_size + shard: a shard group is shard_size consecutive ranks (one node).
            self.mesh = init_device_mesh(device_type, (self.n_replicas, shard_size),
                                         mesh_dim_names=("replicate", "shard"))
        self.shard_group = self.mesh.get_group("shard")
        self.replicate_group = self.mesh.get_group("replicate") if self.n_replicas > 1 else None

    def placements_of(self, p: nn.Parameter) -> list:
        """The DTensor placements on ``self.mesh`` of this rank's shard of ``p``: Shard(0) over the shard group,
        replicated across groups; with tensor parallelism, the tp placement last, and a parameter already split
        on dim 0 by tp is split again inside its tp shard (_StridedShard, as FSDP2 + TP)."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.placement_types import _StridedShard

        if self.mesh.ndim == 2:
            return [Replicate(), Shard(0)]
        tp = p.placements[0] if isinstance(p, DTensor) else Replicate()
        split = _StridedShard(0, split_factor=self.mesh["tp"].size()) if tp.is_shard(0) else Shard(0)
        return [Replicate(), split, tp]

    def _tp_sharded(self, p: nn.Parameter) -> bool:
        """Whether ``p``'s gradient norm is spread over the tp ranks (a tensor-parallel shard)."""
        return self.tp_group is not None and isinstance(p, DTensor) and not p.placements[0].is_replicate()

    def _layout(self, order: list[nn.Parameter]) -> None:
        """(Re)build the buckets in ``order``; existing optimizer state moves with its parameter."""
        saved = self.optimizer._per_param_state() if getattr(self, "_buckets", None) else {}
        buckets, slots, size, group = [], [], 0, None
        S = self.shard_size

        def close():
            nonlocal slots, size
            if slots:
                buckets.append(Bucket(len(buckets), slots, group, size, S, self.shard,
                                       self.grad_dtype or slots[0].param.dtype))
            slots, size = [], 0

        for p in order:
            g = self._group_of[p]
            if slots and (g != group or p.dtype != slots[0].param.dtype or size * S >= self.bucket_numel
                          or self._tp_sharded(p) != self._tp_sharded(slots[0].param)):
                close()
            group = g
            local = local_tensor(p)
            rows = local.shape[0] if p.dim() else 1
            row_numel = local.numel() // rows if rows else 0
            chunk_rows = math.ceil(rows / S)
            slots.append(Slot(self._names[p], p, size, chunk_rows, row_numel))
            size += chunk_rows * row_numel
        close()
        self._buckets = buckets
        self._slot_of = {s.param: (b, s) for b in buckets for s in b.slots}
        self.optimizer._rebuild(saved)

    def _finalize_order(self) -> None:
        """At the first backward: forward use order, the wait points, and a relayout if the order changed."""
        self._order_final = True
        users = {}
        for p in self._params:
            m = self._owner[p]
            while m not in self._fired and m in self._parent:
                m = self._parent[m]
            users[p] = m
        rank = {m: i for i, m in enumerate(self._fired)}
        unused = len(rank)
        order = sorted(self._params, key=lambda p: rank.get(users[p], unused))  # stable: registration order ties
        if [id(p) for p in order] != [id(s.param) for b in self._buckets for s in b.slots]:
            self._layout(order)
        self._waits = {}
        for b in self._buckets:
            for m in dict.fromkeys(users[s.param] for s in b.slots):
                self._waits.setdefault(m, []).append(b)

    @property
    def buckets(self) -> list[list[str]]:
        """Parameter names of each bucket, in bucket order."""
        return [[s.name for s in b.slots] for b in self._buckets]

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        """The wrapped module's state dict (its own names), after every pending all-gather."""
        self.wait_for_parameters()
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load the wrapped module's parameters; the optimizer's masters follow on optimizer.load_state_dict."""
        self.wait_for_parameters()
        result = self.module.load_state_dict(state_dict, strict=strict, assign=assign)
        self.optimizer.refresh_masters()
        return result

    @contextlib.contextmanager
    def no_sync(self):
        """Micro-steps inside only accumulate gradients (no communication), as DDP's no_sync."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _pre_forward(self, module: nn.Module, args) -> None:
        if not self._order_final:
            if module is self.module:
                self._fired.clear()    # the order is the one of the forward right before the first backward
            if module not in self._fired:
                self._fired.append(module)
            return
        for b in self._waits.get(module, ()):
            if b.gather_work is not None or b.gather_flat is not None:
                self._wait_gather(b, self._module_names[module])
            self.schedule.record("use", b.index, self._module_names[module])

    def _wait_gather(self, b: Bucket, where: str) -> None:
        if b.gather_work is not None:
            b.gather_work.wait()
            b.gather_work = None
        self.schedule.record("wait_all_gather", b.index, where)
        with torch.no_grad():
            b.copy_out()

    def wait_for_parameters(self) -> None:
        """Finish every pending all-gather: call before reading parameters outside a forward (saving, eval)."""
        for b in self._buckets:
            if b.gather_work is not None or b.gather_flat is not None:
                self._wait_gather(b, "wait_for_parameters")

    # ------------------------------------------------------------------ backward
    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._in_backward:
            self._in_backward = True
            if not self._order_final:
                self._finalize_order()
            self.wait_for_parameters()   # a parameter no forward touched may still be gathering
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        b, slot = self._slot_of[p]
        with torch.no_grad():
            grad = p.grad
            if isinstance(grad, DTensor):     # tensor parallel: this rank's shard, laid out like the parameter
                if grad.placements != p.placements:
                    grad = grad.redistribute(p.device_mesh, p.placements)
                grad = grad.to_local()
            b.add_grad(slot, grad)
        p.grad = None
        self.schedule.record("grad", b.index, slot.name)
        b.arrived += 1
        if b.arrived == b.n_grads and self._sync and self.overlap:
            self._reduce(b)
        self._progress()

    def _on_backward_end(self) -> None:
        self._in_backward = False
        self.schedule.record("backward_end")
        for b in self._buckets:
            b.arrived = 0

    def _reduce(self, b: Bucket) -> None:
        """Start the reduce-scatter of a bucket's gradients (pre-divided by the world: the mean over ranks)."""
        if b.grad_flat is None:   # no gradient reached this bucket on this rank: it still takes part
            b.grad_flat = torch.zeros(b.numel, dtype=b.grad_dtype, device=b.device)
        b.grad_flat.div_(self.world)
        b.grad_shard = torch.empty(b.shard_numel, dtype=b.grad_dtype, device=b.device)
        b.reduce_work = reduce_scatter_flat(b.grad_shard, b.grad_flat, group=self.shard_group, async_op=True)
        if self.replicate_group is not None:
            self._reducing.append(b)
        self.schedule.record("reduce_scatter", b.index)

    def _progress(self) -> None:
        """Across shard groups: all-reduce each reduced shard as soon as its reduce-scatter is seen done."""
        if self.replicate_group is None:
            return
        while self._reducing and self._reducing[0].reduce_work.is_completed():   # they complete in issue order
            self._all_reduce(self._reducing.pop(0))

    def _all_reduce(self, b: Bucket) -> None:
        if b in self._reducing:
            self._reducing.remove(b)
        b.reduce_work.wait()
        b.all_reduce_work = dist.all_reduce(b.grad_shard, group=self.replicate_group, async_op=True)
        self.schedule.record("all_reduce", b.index)

    def finish_gradient_reduction(self) -> None:
        """Start what is not started (overlap off, buckets without gradients), wait for every reduction."""
        for b in self._buckets:
            if b.grad_shard is None and b.reduce_work is None:
                self._reduce(b)
        for b in self._buckets:
            if b.reduce_work is None and b.all_reduce_work is None:
                continue
            if self.replicate_group is not None and b.all_reduce_work is None:
                self._all_reduce(b)
            work = b.all_reduce_work or b.reduce_work
            work.wait()
            self.schedule.record("wait_reduce", b.index)
            b.reduce_work = b.all_reduce_work = None
            if self.stage == 2:
                b.grad_flat = None
            else:
                b.grad_flat.zero_()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def scale_gradients_(self, factor: torch.Tensor | float) -> None:
        """Multiply the reduced gradient shards by ``factor`` (e.g. ranks / global target count, on the device)."""
        self.finish_gradient_reduction()
        shards = [b.grad_shard for b in self._buckets]
        torch._foreach_mul_(shards, factor.to(shards[0].dtype) if isinstance(factor, torch.Tensor) else factor)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the reduced gradients to a global L2 norm ``max_norm``; returns the norm before clipping (float32
        scalar on the device). One all-reduce of the squared local norm over the shard group (and with tensor
        parallelism one over the tp ranks of the tp-sharded parameters' part)."""
        if float(norm_type) != 2.0:
            raise NotImplementedError(f"norm_type={norm_type}: ZeroDataParallel clips by the L2 norm only")
        self.finish_gradient_reduction()
        shards = [b.grad_shard for b in self._buckets]

        def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
            if not tensors:
                return torch.zeros((), dtype=torch.float32, device=shards[0].device)
            return torch.stack([n.float() for n in torch._foreach_norm(tensors)]).square().sum()

        if self.tp_group is None:
            squares = sum_of_squares(shards)
            dist.all_reduce(squares, group=self.shard_group)
        else:   # buckets never mix tp-sharded and tp-replicated parameters (_layout)
            sharded = [self._tp_sharded(b.slots[0].param) for b in self._buckets]
            parts = torch.stack([sum_of_squares([g for g, s in zip(shards, sharded) if s]),
                                 sum_of_squares([g for g, s in zip(shards, sharded) if not s])])
            dist.all_reduce(parts, group=self.shard_group)
            dist.all_reduce(parts[:1], group=self.tp_group)
            squares = parts.sum()
        total = squares.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(shards, coef.to(shards[0].dtype))
        return total

    @torch.no_grad()
    def _step(self) -> None:
        self.finish_gradient_reduction()
        for b in self._buckets:
            b.master.grad = b.grad_shard if b.grad_shard.dtype == torch.float32 else b.grad_shard.float()
        self.schedule.record("step")
        self.optimizer.inner.step()
        for b in self._buckets:
            b.master.grad = None
            b.grad_shard = None
            send = b.master if b.dtype == torch.float32 else b.master.to(b.dtype)
            b.gather_flat = torch.empty(b.numel, dtype=b.dtype, device=b.device)
            b.gather_work = all_gather_flat(b.gather_flat, send, group=self.shard_group,
                                                        async_op=True)
            self.schedule.record("all_gather", b.index)
            if not self.overlap:
                self._wait_gather(b, "step")
