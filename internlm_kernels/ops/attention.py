"""Variable-length flash attention: drop-in for flash_attn.flash_attn_varlen_func / flash_attn_func."""
from __future__ import annotations

import torch

from .. import reference
from .._checks import FLOAT_DTYPES, check_cu_seqlens, check_same_dtype, check_tensor
from ..backend import choose


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False):
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=3, device=q.device)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=3, device=q.device)
    check_same_dtype("k", k, "q", q)
    check_same_dtype("v", v, "q", q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head dim {q.shape[2]} differs from k head dim {k.shape[2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"number of query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    if dropout_p != 0.0:
        raise NotImplementedError("dropout_p > 0 is not supported (InternLM2 trains without attention dropout)")
    choose("attention", q.device)
    out, lse = reference.flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                                           tuple(window_size), softcap, alibi_slopes)
    if return_attn_probs:
        return out, lse, None
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """(B, S, H, D) attention, as flash_attn.flash_attn_func; runs the varlen kernel on equal-length sequences."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=4, device=q.device)
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    cu_q = torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (B + 1) * Sk, Sk, dtype=torch.int32, device=q.device)
    res = flash_attn_varlen_func(q.reshape(B * Sq, Hq, D), k.reshape(B * Sk, *k.shape[2:]),
                                 v.reshape(B * Sk, *v.shape[2:]), cu_q, cu_k, Sq, Sk, dropout_p, softmax_scale,
                                 causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
    if return_attn_probs:
        out, lse, _ = res
        return out.reshape(B, Sq, Hq, D), lse.reshape(Hq, B, Sq).transpose(0, 1), None
    return res.reshape(B, Sq, Hq, D)
