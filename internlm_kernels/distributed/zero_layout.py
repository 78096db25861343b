"""The flat bucket layout of ZeroDataParallel: each parameter split along dim 0 into ``n_shards`` chunks of
ceil(rows / n_shards) rows (torch.chunk's split, DTensor's ``Shard(0)``); a bucket is rank-major, shard r holding
chunk r of each of its parameters, zero-padded to a common chunk length. So one reduce-scatter / all-gather per
bucket moves every chunk to / from its owner, and a rank's piece of a parameter is the local tensor of a
``Shard(0)`` DTensor.

A tensor-parallel parameter (a DTensor on the tp mesh) is laid out by its local tp shard: ZeRO shards what this
rank's tensor-parallel position holds, as FSDP2 does on a 2-D mesh."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """A DTensor parameter's local (tensor-parallel) shard, its storage itself; any other tensor unchanged."""
    if isinstance(p, DTensor):
        with torch.no_grad():
            return p.to_local()
    return p


@dataclass
class Slot:
    """One parameter inside a bucket: its chunks sit at ``offset`` of every rank's shard."""
    name: str
    param: nn.Parameter
    offset: int          # start inside a shard
    chunk_rows: int      # ceil(rows / shard_size)
    row_numel: int       # elements per row (1 for a vector)

    @property
    def tensor(self) -> torch.Tensor:
        """What this rank holds of the parameter (the local shard of a tensor-parallel DTensor)."""
        return local_tensor(self.param)

    @property
    def rows(self) -> int:
        return self.tensor.shape[0] if self.param.dim() else 1

    @property
    def chunk_numel(self) -> int:
        return self.chunk_rows * self.row_numel

    def local_rows(self, shard: int) -> tuple[int, int]:
        """The rows [start, stop) of this parameter owned by ``shard`` (possibly empty)."""
        start = min(shard * self.chunk_rows, self.rows)
        return start, min(start + self.chunk_rows, self.rows)

    def local_view(self, shard_tensor: torch.Tensor, shard: int) -> torch.Tensor:
        """The valid rows of this parameter's chunk inside a shard-sized flat tensor, shaped like the rows."""
        start, stop = self.local_rows(shard)
        n = (stop - start) * self.row_numel
        return shard_tensor[self.offset:self.offset + n].view(stop - start, *self.tensor.shape[1:])

    def chunks(self, flat: torch.Tensor, n_shards: int, shard_numel: int) -> tuple:
        """(full, full_src_rows, tail, tail_rows): views of a rank-major bucket tensor holding this parameter's
        chunks; ``full`` covers the shards with complete chunks, ``tail`` the one partial chunk (or None)."""
        grid = flat.view(n_shards, shard_numel)[:, self.offset:self.offset + self.chunk_numel]
        grid = grid.view(n_shards, self.chunk_rows, self.row_numel)
        complete = self.rows // self.chunk_rows
        left = self.rows - complete * self.chunk_rows
        tail = grid[complete, :left] if left else None
        return grid[:complete], complete * self.chunk_rows, tail, left


class Bucket:
    """Parameters reduced and gathered together: the full gradient buffer, the reduced gradient shard, the fp32
    master shard the optimizer updates, the gather buffer, and the collectives in flight."""

    def __init__(self, index: int, slots: list[Slot], group_index: int, shard_numel: int, n_shards: int,
                 shard: int, grad_dtype: torch.dtype):
        self.index = index
        self.slots = slots
        self.group_index = group_index
        self.shard_numel = shard_numel
        self.n_shards = n_shards
        self.shard = shard
        p = slots[0].param
        self.dtype, self.device, self.grad_dtype = p.dtype, p.device, grad_dtype
        self.n_grads = sum(s.param.requires_grad for s in slots)
        self.master = torch.zeros(shard_numel, dtype=torch.float32, device=self.device)   # fp32 master shard
        with torch.no_grad():
            for s in slots:
                s.local_view(self.master, shard).copy_(rows_of(s.tensor, *s.local_rows(shard)))
        self.grad_flat: torch.Tensor | None = None   # full gradient buffer (n_shards * shard_numel)
        self.grad_shard: torch.Tensor | None = None  # the reduced local shard
        self.arrived = 0
        self.reduce_work = None
        self.all_reduce_work = None
        self.gather_flat: torch.Tensor | None = None
        self.gather_work = None

    @property
    def numel(self) -> int:
        return self.n_shards * self.shard_numel

    def add_grad(self, slot: Slot, grad: torch.Tensor) -> None:
        if self.grad_flat is None:
            self.grad_flat = torch.zeros(self.numel, dtype=self.grad_dtype, device=self.device)
        full, n_full_rows, tail, left = slot.chunks(self.grad_flat, self.n_shards, self.shard_numel)
        g = grad.reshape(slot.rows, slot.row_numel)
        full.add_(g[:n_full_rows].view(full.shape))
        if tail is not None:
            tail.add_(g[n_full_rows:n_full_rows + left])

    def copy_out(self) -> None:
        """Gathered flat parameters -> each parameter's rows."""
        for slot in self.slots:
            full, n_full_rows, tail, left = slot.chunks(self.gather_flat, self.n_shards, self.shard_numel)
            p = slot.tensor.detach().view(slot.rows, slot.row_numel)
            p[:n_full_rows].view(full.shape).copy_(full)
            if tail is not None:
                p[n_full_rows:n_full_rows + left].copy_(tail)
        self.gather_flat = None


def rows_of(p: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of ``p`` along dim 0 (a 0-d tensor counts as one row), detached."""
    return p.detach().reshape(p.shape[0] if p.dim() else 1, -1)[start:stop].reshape(stop - start, *p.shape[1:])
