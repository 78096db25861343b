"""Decode attention over a per-slot KV cache on CPU, float32: the extension's kernel (``_C.decode_attention_cpu``,
csrc/cpu/decode_attention_kernels.h) for the generator's CPU decode step (models/decode_step.py).

One new token per row b, its g query heads per KV head h against that slot's first ``seqlens_k[b]`` keys:
out[b, h, j] = softmax_t(scale · q[b, h, j]·k[b, h, t]) · v[b, h, t] over t < seqlens_k[b], in float32, each key and
value read once for the group's g heads. Per-row lengths replace the additive -inf mask the bmm form needs when rows
differ, and the result lands directly in the (B, Hkv·g·D) layout the output projection reads. The plain-torch
definition is ``reference.flash_attn_with_kvcache`` on the caches' (B, S, Hkv, D) view (``k_cache.transpose(1, 2)``)
with ``cache_seqlens=seqlens_k`` and q as (B, 1, Hkv·g, D) (query head h·g + j reads KV head h).

The kernel runs the ISA the packed attention kernels run (``cpu.attention.isa``: ATen's, so ATEN_CPU_CAPABILITY=avx2
runs it as an AVX2-only machine would), head dims 16, 32, 64, 128 (``runs``); the decode step keeps its bmm form
otherwise, and where the extension is not built.
"""
from __future__ import annotations

import torch

from .. import _ext
from .attention import HEAD_DIMS, isa


def runs(head_dim: int) -> bool:
    """Whether the kernel covers float32 caches of this head dim here (the extension built, a kernel for it)."""
    return head_dim in HEAD_DIMS and _ext.why_unavailable("cpu") is None


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
           out: torch.Tensor) -> None:
    if q.dim() != 4 or q.dtype != torch.float32 or q.device.type != "cpu" or q.stride(-1) != 1:
        raise ValueError(f"q must be a float32 CPU tensor (B, Hkv, g, D) with contiguous features, got "
                         f"{q.dtype} {tuple(q.shape)} on {q.device} with strides {q.stride()}")
    B, n_kv, g, D = q.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (c.dim() != 4 or c.dtype != torch.float32 or c.device.type != "cpu" or c.shape[0] < B
                or c.shape[1] != n_kv or c.shape[3] != D or c.stride(-1) != 1 or c.stride() != k_cache.stride()):
            raise ValueError(f"{name} must be a float32 CPU tensor (>= {B}, {n_kv}, S, {D}) with contiguous features "
                             f"and k_cache's strides, got {c.dtype} {tuple(c.shape)} on {c.device} with strides "
                             f"{c.stride()}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if (seqlens_k.shape != (B,) or seqlens_k.dtype != torch.int64 or seqlens_k.device.type != "cpu"
            or not seqlens_k.is_contiguous()):
        raise ValueError(f"seqlens_k must be a contiguous int64 CPU tensor ({B},), got {seqlens_k.dtype} "
                         f"{tuple(seqlens_k.shape)} on {seqlens_k.device}")
    if out.shape != (B, n_kv * g * D) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor ({B}, {n_kv * g * D}), got {out.dtype} "
                         f"{tuple(out.shape)}")
    if not runs(D):
        raise ValueError(f"no decode attention kernel for head dim {D} here (covered: {HEAD_DIMS}; extension: "
                         f"{_ext.why_unavailable('cpu') or 'built'})")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
                     scale: float, out: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """out (B, Hkv·g·D) of q (B, Hkv, g, D) over k_cache/v_cache (>= B, Hkv, S, D): row b sees its keys
    t < seqlens_k[b] (int64 (B,), each in [0, S]; a row with none gets 0). Any strides with contiguous features; rows
    b >= B of the caches are not read. Bad input raises ValueError naming the argument (the lengths are checked in
    the extension, without a pass over them here). ``check=False`` skips the checks of types, shapes and strides
    (~6 µs, as much as the kernel at one row): for a caller whose arguments are those of a checked call but for
    addresses, e.g. the decode step's later layers (every layer's caches are views of one tensor, q of one shape)."""
    B, n_kv, g, D = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    if out is None:
        out = torch.empty(B, n_kv * g * D, dtype=torch.float32)
    if check:
        _check(q, k_cache, v_cache, seqlens_k, out)
    threads = _ext.threads_for(B * n_kv * k_cache.shape[2] * D)
    if not _ext.load().decode_attention_cpu(
            (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), seqlens_k.data_ptr()),
            (B, n_kv, g, D, k_cache.shape[2]), q.stride()[:3], k_cache.stride()[:3], scale, isa(), threads):
        raise RuntimeError(f"decode_attention_cpu has no kernel for head dim {D}")     # runs() admits only those
    return out
