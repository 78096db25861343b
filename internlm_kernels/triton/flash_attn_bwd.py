"""Variable-length flash attention backward: Triton kernels and launch helper (FlashAttention-2 style).

With p recomputed from the saved lse (p = 2^(s·log2e - lse·log2e)), dO the output gradient and Z the dropout
keep-mask scaled by 1 / (1 - p_drop) (Z = 1 without dropout):

    δ_i   = Σ_d dO_id · O_id  -  dlse_i             (preprocess kernel; dlse = gradient reaching lse, if any)
    dV_j  = Σ_i (p_ij Z_ij) dO_i
    dP_ij = Z_ij · dO_i · v_j
    dS_ij = p_ij (dP_ij - δ_i)                        (gradient of the natural-log score s_ij)
    dS_ij ← dS_ij · (1 - t_ij²)                        with softcap, t = tanh(scale · q·k / softcap)
    dK_j  = scale Σ_i dS_ij q_i,    dQ_i = scale Σ_j dS_ij k_j

Why δ: Σ_j p_ij dP_ij = dO_i · O_i, so the softmax Jacobian needs one dot product per row, not a row of P.

Two passes, no atomics, so the result is bitwise deterministic whatever ``deterministic`` says:
  * dK/dV: a program owns BLOCK_N keys of one sequence and one K/V head; it loops over the GROUP query heads sharing
    that K/V head and over the query blocks that see its keys, accumulating dK and dV in registers (GQA needs no
    reduction afterwards), and writes them once.
  * dQ: a program owns BLOCK_M queries of one query head and loops over the key blocks they see, like the forward.
dQ by a second pass recomputes q·kᵀ and dO·vᵀ (7 matmuls in all instead of 5) but avoids the float32 atomics of a
single pass, whose traffic on the L2 would cost more than the two matmuls, and keeps the result repeatable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import launches_on_input_device
from ._host_math import cdiv
from .flash_attn import (
    LOG2E,
    AttnConfigs,
    _dropout_keep,
    _key_range,
    _load_tile,
    _query_range,
    _scores,
    _sequence_extent,
    _visible,
    backward_schedules,
    block_d,
    choose_configs,
)
from .flash_attn_fwd import precision


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,            # (total_q, Hq, D) forward output
    DOut,           # (total_q, Hq, D) its gradient
    DLse,           # (Hq, total_q) float32 gradient reaching lse (read only when HAS_DLSE)
    Delta,          # (Hq, total_q) float32 output δ
    total_q,
    stride_ot, stride_oh,
    stride_dot, stride_doh,
    stride_lse,     # head stride of DLse and Delta (= total_q)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    HAS_DLSE: tl.constexpr,
):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < total_q) & (offs_d[None, :] < HEAD_DIM)
    rows64 = rows.to(tl.int64)[:, None]
    o = tl.load(Out + rows64 * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOut + rows64 * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_ptrs = head.to(tl.int64) * stride_lse + rows
    if HAS_DLSE:
        delta -= tl.load(DLse + lse_ptrs, mask=rows < total_q, other=0.0)
    tl.store(Delta + lse_ptrs, delta, mask=rows < total_q)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, Q_seq, DO_seq, Lse_seq, Delta_seq, Alibi_seq, stride_qh, stride_doh, stride_lse,
                       stride_qt, stride_dot, n_q, off, cols, offs_m, offs_d, start, end, q_start, kv_head, seed,
                       qk_scale, softcap_log2, window_left, window_right, dropout_p,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [start, end) of each of the GROUP query heads that share
    its K/V head. One flat loop over (head, query block) pairs rather than a loop over heads around a loop over
    blocks: the pipeliner then overlaps loads across heads too, and the nested form spilled ~500 bytes per thread.
    Works on transposed tiles (keys × queries) so that pᵀ and dSᵀ feed the matmuls without a transpose. Rows past
    the sequence end read dO = 0 and lse = +inf, so they add nothing."""
    n_blocks = tl.cdiv(end - start, BLOCK_M)
    for it in range(0, GROUP * n_blocks):
        g = it // n_blocks
        head = kv_head * GROUP + g
        m0 = start + (it - g * n_blocks) * BLOCK_M
        rows = m0 + offs_m                                                                   # (BLOCK_M,)
        row_ok = rows < n_q
        q = _load_tile(Q_seq + head * stride_qh, rows, n_q, stride_qt, offs_d, HEAD_DIM, BLOCK_D, True)
        do = _load_tile(DO_seq + head * stride_doh, rows, n_q, stride_dot, offs_d, HEAD_DIM, BLOCK_D, True)
        lse_off = head.to(tl.int64) * stride_lse + rows
        lse2 = tl.load(Lse_seq + lse_off, mask=row_ok, other=float("inf")) * 1.4426950408889634  # (BLOCK_M,)
        delta = tl.load(Delta_seq + lse_off, mask=row_ok, other=0.0)
        alibi_log2 = 0.0
        if HAS_ALIBI:
            alibi_log2 = tl.load(Alibi_seq + head) * 1.4426950408889634
        pos = rows + off
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)                               # (BLOCK_N, BLOCK_M)
        sT, tT = _scores(qkT, pos[None, :], cols[:, None], qk_scale, softcap_log2, alibi_log2, HAS_SOFTCAP,
                         HAS_ALIBI)
        if MASKED:
            ok = _visible(pos[None, :], cols[:, None], 0, window_left, window_right, False, HAS_LEFT, HAS_RIGHT)
            sT = tl.where(ok, sT, float("-inf"))
        pT = tl.exp2(sT - lse2[None, :])
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)                              # (BLOCK_N, BLOCK_M)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, head, (q_start + rows)[None, :], cols[:, None], dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv = tl.dot(tl.where(keep, pT * inv_keep, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,                # as in the forward
    DO,                     # (total_q, Hq, D) output gradient
    Lse, Delta,             # (Hq, total_q) float32: forward lse and preprocess δ
    DK, DV,                 # (total_k, Hkv, D) outputs
    CuQ, CuK,               # (batch + 1,) int32 sequence offsets
    Items,                  # (slots, 2) int32 work items (sequence, key block), most work first; sequence -1 = none
    Alibi, Seed,            # as in the forward
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_lse,             # head stride of Lse and Delta (= total_q)
    stride_alibi,
    n_kv_heads,             # Hkv
    softmax_scale,          # natural-log score scale (dK = scale · Σ dS q)
    qk_scale, softcap_log2, window_left, window_right, dropout_p,   # as in the forward
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per loop step
    BLOCK_N: tl.constexpr,  # key rows per program
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    item = pid // n_kv_heads
    kv_head = pid % n_kv_heads
    seq = tl.load(Items + 2 * item)
    if seq < 0:
        return
    n0, q_start, n_q, k_start, n_k = _sequence_extent(Items, CuQ, CuK, item, seq, BLOCK_N)
    off = n_k - n_q

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = n0 + offs_n                                                    # (BLOCK_N,) key index in the sequence
    K_seq = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    V_seq = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    k = _load_tile(K_seq, cols, n_k, stride_kt, offs_d, HEAD_DIM, BLOCK_D, True)  # (BLOCK_N, BLOCK_D)
    v = _load_tile(V_seq, cols, n_k, stride_vt, offs_d, HEAD_DIM, BLOCK_D, True)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    Q_seq = Q + q_start.to(tl.int64) * stride_qt
    DO_seq = DO + q_start.to(tl.int64) * stride_dot
    Lse_seq = Lse + q_start
    Delta_seq = Delta + q_start
    Alibi_seq = Alibi + seq * stride_alibi
    lo, flo, fhi, hi = _query_range(n0, n_q, n_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if HAS_RIGHT:  # query blocks cut by the diagonal / right window edge
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, Q_seq, DO_seq, Lse_seq, Delta_seq, Alibi_seq, stride_qh, stride_doh, stride_lse, stride_qt,
            stride_dot, n_q, off, cols, offs_m, offs_d, lo, flo, q_start, kv_head, seed, qk_scale, softcap_log2,
            window_left, window_right, dropout_p, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_LEFT, HAS_RIGHT,
            HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PRECISION)
    dk, dv = _dkdv_query_blocks(  # query blocks that see the whole key block
        dk, dv, k, v, Q_seq, DO_seq, Lse_seq, Delta_seq, Alibi_seq, stride_qh, stride_doh, stride_lse, stride_qt,
        stride_dot, n_q, off, cols, offs_m, offs_d, flo, fhi, q_start, kv_head, seed, qk_scale, softcap_log2,
        window_left, window_right, dropout_p, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, False, HAS_LEFT, HAS_RIGHT,
        HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PRECISION)
    if HAS_LEFT:  # query blocks cut by the left window edge
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, Q_seq, DO_seq, Lse_seq, Delta_seq, Alibi_seq, stride_qh, stride_doh, stride_lse, stride_qt,
            stride_dot, n_q, off, cols, offs_m, offs_d, fhi, hi, q_start, kv_head, seed, qk_scale, softcap_log2,
            window_left, window_right, dropout_p, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_LEFT, HAS_RIGHT,
            HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PRECISION)

    dk = dk * softmax_scale
    mask = (cols[:, None] < n_k) & (offs_d[None, :] < HEAD_DIM)
    tokens = (k_start + cols).to(tl.int64)[:, None]
    tl.store(DK + tokens * stride_dkt + kv_head * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + tokens * stride_dvt + kv_head * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_key_blocks(dq, q, do, lse2, delta, K_seq, V_seq, stride_kt, stride_vt, n_k, pos, q_rows, offs_n, offs_d,
                   start, end, head, seed, qk_scale, softcap_log2, alibi_log2, window_left, window_right, dropout_p,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, end)."""
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        k = _load_tile(K_seq, cols, n_k, stride_kt, offs_d, HEAD_DIM, BLOCK_D, MASKED)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(V_seq, cols, n_k, stride_vt, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)                                 # (BLOCK_M, BLOCK_N)
        s, t = _scores(qk, pos[:, None], cols[None, :], qk_scale, softcap_log2, alibi_log2, HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            ok = _visible(pos[:, None], cols[None, :], n_k, window_left, window_right, True, HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)                                # (BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, head, q_rows[:, None], cols[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta,  # as in the dK/dV kernel
    DQ,                     # (total_q, Hq, D) output
    CuQ, CuK,
    Items,                  # (slots, 2) int32 work items (sequence, query block), longest first
    Alibi, Seed,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    stride_lse, stride_alibi,
    n_heads,                # Hq
    softmax_scale, qk_scale, softcap_log2, window_left, window_right, dropout_p,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    item = pid // n_heads
    head = pid % n_heads
    seq = tl.load(Items + 2 * item)
    if seq < 0:
        return
    m0, q_start, n_q, k_start, n_k = _sequence_extent(Items, CuQ, CuK, item, seq, BLOCK_M)
    kv_head = head // GROUP

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    row_ok = rows < n_q
    pos = rows + (n_k - n_q)
    q = _load_tile(Q + q_start.to(tl.int64) * stride_qt + head * stride_qh, rows, n_q, stride_qt, offs_d, HEAD_DIM,
                   BLOCK_D, True)                                                               # (BLOCK_M, BLOCK_D)
    do = _load_tile(DO + q_start.to(tl.int64) * stride_dot + head * stride_doh, rows, n_q, stride_dot, offs_d,
                    HEAD_DIM, BLOCK_D, True)
    lse_off = head.to(tl.int64) * stride_lse + q_start + rows
    lse2 = tl.load(Lse + lse_off, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + lse_off, mask=row_ok, other=0.0)
    K_seq = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    V_seq = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    alibi_log2 = 0.0
    if HAS_ALIBI:
        alibi_log2 = tl.load(Alibi + seq * stride_alibi + head) * 1.4426950408889634
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, flo, fhi, hi = _key_range(m0, n_q, n_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if HAS_LEFT:
        dq = _dq_key_blocks(dq, q, do, lse2, delta, K_seq, V_seq, stride_kt, stride_vt, n_k, pos, q_start + rows,
                            offs_n, offs_d, lo, flo, head, seed, qk_scale, softcap_log2, alibi_log2, window_left,
                            window_right, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_LEFT, HAS_RIGHT,
                            HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PRECISION)
    dq = _dq_key_blocks(dq, q, do, lse2, delta, K_seq, V_seq, stride_kt, stride_vt, n_k, pos, q_start + rows,
                        offs_n, offs_d, flo, fhi, head, seed, qk_scale, softcap_log2, alibi_log2, window_left,
                        window_right, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_LEFT, HAS_RIGHT,
                        HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PRECISION)
    dq = _dq_key_blocks(dq, q, do, lse2, delta, K_seq, V_seq, stride_kt, stride_vt, n_k, pos, q_start + rows,
                        offs_n, offs_d, fhi, hi, head, seed, qk_scale, softcap_log2, alibi_log2, window_left,
                        window_right, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_LEFT, HAS_RIGHT,
                        HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PRECISION)

    dq = dq * softmax_scale
    dq_ptrs = DQ + (q_start + rows).to(tl.int64)[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@launches_on_input_device
def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, dlse: torch.Tensor | None, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, softmax_scale: float, window_left: int, window_right: int,
                   softcap: float, alibi_slopes: torch.Tensor | None, dropout_p: float, seed: torch.Tensor | None,
                   configs: AttnConfigs | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: preprocess (δ), then dK/dV, then dQ. Tensors as in ``flash_attn_fwd``; dout like out
    (last dim contiguous), dlse like lse or None. Returns dq (like q), dk, dv (like k), contiguous."""
    total_q, n_heads, head_dim = q.shape
    total_k, n_kv_heads, _ = k.shape
    cfg = configs or choose_configs(head_dim, q.dtype, q.device, window=window_left >= 0, softcap=softcap > 0.0,
                                    dropout=dropout_p > 0.0)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)   # (total_q, Hq, D)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)   # (total_k, Hkv, D)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if total_q == 0 or total_k == 0:  # no (query, key) pair: every gradient is zero
        return dq.zero_(), dk.zero_(), dv.zero_()
    bd = block_d(head_dim)
    # Each tensor's strides read once, as a tuple: a .stride(i) call costs as much as .stride() does.
    sq, sk, sv, sdo, sout = q.stride(), k.stride(), v.stride(), dout.stride(), out.stride()
    sdq, sdk = (n_heads * head_dim, head_dim), (n_kv_heads * head_dim, head_dim)   # allocated contiguous above
    sdv = sdk
    stride_lse = lse.stride(0)

    delta = torch.empty_like(lse)
    block_t = 64 if q.is_cuda else 32
    # kernel.run(..., grid=, warmup=False) is what kernel[grid](...) calls, without the lambda in between that
    # forwards every argument once more (~0.6 µs per launch).
    _attn_bwd_preprocess_kernel.run(
        out, dout, dlse if dlse is not None else lse, delta, total_q,
        sout[0], sout[1], sdo[0], sdo[1], stride_lse,
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_T=block_t, HAS_DLSE=dlse is not None,
        grid=(cdiv(total_q, block_t), n_heads), warmup=False)

    has_softcap = softcap > 0.0
    qk_scale = softmax_scale / softcap if has_softcap else softmax_scale * LOG2E
    dummy = lse  # never read: stands in for absent optional tensors
    alibi = alibi_slopes if alibi_slopes is not None else dummy
    stride_alibi = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    flags = dict(GROUP=n_heads // n_kv_heads, HEAD_DIM=head_dim, BLOCK_D=bd, HAS_LEFT=window_left >= 0,
                 HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=has_softcap, HAS_ALIBI=alibi_slopes is not None,
                 HAS_DROPOUT=dropout_p > 0.0, PRECISION=precision(q.dtype))
    common = (softmax_scale, qk_scale, softcap * LOG2E, window_left, window_right, dropout_p)
    seed_t = seed if seed is not None else dummy

    kv_items, q_items = backward_schedules(cu_seqlens_q, cu_seqlens_k, total_q, total_k, cfg.dq.block_m,
                                           cfg.dkdv.block_n, window_left, window_right)
    _attn_bwd_dkdv_kernel.run(
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, kv_items, alibi, seed_t,
        sq[0], sq[1], sk[0], sk[1], sv[0], sv[1], sdo[0], sdo[1],
        sdk[0], sdk[1], sdv[0], sdv[1],
        stride_lse, stride_alibi, n_kv_heads, *common,
        BLOCK_M=cfg.dkdv.block_m, BLOCK_N=cfg.dkdv.block_n, num_warps=cfg.dkdv.num_warps,
        num_stages=cfg.dkdv.num_stages, grid=(kv_items.shape[0] * n_kv_heads,), warmup=False, **flags)

    _attn_bwd_dq_kernel.run(
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, q_items, alibi, seed_t,
        sq[0], sq[1], sk[0], sk[1], sv[0], sv[1], sdo[0], sdo[1],
        sdq[0], sdq[1],
        stride_lse, stride_alibi, n_heads, *common,
        BLOCK_M=cfg.dq.block_m, BLOCK_N=cfg.dq.block_n, num_warps=cfg.dq.num_warps, num_stages=cfg.dq.num_stages,
        grid=(q_items.shape[0] * n_heads,), warmup=False, **flags)
    return dq, dk, dv
