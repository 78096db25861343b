"""RMSNorm with an optional fused residual add: Triton kernels and their launch helpers (no autograd here).

Rows are the last dim (N features) of a tensor viewed as (M, N). Per row, all in float32:

    forward    h    = x + residual                     (h = x without a residual)
               rstd = 1 / sqrt(mean(h²) + eps)
               y    = h · rstd · (w + offset)          y in y's dtype; h stored too when asked (prenorm / backward)
    backward   n    = h · rstd,  g = dy · (w + offset) (the normalized row and the gradient reaching it)
               dh   = rstd · (g - n · mean(g · n))  (+ dh_out, the gradient of the returned h)
               dw   = Σ_rows dy · n

``offset`` is Gemma's 1 (its weights are stored as w - 1). With CAST_BEFORE_WEIGHT (transformers' Llama casting)
h · rstd is rounded to y's dtype before the weight multiplies it; else (Gemma casting) the product is float32 and
rounded once. With LOW_PRECISION (Liger's casting mode "none") every step rounds to y's dtype: h, h², mean(h²),
mean(h²) + eps, rstd, h · rstd, w + offset and y (float32 arithmetic, then a rounding; see
reference.rms_norm_low_precision). The backward is the same for all three (the rounding has no
derivative), taken at the rounded h and rstd.

One pass over memory each way: the forward reads x (and residual) once and writes y (and h); the backward reads dy and
h (and dh_out) once and writes dx (and dresidual when its dtype differs from dx's). A whole row lives in registers
(BLOCK_N = next power of two ≥ N, masked tail), so mean(h²) and mean(g·n) need no second read. Small rows are packed
BLOCK_M to a program so every program moves a few thousand elements.

dw needs a sum over all rows. Each backward program owns a contiguous range of rows, accumulates its share of dw in
registers and writes one float32 row of partial sums; the launcher adds the P partial rows with torch. The order of
additions is fixed, so dw is deterministic.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._device import launches_on_input_device
from ._host_math import cdiv, next_power_of_2

# A row must fit in registers; 32768 float32 values spread over 16 warps is 64 per thread, the most we allow.
MAX_FEATURES = 32768


@triton.jit
def _rms_norm_fwd_kernel(
    X,           # (M, N) input rows
    RES,         # (M, N) residual rows added to x (read only when HAS_RESIDUAL)
    W,           # (N,) weight
    Y,           # (M, N) output rows, y = h · rstd · w
    H,           # (M, N) output rows h = x + residual (written only when STORE_H)
    RSTD,        # (M,) float32 output, 1 / rms of each row, kept for the backward
    stride_x,    # row strides in elements; the last dim of every tensor is contiguous
    stride_res,
    stride_y,
    stride_h,
    M,           # number of rows
    N,           # features per row
    eps,         # added to mean(h²) before the square root
    offset,      # added to every weight (Gemma: 1.0; otherwise 0.0)
    HAS_RESIDUAL: tl.constexpr,
    STORE_H: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,  # round h · rstd to y's dtype before multiplying by the weight
    LOW_PRECISION: tl.constexpr,       # casting mode "none": round every intermediate to y's dtype
    BLOCK_M: tl.constexpr,   # rows per program
    BLOCK_N: tl.constexpr,   # power of two >= N
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # row * stride overflows int32 beyond 2^31 elements

    h = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_N)
    if HAS_RESIDUAL:
        h += tl.load(RES + rows64 * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if STORE_H:
        tl.store(H + rows64 * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=mask)

    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32) + offset
    if LOW_PRECISION:
        low = Y.dtype.element_ty
        h = h.to(low).to(tl.float32)
        ms = (tl.sum((h * h).to(low).to(tl.float32), axis=1) / N).to(low).to(tl.float32)
        rstd = (1.0 / tl.sqrt((ms + eps).to(low).to(tl.float32))).to(low).to(tl.float32)
        w = w.to(low).to(tl.float32)
    else:
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / N + eps)  # (BLOCK_M,); masked columns are 0 and add nothing
    tl.store(RSTD + rows, rstd, mask=row_ok)
    n = h * rstd[:, None]
    if CAST_BEFORE_WEIGHT or LOW_PRECISION:
        n = n.to(Y.dtype.element_ty).to(tl.float32)
    y = n * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,          # (M, N) gradient of y
    H,           # (M, N) the normalized input h (x itself when there was no residual)
    W,           # (N,) weight
    RSTD,        # (M,) float32, from the forward
    DH_OUT,      # (M, N) gradient of the returned h (read only when HAS_DH_OUT)
    DX,          # (M, N) output: gradient of x (and of the residual when their dtypes match)
    DRES,        # (M, N) output: gradient of the residual in its own dtype (written only when STORE_DRES)
    DW_PARTIAL,  # (P, N) float32 output: row p holds program p's share of dw
    stride_dy,   # row strides in elements; the last dim of every tensor is contiguous
    stride_h,
    stride_dh_out,
    stride_dx,
    stride_dres,
    M,           # number of rows
    N,           # features per row
    rows_per_program,  # a multiple of BLOCK_M; program p owns rows [p · rows_per_program, (p + 1) · rows_per_program)
    offset,      # added to every weight, as in the forward
    HAS_DH_OUT: tl.constexpr,
    STORE_DRES: tl.constexpr,
    LOW_PRECISION: tl.constexpr,  # casting mode "none": the forward's statistics were taken on h rounded to dx's dtype
    BLOCK_M: tl.constexpr,   # rows per step
    BLOCK_N: tl.constexpr,   # power of two >= N
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    if LOW_PRECISION:
        w = w.to(DX.dtype.element_ty).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first_row = pid * rows_per_program
    for step in range(0, rows_per_program, BLOCK_M):
        rows = first_row + step + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + rows64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if LOW_PRECISION:
            h = h.to(DX.dtype.element_ty).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        n = h * rstd[:, None]                              # (BLOCK_M, BLOCK_N) normalized rows
        g = dy * w[None, :]
        proj = tl.sum(g * n, axis=1) / N                   # (BLOCK_M,) mean(g · n)
        dh = (g - n * proj[:, None]) * rstd[:, None]
        if HAS_DH_OUT:
            dh += tl.load(DH_OUT + rows64 * stride_dh_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dh.to(DX.dtype.element_ty), mask=mask)
        if STORE_DRES:
            tl.store(DRES + rows64 * stride_dres + cols[None, :], dh.to(DRES.dtype.element_ty), mask=mask)
        dw += dy * n                                       # rows past M loaded zeros and add nothing
    tl.store(DW_PARTIAL + pid * N + cols, tl.sum(dw, axis=0), mask=col_ok)


@functools.lru_cache(maxsize=64)   # a handful of widths per model; the arithmetic costs more than the lookup
def _tile(n_features: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, ~4096 elements per program, ~8-16 elements per thread."""
    block_n = next_power_of_2(n_features)
    block_m = max(1, min(64, 4096 // block_n))
    num_warps = max(1, min(16, block_m * block_n // 512))
    return block_m, block_n, num_warps


@functools.lru_cache(maxsize=None)
def _backward_programs(device: torch.device) -> int:
    """How many programs share the rows in the backward: two per SM keeps every SM busy with few dw partials."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another: few, large programs are fastest


@launches_on_input_device
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, y: torch.Tensor, rstd: torch.Tensor,
                     residual: torch.Tensor | None = None, h: torch.Tensor | None = None, offset: float = 0.0,
                     cast_before_weight: bool = False, low_precision: bool = False) -> None:
    """Write y (M, N), rstd (M,) and, when ``h`` is given, h = x + residual (M, N) for rows x (M, N)."""
    M, N = x.shape
    if M == 0:
        return
    block_m, block_n, num_warps = _tile(N)
    res = residual if residual is not None else x
    h_out = h if h is not None else y
    _rms_norm_fwd_kernel[(cdiv(M, block_m),)](
        x, res, weight, y, h_out, rstd,
        x.stride()[0], res.stride()[0], y.stride()[0], h_out.stride()[0],   # .stride()[0]: half of .stride(0)'s cost
        M, N, eps, float(offset),
        HAS_RESIDUAL=residual is not None, STORE_H=h is not None, CAST_BEFORE_WEIGHT=cast_before_weight,
        LOW_PRECISION=low_precision, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )


@launches_on_input_device
def rms_norm_backward(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      dx: torch.Tensor, dh_out: torch.Tensor | None = None,
                      dres: torch.Tensor | None = None, offset: float = 0.0,
                      low_precision: bool = False) -> torch.Tensor:
    """Write dx (M, N) (and dres, the same values in another dtype, when given); return dw (N,) in weight's dtype."""
    M, N = h.shape
    if M == 0:
        return torch.zeros_like(weight)
    block_m, block_n, num_warps = _tile(N)
    programs = max(1, min(_backward_programs(h.device), cdiv(M, block_m)))
    rows_per_program = cdiv(cdiv(M, programs), block_m) * block_m
    programs = cdiv(M, rows_per_program)
    dw_partial = torch.empty(programs, N, device=h.device, dtype=torch.float32)
    dh_in = dh_out if dh_out is not None else dy
    dres_out = dres if dres is not None else dx
    _rms_norm_bwd_kernel[(programs,)](
        dy, h, weight, rstd, dh_in, dx, dres_out, dw_partial,
        dy.stride()[0], h.stride()[0], dh_in.stride()[0], dx.stride()[0], dres_out.stride()[0],
        M, N, rows_per_program, float(offset),
        HAS_DH_OUT=dh_out is not None, STORE_DRES=dres is not None, LOW_PRECISION=low_precision,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    # One program (few rows) holds the sum already: no reduction (a torch op, ~1.5 µs of host time), and no cast
    # when dw is already in weight's dtype (~0.7 µs).
    dw = dw_partial[0] if programs == 1 else dw_partial.sum(0)
    return dw if dw.dtype == weight.dtype else dw.to(weight.dtype)
