"""Rotary embedding: drop-in for flash_attn.layers.rotary.apply_rotary_emb."""
from __future__ import annotations

from .. import reference
from .._checks import FLOAT_DTYPES, check_cu_seqlens, check_tensor
from ..backend import choose


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3 if cu_seqlens is not None else 4)
    check_tensor("cos", cos, dtypes=FLOAT_DTYPES, ndim=2, device=x.device)
    check_tensor("sin", sin, dtypes=FLOAT_DTYPES, ndim=2, device=x.device)
    if cos.shape != sin.shape:
        raise ValueError(f"cos shape {tuple(cos.shape)} differs from sin shape {tuple(sin.shape)}")
    if 2 * cos.shape[1] > x.shape[-1]:
        raise ValueError(f"rotary dim 2*{cos.shape[1]} exceeds head dim {x.shape[-1]}")
    if cu_seqlens is not None:
        check_cu_seqlens("cu_seqlens", cu_seqlens, x.shape[0], x.device)
    choose("rotary", x.device)
    out = reference.apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens)
    if inplace:
        x.copy_(out)
        return x
    return out
