"""The optimizer face of ZeroDataParallel (zero.py): FusedAdamW over each bucket's fp32 master shard, and the
per-parameter state dict in torch.distributed.checkpoint's layout."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..optim import FusedAdamW
from .zero_layout import Bucket, rows_of

if TYPE_CHECKING:
    from .zero import ZeroDataParallel


class ShardedAdamW:
    """The optimizer face of ZeroDataParallel: FusedAdamW over the fp32 master shards of the buckets.

    ``param_groups`` are FusedAdamW's (a schedule sets ``lr`` there); ``state_dict`` is per parameter name, in
    the layout of torch.distributed.checkpoint.state_dict.get_optimizer_state_dict (moments and fp32 masters as
    DTensors sharded on dim 0 over the shard mesh), so it saves and loads with DCP across layouts.
    """

    def __init__(self, owner: ZeroDataParallel, make):
        self.owner = owner
        self.make = make
        self.inner: FusedAdamW | None = None

    def _rebuild(self, saved: dict) -> None:
        owner = self.owner
        groups = []
        for i, extra in enumerate(owner._group_options):
            masters = [b.master for b in owner._buckets if b.group_index == i]
            if masters:
                groups.append({"params": masters, **extra})
        lrs = [g["lr"] for g in self.inner.param_groups] if self.inner is not None else None
        self.inner = self.make(groups)
        if lrs is not None:
            for g, lr in zip(self.inner.param_groups, lrs):
                g["lr"] = lr
        for b in owner._buckets:
            state = self._bucket_state(b)
            for s in b.slots:
                if s.param in saved:
                    for key, value in saved[s.param].items():
                        if key == "step":
                            state["step"].copy_(value)
                        else:
                            s.local_view(state[key] if key != "master" else b.master, owner.shard).copy_(value)

    def _bucket_state(self, b: Bucket) -> dict:
        """FusedAdamW's state of a bucket's master shard, created (zeros, step 0) if the optimizer has not run."""
        state = self.inner.state[b.master]
        state.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
        group = next(g for g in self.inner.param_groups if any(m is b.master for m in g["params"]))
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq"):
            state.setdefault(key, torch.zeros_like(b.master))
        return state

    def _per_param_state(self) -> dict:
        out = {}
        for b in self.owner._buckets:
            state = self._bucket_state(b)
            for s in b.slots:
                entry = {k: s.local_view(v, self.owner.shard).clone() for k, v in state.items() if k != "step"}
                entry["master"] = s.local_view(b.master, self.owner.shard).clone()
                entry["step"] = state["step"].clone()
                out[s.param] = entry
        return out

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("closure: ZeroDataParallel's optimizer takes no closure")
        self.owner._step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients live in the buckets and are consumed by step(); parameters hold none between steps."""
        for p in self.owner._params:
            p.grad = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """{"state": {name: {"step", "exp_avg", "exp_avg_sq"[, "master_param"]}}, "param_groups": [...]}; the
        tensors are DTensor views of the live shards (loading into them with DCP writes the optimizer state), laid
        out as FSDP2 lays out the same parameters (with tensor parallelism: its 2-D layout)."""
        from torch.distributed.tensor import DTensor

        owner = self.owner
        state, groups = {}, [dict(g, params=[]) for g in self.inner.param_groups]
        group_pos = {id(m): gi for gi, g in enumerate(self.inner.param_groups) for m in g["params"]}
        for b in owner._buckets:
            bstate = self._bucket_state(b)
            for s in b.slots:
                p = s.param
                views = {k: v for k, v in bstate.items() if k != "step"}
                if p.dtype != torch.float32:
                    views["master_param"] = b.master
                entry = {"step": bstate["step"]}
                for key, value in views.items():
                    entry[key] = DTensor.from_local(s.local_view(value, owner.shard), owner.mesh,
                                                    owner.placements_of(p), run_check=False, shape=p.shape,
                                                    stride=p.stride())
                state[s.name] = entry
                groups[group_pos[id(b.master)]]["params"].append(s.name)
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """fp32 master shards <- the parameters (after the parameters were loaded)."""
        owner = self.owner
        owner.wait_for_parameters()
        for b in owner._buckets:
            for s in b.slots:
                s.local_view(b.master, owner.shard).copy_(rows_of(s.tensor, *s.local_rows(owner.shard)))

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state in ``state_dict``'s layout (tensors may be DTensors of any sharding or plain full tensors,
        e.g. from a single process or FSDP2 after DCP has filled them). Without ``master_param`` the fp32
        masters come from the parameters."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        owner = self.owner
        owner.wait_for_parameters()
        for gi, g in enumerate(state_dict["param_groups"]):
            for key, value in g.items():
                if key != "params" and gi < len(self.inner.param_groups):
                    self.inner.param_groups[gi][key] = value
        for b in owner._buckets:
            bstate = self._bucket_state(b)
            for s in b.slots:
                entry = state_dict["state"].get(s.name, {})
                start, stop = s.local_rows(owner.shard)
                if "master_param" not in entry:
                    s.local_view(b.master, owner.shard).copy_(rows_of(s.tensor, start, stop))
                for key, value in entry.items():
                    if key == "step":
                        bstate["step"].copy_(value)
                        continue
                    target = b.master if key == "master_param" else bstate.get(key)
                    if target is None:
                        continue
                    local = s.local_view(target, owner.shard)
                    if isinstance(value, DTensor) and value._local_tensor.data_ptr() == local.data_ptr():
                        continue      # DCP loaded straight into our view
                    full = value.full_tensor() if isinstance(value, DTensor) else value
                    if isinstance(s.param, DTensor):   # this rank's tensor-parallel part, sliced locally
                        full = distribute_tensor(full, s.param.device_mesh, s.param.placements,
                                                 src_data_rank=None).to_local()
                    local.copy_(rows_of(full, start, stop))
