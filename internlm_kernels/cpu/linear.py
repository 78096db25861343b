"""y = x @ W.T (+ b) on CPU through oneDNN or ATen's BLAS (chosen by measurement, gemm_choice.py), forward and backward.

torch's ``aten::mm`` on CPU calls the BLAS it was built with (MKL in the PyPI wheels). On AMD CPUs MKL does not use
its AVX-512 kernels: on the development machine (AMD EPYC, Zen 5) a (2048 × 256)·(256 × 704)ᵀ fp32 product took
7.8 ms with ``aten::mm`` and 3.5 ms with oneDNN's JIT kernels, one thread (docs/kernels/cpu.md). ATen exposes oneDNN's
inner product as ``torch.ops.mkldnn._linear_pointwise`` (the op Inductor's CPU backend emits for linear layers); it
has no autograd, so the backward is written here with the same op:
    dx = dy @ W        = inner_product(dy, Wᵀ)           Wᵀ a strided view, no copy
    dW = dyᵀ @ x       = weight_grad(dy, x)              oneDNN on dyᵀ made contiguous (its fast path for the
                                                          reduction over tokens), or ATen's mm on the views
    db = Σ_rows dy
fp32 accumulation throughout (oneDNN's default strict fp32 math mode: no implicit bf16/tf32).
"""
from __future__ import annotations

import torch

from . import gemm_choice

DTYPES = (torch.float32,)
# Read once at import: the build does not change, and torch.compile does not trace torch.backends queries.
_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def available() -> str | None:
    """None when oneDNN's inner product can run here, else why not."""
    if not _HAS_ONEDNN:
        return "torch was built without oneDNN (mkldnn)"
    return None


def inner_product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)ᵀ (+ bias (N,)) -> (M, N) by oneDNN or ATen's mm, whichever measured faster for this shape
    class on this CPU (gemm_choice.py; pinned by INTERNLM_KERNELS_CPU_GEMM). Traced by torch.compile it is a plain
    matmul: Inductor lowers mkldnn._linear_pointwise only for frozen (constant) weights, and picks its own CPU GEMM."""
    if torch.compiler.is_compiling():
        return torch.nn.functional.linear(a, b, bias)
    return gemm_choice.product(a, b, bias)


def weight_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dyᵀ (N, M) · x (M, K) -> (N, K) by the GEMM measured faster for it (gemm_choice.product_tn)."""
    if torch.compiler.is_compiling():
        return dy.t() @ x
    return gemm_choice.product_tn(dy, x)


class LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])                                          # (M, K)
        y = inner_product(x2, weight, bias)                                     # (M, N)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dy2 = dy.reshape(-1, weight.shape[0])                                    # (M, N)
        dx = dw = db = None
        if need_x:
            dx = inner_product(dy2, weight.t()).view(*dy.shape[:-1], weight.shape[1])
        if need_w:
            dw = weight_grad(dy2, x2)                                            # (N, K)
        if need_b and ctx.has_bias:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return LinearFunction.apply(x, weight, bias)
