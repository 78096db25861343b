"""RMSNorm with the fused residual add on CPU: one autograd node with a hand-written backward.

With h = x (+ residual), r = 1 / sqrt(mean(h²) + eps), n = h · r, y = n · w:
    dw = Σ_rows dy · n
    dh = r · (dy·w - n · mean(dy·w · n)) (+ dh_out, the gradient reaching the carried sum with prenorm)
    dx = dresidual = dh
The extension's kernels (``_C.rms_norm_cpu``, csrc/cpu/rms_norm_kernels.h) compute each pass in one sweep over the
rows; as ATen ops (the path where the extension is not built, and what torch.compile traces) the forward is 5 calls
and the backward 9, each a pass over the whole tensor: at 2048 × 128 one norm took ~0.5 ms forward and ~0.7 ms
backward that way in the tiny preset's training step (1 thread, AVX-512), ~10 ms of its ~166 ms. The reference's
autograd graph is ~10 nodes per norm, with zero-filled gradient buffers. float32 tensors (``DTYPES``).
"""
from __future__ import annotations

import torch

from .. import _ext
from . import extension_runs
from .attention import isa

DTYPES = (torch.float32,)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous (rows, width)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _forward_kernel(x, residual, weight, eps):
    """-> (y, h, rstd (rows,)) by the extension's kernel; h is x itself without a residual."""
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else None
    w = weight.contiguous()         # bound to a name: a temporary's memory could be freed before the kernel reads it
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if r2 is not None else x2
    rstd = torch.empty(x2.shape[0], dtype=torch.float32)
    _ext.load().rms_norm_cpu(
        (x2.data_ptr(), 0 if r2 is None else r2.data_ptr(), w.data_ptr(), y.data_ptr(),
         0 if r2 is None else h.data_ptr(), rstd.data_ptr()),
        x2.shape[0], x2.shape[1], eps, 1.0 / x2.shape[1], isa(), _ext.threads_for(x2.numel()))
    return y.view(x.shape), h.view(x.shape), rstd


def rms_scaled(x: torch.Tensor, eps_sum: float) -> torch.Tensor:
    """x · rsqrt(Σ x² + eps_sum) per row of a float32 x, no weight and no autograd: the generator's norms, whose weights
    (and the √width the sum leaves out) are folded into the product that follows (models/decode_step.py). One kernel
    call where the extension runs, else 5 ATen calls (``vector_norm`` costs fewer calls than ``mean``)."""
    if not (extension_runs() and x.numel() > 0):
        return x * torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(eps_sum).rsqrt_()
    x2 = _rows(x)
    y = torch.empty_like(x2)
    _ext.load().rms_norm_cpu((x2.data_ptr(), 0, 0, y.data_ptr(), 0, 0), x2.shape[0], x2.shape[1], eps_sum, 1.0,
                             isa(), _ext.threads_for(x2.numel()))
    return y.view(x.shape)


def _backward_kernel(dy, dh_out, h, weight, rstd, need_weight_grad: bool):
    """-> (dh, dw or None) by the extension's kernel."""
    width = h.shape[-1]
    h2, dy2, w = _rows(h), _rows(dy), weight.contiguous()
    dh_out2 = _rows(dh_out) if dh_out is not None else None
    dh = torch.empty_like(h2)
    threads = _ext.threads_for(h2.numel())
    dw = torch.empty(width, dtype=torch.float32) if need_weight_grad else None
    partials = torch.empty(threads, width, dtype=torch.float32) if need_weight_grad else None
    _ext.load().rms_norm_backward_cpu(
        (dy2.data_ptr(), h2.data_ptr(), rstd.data_ptr(), w.data_ptr(),
         0 if dh_out2 is None else dh_out2.data_ptr(), dh.data_ptr(), 0 if dw is None else dw.data_ptr(),
         0 if partials is None else partials.data_ptr()),
        h2.shape[0], width, isa(), threads)
    return dh.view(h.shape), dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps: float):
        """-> (y, h) with h = x + residual; y alone without a residual (h would be x itself)."""
        ctx.kernel = extension_runs() and x.numel() > 0
        if ctx.kernel:
            y, h, rstd = _forward_kernel(x, residual, weight, eps)
        else:
            h = x if residual is None else x + residual
            rstd = h.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
            y = h * rstd
            y.mul_(weight)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_residual = residual is not None
        ctx.set_materialize_grads(False)
        return (y, h) if ctx.has_residual else y

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h, weight, rstd = ctx.saved_tensors
        dh = None
        dw = None
        if dy is not None and ctx.kernel and extension_runs():
            dh, dw = _backward_kernel(dy, dh_out if ctx.has_residual else None, h, weight, rstd,
                                      ctx.needs_input_grad[2])
        else:
            if dy is not None:
                rstd = rstd.view(*h.shape[:-1], 1)
                n = h * rstd                                                       # normalized rows
                dn = dy * weight
                if ctx.needs_input_grad[2]:
                    dw = (dy * n).reshape(-1, h.shape[-1]).sum(0)
                dh = n.mul_((dn * n).mean(-1, keepdim=True)).neg_().add_(dn).mul_(rstd)
            if ctx.has_residual and dh_out is not None:
                dh = dh_out if dh is None else dh.add_(dh_out)
        dres = dh if ctx.has_residual else None
        return dh, dres, dw, None


def rms_norm(x, weight, eps, residual, prenorm):
    if residual is None:
        y = RMSNormFunction.apply(x, None, weight, eps)
        return (y, x) if prenorm else y
    y, h = RMSNormFunction.apply(x, residual, weight, eps)
    return (y, h) if prenorm else y
