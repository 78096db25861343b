"""Viewing tensors as the (rows, features) matrices the row-wise kernels index with one row stride."""
from __future__ import annotations

import torch


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (M, N) rows over its last dim with a contiguous last dim: a view when possible, else a copy."""
    if t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])   # skipped for 2-D input: a reshape to the same shape still costs ~1 µs
    return t if t.stride()[-1] == 1 or t.shape[-1] == 1 else t.contiguous()   # .stride()[-1]: cheaper than .stride(-1)
