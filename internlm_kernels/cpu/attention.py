"""Attention over packed documents on CPU, float32: the extension's blocked kernels (``_C.attention_cpu``,
csrc/cpu/attention_kernels.h) as an autograd Function, for the cpu attention backend.

ATen's CPU flash kernel (what torch SDPA runs, and what the cpu backend called per document before) ran the tiny
preset's head_dim 32 at ~40 GFLOP/s here, a third to a half of what a core does in a GEMM: its inner products
reduce over 32 features. These kernels pack Kᵀ (and Vᵀ in the backward) into 32-key panels and hold a tile of
rows × 32 keys of scores (or rows × head_dim outputs) in vector registers; a document's scores for a block of 32
queries are materialized, causal blocks stop at their diagonal, and the backward runs one task per (document, KV
head) over its group's query heads, so GQA reads K/V without repeating them and dK/dV have one writer. Math and
layout in the C++ file's header; benchmarks/bench_attention.py times it against ATen's flash kernel.

The kernels run the widest ISA (AVX-512, AVX2, baseline) that both the CPU has and ATen dispatches to, so a run
under ATEN_CPU_CAPABILITY=avx2 runs them as an AVX2-only machine would. They cover float32 and head dims 16, 32, 64,
128 (``runs``); other calls keep the per-document SDPA path (ops/attention_cpu.py, which also puts both inside one
custom op under torch.compile).
"""
from __future__ import annotations

import functools

import torch

from .. import _ext

DTYPES = (torch.float32,)
HEAD_DIMS = (16, 32, 64, 128)
_ISA_CODES = {"AVX512": 2, "AVX2": 1}


@functools.cache
def isa() -> int:
    """The widest ISA the kernels may use: ATen's (ATEN_CPU_CAPABILITY, or the CPU's best), as _C's code."""
    return _ISA_CODES.get(torch.backends.cpu.get_cpu_capability(), 0)


def runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernels compute this call: float32 plain tensors with a covered head dim, and the extension
    built."""
    return (q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS and type(q) is torch.Tensor and type(k) is torch.Tensor
            and type(v) is torch.Tensor and _ext.why_unavailable("cpu") is None)


def _threads(q: torch.Tensor) -> int:
    return _ext.threads_for(q.numel())


def _launch(addresses, q: torch.Tensor, k: torch.Tensor, n_seqs: int, scale: float, causal: bool,
            backward: bool) -> None:
    sizes = (n_seqs, q.shape[0], q.shape[1], k.shape[1], q.shape[2])
    if not _ext.load().attention_cpu(addresses, sizes, scale, causal, backward, isa(), _threads(q)):
        raise RuntimeError(f"attention_cpu has no kernel for head dim {q.shape[2]}")   # runs() admits only those


def forward(q, k, v, cu_q, cu_k, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out (total_q, Hq, D) and lse (Hq, total_q) float32 of contiguous q, k, v and int32 cu_seqlens; a query that
    sees no key gets out 0 and lse +inf."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
    _launch((q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), 0, 0, 0, 0,
             cu_q.data_ptr(), cu_k.data_ptr()), q, k, cu_q.numel() - 1, scale, causal, False)
    return out, lse


def backward(dout, q, k, v, out, lse, cu_q, cu_k, scale: float, causal: bool):
    """dq, dk, dv of ``forward``'s out for contiguous dout (every element written by the kernel)."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _launch((q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), dout.data_ptr(),
             dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), cu_q.data_ptr(), cu_k.data_ptr()), q, k,
            cu_q.numel() - 1, scale, causal, True)
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, scale: float, causal: bool):
        q, k, v, cu_q, cu_k = (t.contiguous() for t in (q, k, v, cu_q, cu_k))
        out, lse = forward(q, k, v, cu_q, cu_k, scale, causal)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.params = (scale, causal)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = backward(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.params)
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, cu_q, cu_k, scale: float, causal: bool) -> torch.Tensor:
    """out (total_q, Hq, D) of packed q (total_q, Hq, D), k, v (total_k, Hkv, D); gradients to q, k, v."""
    return AttentionFunction.apply(q, k, v, cu_q, cu_k, scale, causal)
