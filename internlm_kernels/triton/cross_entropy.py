"""Fused linear + cross-entropy: Triton kernels and the chunked driver (no autograd here).

For hidden x (N, H), weight W (V, H), optional bias b (V,) and targets y (N,), the logits of token t are
z_t = W x_t + b (softcapped: z = c·tanh(z_raw / c)), lse_t = log Σ_v exp(z_tv), p_tv = exp(z_tv - lse_t), and

    loss_t = (1 - ε) w_y (lse_t - z_ty) + (ε / V) Σ_v w_v (lse_t - z_tv) + λ lse_t²   (0 where y_t = ignore_index)
    dloss_t/dz_tv = p_tv ((1 - ε) w_y + ε W / V + 2λ lse_t) - ε w_v / V - (1 - ε) w_y·[v = y_t]
    dloss_t/dz_raw = dloss_t/dz · (1 - tanh²(z_raw / c))                          (softcap only)

with ε = label smoothing, λ = the z-loss scale, w the per-class weights (all 1 without ``weight=``: then the
smoothing term is ε (lse_t - mean_v z_tv)) and W = Σ_v w_v; torch's weighted cross_entropy for λ = 0.
Reduction mean divides the cross-entropy part by Σ_t w_{y_t} but the z-loss part by the number of counted tokens
(Liger's convention): the gradient scale s_t then applies to the z-loss term times ρ = Σ_t w_{y_t} / n_counted,
read from the device (ρ = 1 without class weights, or for sum / none). With token scaling (Liger's
``use_token_scaling``) the token's loss, z-loss and gradient are multiplied by p_ty = exp(z_ty - lse_t), a constant. Pass 1 also
finds the row's argmax (first maximal class, on the softcapped logits) when predicted tokens are asked for. The (N, V) logits are never stored whole. Tokens are processed
in chunks of rows; per chunk:

    1. logits = x_c Wᵀ (+ b)          torch matmul into one reused (rows, V) buffer, in the input dtype
    2. _cross_entropy_rows_kernel    per row: pass 1 over the vocab in blocks (online max / sum → lse, the target
                                     logit, Σ z for smoothing) writes loss and z-loss; pass 2 (only when gradients
                                     are wanted) overwrites the row in place with s_t · dloss_t/dz_raw, where s_t is
                                     the gradient scale (1/n_valid for mean, 1 for sum, the upstream grad for none)
    3. dx_c = dlogits W,  dW += dlogitsᵀ x_c,  db += Σ_rows dlogits

Numerics: the softmax math is fp32 whatever the input dtype; the matmuls accumulate in fp32 (cuBLAS) and round their
outputs to the input dtype. By default dW is accumulated in the weight's dtype across chunks: an fp32 accumulator for
a 92544 × 4096 bf16 weight alone takes 1.4 GiB, more than the rest of this op's memory. ``accum_fp32`` asks for that
accumulator (each chunk's dlogitsᵀ x added in fp32, rounded to the weight's dtype once at the end); docs/kernels/
cross_entropy.md gives the measured error of the default.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._device import launches_on_input_device
from ._host_math import cdiv, next_power_of_2

# Memory budget of one chunk's logits buffer. At 16384 tokens × vocab 92544 (bf16) this gives 864-row chunks
# (153 MiB), which with dW and dx (852 MiB, unavoidable) keeps the op's extra peak memory under 1 GiB.
LOGITS_CHUNK_BYTES = 160 * 2**20
# Widest vocab block one program handles per loop step; the vocab is looped over in blocks of this width.
MAX_BLOCK_V = 4096
SCALE_BLOCK = 4096


@triton.jit
def _tanh(x):
    # tanh from exp (libdevice.tanh has no interpreter implementation); sign-symmetric so exp never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,          # (rows, V) logits of this chunk, input dtype; overwritten with scaled dloss/dlogits if WRITE_GRAD
    logits_row_stride,   # elements between consecutive rows of logits
    target_ptr,          # (rows,) int32/int64 class index, or ignore_index
    loss_ptr,            # (rows,) fp32 out: per-token loss (z-loss included), 0 for ignored tokens
    z_loss_ptr,          # (rows,) fp32 out: per-token z-loss λ·lse², 0 for ignored tokens
    grad_scale_ptr,      # fp32 factor on row r's gradient, read at grad_scale_ptr + r * grad_scale_stride
    grad_scale_stride,   # 0: one factor for every row (mean: 1/n_valid, sum: 1); 1 (or any): per-token factors (none)
    V,                   # vocab size (columns of logits)
    ignore_index,        # target value whose token contributes nothing
    label_smoothing,     # ε in [0, 1]
    lse_square_scale,    # λ >= 0, z-loss scale
    softcap,             # c > 0 when HAS_SOFTCAP, else unused
    class_weight_ptr,    # (V,) per-class weights w (read only when HAS_WEIGHT)
    class_weight_sum_ptr,  # 0-d fp32 W = Σ_v w_v (read only when HAS_WEIGHT)
    argmax_ptr,          # (rows,) int64 out: the row's argmax, -1 for ignored tokens (written only when STORE_ARGMAX)
    z_ratio_ptr,         # 0-d fp32 ρ: the z-loss term's gradient scale relative to the rest (read only when HAS_WEIGHT)
    BLOCK_V: tl.constexpr,      # vocab columns per loop step (power of two)
    HAS_SOFTCAP: tl.constexpr,  # apply z = c·tanh(z_raw / c)
    WRITE_GRAD: tl.constexpr,   # run pass 2 (training); False computes the loss only
    HAS_WEIGHT: tl.constexpr,   # per-class weights
    STORE_ARGMAX: tl.constexpr,  # write the argmax of each row
    TOKEN_SCALING: tl.constexpr,  # multiply the row's loss, z-loss and gradient by p_ty (detached)
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = target != ignore_index
    # Out-of-range targets are rejected by the public function; clamping keeps a bad one from reading out of bounds.
    safe_target = tl.where(valid & (target >= 0) & (target < V), target, 0)
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: online log-sum-exp over the row, skipped for ignored tokens (loop bound 0).
    m = tl.full((), -float("inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    sum_z = tl.zeros((), tl.float32)   # Σ_v w_v z_v (w = 1 without weights)
    best = tl.zeros((), tl.int64)      # argmax so far: a later block takes over only when strictly larger
    n_cols = tl.where(valid, V, 0)
    for start in range(0, n_cols, BLOCK_V):
        mask = start + cols < V
        z = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, -float("inf"))
        block_max = tl.max(z, 0)
        if STORE_ARGMAX:
            best = tl.where(block_max > m, start + tl.argmax(z, 0).to(tl.int64), best)
        m_new = tl.maximum(m, block_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        if HAS_WEIGHT:
            w = tl.load(class_weight_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            sum_z += tl.sum(tl.where(mask, w * z, 0.0), 0)
        else:
            sum_z += tl.sum(tl.where(mask, z, 0.0), 0)
        m = m_new
    lse = tl.where(valid, m + tl.log(tl.where(valid, s, 1.0)), 0.0)  # ignored rows: s = 0, no log(0)
    z_target = tl.load(row_ptr + safe_target).to(tl.float32)
    if HAS_SOFTCAP:
        z_target = softcap * _tanh(z_target / softcap)
    z_loss = lse_square_scale * lse * lse
    if HAS_WEIGHT:
        w_target = tl.load(class_weight_ptr + safe_target).to(tl.float32)
        w_sum = tl.load(class_weight_sum_ptr).to(tl.float32)
        smooth_loss = (lse * w_sum - sum_z) / V
    else:
        w_target = 1.0
        w_sum = V * 1.0
        smooth_loss = lse - sum_z / V
    loss = (1.0 - label_smoothing) * w_target * (lse - z_target) + label_smoothing * smooth_loss + z_loss
    if TOKEN_SCALING:
        p_target = tl.exp(z_target - lse)
        loss = loss * p_target
        z_loss = z_loss * p_target
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(z_loss_ptr + row, tl.where(valid, z_loss, 0.0))
    if STORE_ARGMAX:
        tl.store(argmax_ptr + row, tl.where(valid, best, -1))

    if WRITE_GRAD:
        # Pass 2: dlogits in place. Ignored tokens get zeros (their logits must not reach dx / dW).
        scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(tl.float32)
        if TOKEN_SCALING:
            scale = scale * p_target
        z_ratio = 1.0
        if HAS_WEIGHT:
            z_ratio = tl.load(z_ratio_ptr).to(tl.float32)
        hit = (1.0 - label_smoothing) * w_target
        p_coef = hit + label_smoothing * w_sum / V + 2.0 * lse_square_scale * lse * z_ratio
        smooth = label_smoothing / V
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            z = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            if HAS_WEIGHT:
                w = tl.load(class_weight_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(z - lse) * p_coef - smooth * w
            else:
                g = tl.exp(z - lse) * p_coef - smooth
            g = tl.where(start + cols == safe_target, g - hit, g)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            g = tl.where(valid, g * scale, 0.0)  # a select, not a product: exp() of an ignored row may be inf
            tl.store(row_ptr + start + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


@launches_on_input_device
def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, z_loss: torch.Tensor,
                       grad_scale: torch.Tensor | None, ignore_index: int, label_smoothing: float,
                       lse_square_scale: float, softcap: float, class_weight: torch.Tensor | None = None,
                       class_weight_sum: torch.Tensor | None = None, argmax: torch.Tensor | None = None,
                       z_ratio: torch.Tensor | None = None, token_scaling: bool = False) -> None:
    """Per-row loss of ``logits`` (rows, V) into ``loss``/``z_loss`` (rows,) fp32.

    With ``grad_scale`` (a 0-d or (rows,) fp32 tensor) the logits are overwritten in place with
    ``grad_scale · dloss/dlogits``; with None they are left untouched. ``class_weight`` (V,) contiguous with its
    0-d fp32 sum weights the classes, and ``z_ratio`` (0-d fp32, None for 1) scales the z-loss term of the gradient
    relative to the rest (see the module docstring); ``argmax`` (rows,) int64 receives each row's argmax (-1 when
    ignored); ``token_scaling`` multiplies each row's loss, z-loss and gradient by its target's probability.
    """
    rows, V = logits.shape
    if rows == 0:
        return
    assert logits.stride(1) == 1 and loss.is_contiguous() and z_loss.is_contiguous()
    write_grad = grad_scale is not None
    if not write_grad:
        grad_scale, scale_stride = loss, 0  # never read
    else:
        scale_stride = grad_scale.stride(0) if grad_scale.dim() == 1 else 0
    block_v = min(MAX_BLOCK_V, next_power_of_2(V))
    _cross_entropy_rows_kernel[(rows,)](
        logits, logits.stride(0), target, loss, z_loss, grad_scale, scale_stride,
        V, ignore_index, float(label_smoothing), float(lse_square_scale), float(softcap) if softcap > 0 else 1.0,
        class_weight if class_weight is not None else loss,        # never read without HAS_WEIGHT
        class_weight_sum if class_weight is not None else loss,
        argmax if argmax is not None else target,                  # never written without STORE_ARGMAX
        z_ratio if z_ratio is not None else loss.new_ones(()) if class_weight is not None and write_grad else loss,
        BLOCK_V=block_v, HAS_SOFTCAP=softcap > 0, WRITE_GRAD=write_grad, HAS_WEIGHT=class_weight is not None,
        STORE_ARGMAX=argmax is not None, TOKEN_SCALING=bool(token_scaling), num_warps=8 if block_v >= 2048 else 4)


@triton.jit
def _scale_unless_one_kernel(
    x_ptr,              # (n,) contiguous tensor scaled in place
    n,                  # number of elements
    factor_ptr,         # 0-d fp32 factor; when it is exactly 1 nothing is read or written
    BLOCK: tl.constexpr,
):
    # Persistent: a few programs per SM stride over x, so a factor of 1 costs one tiny launch, not n / BLOCK programs.
    factor = tl.load(factor_ptr).to(tl.float32)
    if factor != 1.0:
        first = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(first, n, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            tl.store(x_ptr + offs, (x * factor).to(x_ptr.dtype.element_ty), mask=mask)


@launches_on_input_device
def scale_unless_one_(x: torch.Tensor, factor: torch.Tensor) -> None:
    """x *= factor in place, reading the 0-d ``factor`` on the device (no host sync; a factor of 1 costs ~nothing)."""
    assert x.is_contiguous() and factor.numel() == 1
    n = x.numel()
    if n:
        programs = 8 * _sm_count(x.device) if x.is_cuda else 4
        grid = (min(cdiv(n, SCALE_BLOCK), programs),)
        _scale_unless_one_kernel[grid](x, n, factor, BLOCK=SCALE_BLOCK, num_warps=8)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def chunk_rows(n_tokens: int, vocab: int, element_size: int) -> int:
    """Rows per chunk: as many as LOGITS_CHUNK_BYTES allows, balanced so the last chunk is not a sliver."""
    if n_tokens == 0:
        return 1
    most = max(1, LOGITS_CHUNK_BYTES // (vocab * element_size))
    n_chunks = cdiv(n_tokens, most)
    rows = cdiv(n_tokens, n_chunks)
    if rows >= 16 and rows + 15 <= most:
        rows = (rows + 15) // 16 * 16  # multiples of 16 keep the matmul tiles whole
    return min(rows, n_tokens)


@launches_on_input_device
def linear_cross_entropy_chunked(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                 bias: torch.Tensor | None, ignore_index: int, label_smoothing: float,
                                 lse_square_scale: float, softcap: float, grad_scale: torch.Tensor | None,
                                 need_dhidden: bool, need_dweight: bool, need_dbias: bool,
                                 class_weight: torch.Tensor | None = None, want_argmax: bool = False,
                                 accum_fp32: bool = False, z_ratio: torch.Tensor | None = None,
                                 token_scaling: bool = False):
    """Per-token loss and z-loss (N,) fp32 and, when ``grad_scale`` is given, the gradients of
    Σ_t grad_scale_t · loss_t (grad_scale 0-d or (N,) fp32) with respect to the inputs asked for.

    hidden (N, H), weight (V, H), target (N,), bias (V,) or None; all on one device, one float dtype.
    class_weight (V,) per-class weights or None; ``want_argmax``: also each token's argmax class; ``accum_fp32``:
    dW accumulated in fp32 across chunks (see the module docstring); ``z_ratio`` and ``token_scaling`` as
    ``cross_entropy_rows``.
    Returns (loss, z_loss, dhidden | None, dweight | None, dbias | None, argmax | None).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    loss = torch.empty(N, device=dev, dtype=torch.float32)
    z_loss = torch.empty(N, device=dev, dtype=torch.float32)
    write_grad = grad_scale is not None and (need_dhidden or need_dweight or need_dbias)
    dhidden = torch.empty((N, H), device=dev, dtype=dt) if write_grad and need_dhidden else None
    accum_fp32 = accum_fp32 and dt != torch.float32
    dweight = (torch.empty((V, H), device=dev, dtype=torch.float32 if accum_fp32 else dt)
               if write_grad and need_dweight else None)
    dbias = torch.zeros(V, device=dev, dtype=torch.float32) if write_grad and need_dbias else None
    argmax = torch.empty(N, device=dev, dtype=torch.int64) if want_argmax else None
    weight_sum = None
    if class_weight is not None:
        class_weight = class_weight.contiguous()
        weight_sum = class_weight.sum(dtype=torch.float32)
    rows = chunk_rows(N, V, hidden.element_size())
    logits_buf = torch.empty((min(rows, N), V), device=dev, dtype=dt)  # (rows, V), reused by every chunk
    weight_t = weight.t()  # (H, V) view
    for start in range(0, N, rows):
        end = min(N, start + rows)
        x = hidden[start:end]                           # (c, H)
        logits = logits_buf[: end - start]               # (c, V)
        if bias is None:
            torch.mm(x, weight_t, out=logits)
        else:
            torch.addmm(bias, x, weight_t, out=logits)
        scale = None
        if write_grad:
            scale = grad_scale[start:end] if grad_scale.dim() == 1 else grad_scale
        cross_entropy_rows(logits, target[start:end], loss[start:end], z_loss[start:end], scale,
                           ignore_index, label_smoothing, lse_square_scale, softcap, class_weight, weight_sum,
                           argmax[start:end] if argmax is not None else None, z_ratio, token_scaling)
        if not write_grad:
            continue
        if dhidden is not None:
            torch.mm(logits, weight, out=dhidden[start:end])
        if dweight is not None:
            if accum_fp32:
                _accumulate_fp32(dweight, logits.t(), x, first=start == 0)
            elif start == 0:
                torch.mm(logits.t(), x, out=dweight)
            else:
                dweight.addmm_(logits.t(), x)
        if dbias is not None:
            dbias += logits.sum(0, dtype=torch.float32)
    if dweight is not None and N == 0:
        dweight.zero_()  # no chunk ran: the gradient of an empty sum
    if dbias is not None:
        dbias = dbias.to(dt)
    if dweight is not None:
        dweight = dweight.to(dt)  # one rounding of the fp32 accumulator (a no-op otherwise)
    return loss, z_loss, dhidden, dweight, dbias, argmax


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc (fp32) = (0 if first else acc) + a @ b for 16-bit a, b: products accumulated in fp32, never rounded to
    16 bits (cuBLAS's fp32-output GEMM on CUDA; elsewhere an fp32 matmul of the exactly widened operands)."""
    if first:
        acc.zero_()
    if acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())
