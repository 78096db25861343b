"""RMSNorm with fused residual add: drop-in for flash_attn.ops.triton.layer_norm.rms_norm_fn (no bias).

Custom ops (torch.ops.internlm_kernels.*), all over any leading shape with features on the last dim:
  rms_norm_fwd(x, weight, eps, offset, cast_before_weight, low_precision) -> (y, rstd)  no residual: h is x
  add_rms_norm_fwd(x, residual?, weight, eps, h_dtype, offset, cast_before_weight, low_precision) -> (y, h, rstd)
                                                                      h = x (+ residual) stored in h_dtype
  rms_norm_bwd(dy, h, weight, rstd, dh_out?, dx_dtype, dres_dtype?, offset, low_precision) -> [dx, dweight(, dres)]
``offset`` is added to the weight (Gemma's 1 + w); ``cast_before_weight`` is transformers' Llama casting;
``low_precision`` is Liger's casting mode "none" (every intermediate rounded to x's dtype).
The forward ops carry registered autograd that calls rms_norm_bwd. Kernels: internlm_kernels/triton/rms_norm.py.
"""
from __future__ import annotations

import functools
import math

import torch

from .. import cpu, reference
from ..backend import choose
from ..checks import FLOAT_DTYPES, check_tensor
from ..cpu import rms_norm as cpu_rms_norm
from ..triton._rows import rows_of
from . import _eager as eager


@functools.cache   # an import statement costs ~0.5 µs per call even when the module is loaded
def _kernels():
    # Imported on first use so that the package imports without triton (the reference backend needs none).
    from ..triton import rms_norm as kernels

    return kernels


def _new_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor shaped like x in ``dtype`` (empty_like: ~1 µs less than torch.empty(x.shape, ...))."""
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


def _new_rstd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rstd shaped x.shape[:-1], float32, and the same memory as the flat (M,) vector the kernels write. Allocated
    from plain ints and viewed only when x is not 2-D: a torch.Size argument and a view cost ~1 µs each."""
    flat = torch.empty(x.shape[0] if x.dim() == 2 else math.prod(x.shape[:-1]), dtype=torch.float32, device=x.device)
    return (flat if x.dim() == 2 else flat.view(x.shape[:-1])), flat


@torch.library.custom_op("internlm_kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                 cast_before_weight: bool = False, low_precision: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    y = _new_rows(x, x.dtype)
    rstd, rstd_rows = _new_rstd(x)
    _kernels().rms_norm_forward(rows_of(x), weight.contiguous(), eps, rows_of(y), rstd_rows, offset=offset,
                                cast_before_weight=cast_before_weight, low_precision=low_precision)
    return y, rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps, offset=0.0, cast_before_weight=False, low_precision=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("internlm_kernels::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     h_dtype: torch.dtype, offset: float = 0.0, cast_before_weight: bool = False,
                     low_precision: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h = _new_rows(x, x.dtype), _new_rows(x, h_dtype)
    rstd, rstd_rows = _new_rstd(x)
    _kernels().rms_norm_forward(rows_of(x), weight.contiguous(), eps, rows_of(y), rstd_rows,
                                residual=rows_of(residual) if residual is not None else None, h=rows_of(h),
                                offset=offset, cast_before_weight=cast_before_weight, low_precision=low_precision)
    return y, h, rstd


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, h_dtype, offset=0.0, cast_before_weight=False, low_precision=False):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, dtype=h_dtype, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("internlm_kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 dh_out: torch.Tensor | None, dx_dtype: torch.dtype,
                 dres_dtype: torch.dtype | None, offset: float = 0.0, low_precision: bool = False
                 ) -> list[torch.Tensor]:
    dx = _new_rows(h, dx_dtype)
    dres = _new_rows(h, dres_dtype) if dres_dtype is not None else None
    dw = _kernels().rms_norm_backward(
        rows_of(dy), rows_of(h), weight.contiguous(), rstd if rstd.dim() == 1 else rstd.reshape(-1), rows_of(dx),
        dh_out=rows_of(dh_out) if dh_out is not None else None,
        dres=rows_of(dres) if dres is not None else None, offset=offset, low_precision=low_precision)
    return [dx, dw] if dres is None else [dx, dw, dres]


@rms_norm_bwd.register_fake
def _(dy, h, weight, rstd, dh_out, dx_dtype, dres_dtype, offset=0.0, low_precision=False):
    dx = torch.empty_like(h, dtype=dx_dtype, memory_format=torch.contiguous_format)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    if dres_dtype is None:
        return [dx, dw]
    return [dx, dw, torch.empty_like(h, dtype=dres_dtype, memory_format=torch.contiguous_format)]


def _setup_plain(ctx, inputs, output):
    x, weight, _eps, offset, _cast, low_precision = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.offset, ctx.low_precision = offset, low_precision


def _backward_plain(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = eager.call(rms_norm_bwd, dy, x, weight, rstd, None, x.dtype, None, ctx.offset, ctx.low_precision)
    return dx, dw, None, None, None, None


rms_norm_fwd.register_autograd(_backward_plain, setup_context=_setup_plain)


def _setup_add(ctx, inputs, output):
    x, residual, weight, _eps, _h_dtype, offset, _cast, low_precision = inputs
    _y, h, rstd = output
    ctx.offset, ctx.low_precision = offset, low_precision
    ctx.save_for_backward(h, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.x_dtype = x.dtype
    ctx.res_dtype = residual.dtype if residual is not None else None
    # Without prenorm nobody uses h: keep its gradient None rather than a tensor of zeros to read.
    ctx.set_materialize_grads(False)


def _backward_add(ctx, dy, dh_out, _drstd):
    h, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h, dtype=ctx.x_dtype)
    # dx and dresidual are the same values; a second store is only needed when their dtypes differ.
    dres_dtype = ctx.res_dtype if ctx.res_dtype not in (None, ctx.x_dtype) else None
    grads = eager.call(rms_norm_bwd, dy, h, weight, rstd, dh_out, ctx.x_dtype, dres_dtype, ctx.offset,
                       ctx.low_precision)
    dx, dw = grads[0], grads[1]
    if ctx.res_dtype is None:
        dres = None
    else:
        dres = grads[2] if dres_dtype is not None else dx
    return dx, dres, dw, None, None, None, None, None


add_rms_norm_fwd.register_autograd(_backward_add, setup_context=_setup_add)


CASTING_MODES = ("gemma", "llama", "none")


def rms_norm(x, weight, eps=1e-6, residual=None, prenorm=False, residual_in_fp32=False, offset=0.0,
             casting_mode="gemma"):
    """y = (x + residual) / rms · (weight + offset) over the last dim; with ``prenorm`` returns (y, x + residual).

    The carried sum is stored in residual's dtype when a residual is given, else in float32 with
    ``residual_in_fp32``, else in x's dtype (then it is x itself). Statistics are float32 throughout.
    ``offset`` = 1 is Gemma's ``(1 + w)``. ``casting_mode`` "gemma" (default): everything in float32, rounded once
    to x's dtype; "llama": the normalized row is rounded to x's dtype before the weight multiplies it (transformers'
    LlamaRMSNorm); "none" (Liger's): the statistics and the scaling in x's dtype, every intermediate rounded to it
    (reference.rms_norm_low_precision; in float32 it is "gemma").
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim (the features), got shape {tuple(x.shape)}")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[0]} entries but x's last dim is {x.shape[-1]}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES, device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")
    offset, cast, low = float(offset), casting_mode == "llama", casting_mode == "none"
    backend = choose("rms_norm", x.device)
    # fp32 throughout: residual_in_fp32 and the casting modes change nothing ("none" rounds to float32, a no-op), the
    # weight offset is not on this path.
    if backend == "cpu" and cpu.runs_here("rms_norm", x.dtype in cpu_rms_norm.DTYPES and weight.dtype == x.dtype and (
            residual is None or residual.dtype == x.dtype) and offset == 0.0 and cpu.plain(x, weight, residual),
            f"dtype {x.dtype} (x, weight, residual), offset {offset} or tensor subclasses on the cpu path"):
        return cpu_rms_norm.rms_norm(x, weight, eps, residual, prenorm)
    if backend != "triton":
        return reference.rms_norm(x, weight, eps, residual, prenorm, residual_in_fp32, offset, casting_mode)
    max_features = _kernels().MAX_FEATURES
    if x.shape[-1] > max_features:
        raise NotImplementedError(
            f"x's last dim {x.shape[-1]} exceeds the {max_features} features a row kernel holds; "
            "use the reference backend")
    carries_fp32 = prenorm and residual_in_fp32 and x.dtype != torch.float32
    if residual is None and not carries_fp32:
        y, _ = eager.call(rms_norm_fwd, x, weight, eps, offset, cast, low)
        return (y, x) if prenorm else y
    h_dtype = residual.dtype if residual is not None else torch.float32
    y, h, _ = eager.call(add_rms_norm_fwd, x, residual, weight, eps, h_dtype, offset, cast, low)
    return (y, h) if prenorm else y
