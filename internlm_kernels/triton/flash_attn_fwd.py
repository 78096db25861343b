"""Variable-length flash attention forward: Triton kernel and launch helper (math and scheduling: flash_attn.py).

One program computes BLOCK_M query rows of one sequence for one query head. It loads its Q tile once and streams
the K/V blocks the rows can see, keeping the online softmax in registers (all in base 2):

    m_new = max(m, rowmax(s));   α = 2^(m - m_new);   p = 2^(s - m_new)
    l = α·l + rowsum(p);         acc = α·acc + p·V;   m = m_new
    out = acc / l,               lse = (m + log2 l) · ln 2      (l = 0: out = 0, lse = +inf)

Dropout (p_drop > 0) zeroes elements of p after they entered l and scales the output by 1 / (1 - p_drop), so l stays
the undropped normalizer and lse is the same as without dropout.

Memory: Q, K and V are read once per (query block, key block) pair that is visible, out and lse written once.
GQA reads key/value head h // GROUP directly (nothing is repeated in memory); the schedule puts the heads of one work
item next to each other, so the heads sharing a K/V head run together and hit L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import launches_on_input_device
from ._host_math import cdiv
from .flash_attn import (
    LOG2E,
    BlockConfig,
    _dropout_keep,
    _key_range,
    _load_tile,
    _scores,
    _sequence_extent,
    _visible,
    block_d,
    choose_configs,
    schedule,
)


@triton.jit
def _fwd_key_blocks(acc, l_i, m_i, q, K_seq, V_seq, stride_kt, stride_vt, n_k, pos, q_rows, offs_n, offs_d, start, end,
                    head, seed, qk_scale, softcap_log2, alibi_log2, window_left, window_right, dropout_p,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update over key blocks [start, end); MASKED applies the visibility mask (edge blocks)."""
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n                                                              # (BLOCK_N,) key index
        k = _load_tile(K_seq, cols, n_k, stride_kt, offs_d, HEAD_DIM, BLOCK_D, MASKED)  # (BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)                         # (BLOCK_M, BLOCK_N)
        s, _ = _scores(qk, pos[:, None], cols[None, :], qk_scale, softcap_log2, alibi_log2, HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            ok = _visible(pos[:, None], cols[None, :], n_k, window_left, window_right, True, HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: keep p = α = 0
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, head, q_rows[:, None], cols[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_tile(V_seq, cols, n_k, stride_vt, offs_d, HEAD_DIM, BLOCK_D, MASKED)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,                      # (total_q, Hq, D) queries; every tensor's last dim is contiguous
    K,                      # (total_k, Hkv, D) keys
    V,                      # (total_k, Hkv, D) values
    Out,                    # (total_q, Hq, D) output
    Lse,                    # (Hq, total_q) float32 output: natural-log softmax normalizer of each row
    CuQ,                    # (batch + 1,) int32 query offsets of the sequences
    CuK,                    # (batch + 1,) int32 key offsets
    Items,                  # (slots, 2) int32 work items (sequence, query block), longest first; sequence -1 = none
    Alibi,                  # (Hq,) or (batch, Hq) float32 ALiBi slopes (read only when HAS_ALIBI)
    Seed,                   # (1,) int64 dropout seed (read only when HAS_DROPOUT)
    stride_qt, stride_qh,   # token and head strides of each tensor, in elements
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_lse,             # head stride of Lse (= total_q)
    stride_alibi,           # sequence stride of Alibi (0 when one slope per head serves every sequence)
    n_heads,                # Hq
    qk_scale,               # q·k multiplier: softmax_scale·log2(e), or softmax_scale / softcap with HAS_SOFTCAP
    softcap_log2,           # softcap·log2(e) (HAS_SOFTCAP)
    window_left,            # visible keys: pos - window_left <= j (HAS_LEFT) ...
    window_right,           # ... and j <= pos + window_right (HAS_RIGHT; 0 for causal)
    dropout_p,              # probability of zeroing an attention weight (HAS_DROPOUT)
    GROUP: tl.constexpr,    # Hq // Hkv query heads per key/value head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for float32 inputs (tests), else the default
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
    rows = m0 + offs_m                      # (BLOCK_M,) query index in the sequence
    pos = rows + (n_k - n_q)                # key position of each query (bottom-right alignment)
    q_rows = q_start + rows                 # row in the packed tensor (dropout counter)

    Q_seq = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
    K_seq = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    V_seq = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    q = _load_tile(Q_seq, rows, n_q, stride_qt, offs_d, HEAD_DIM, BLOCK_D, True)  # (BLOCK_M, BLOCK_D)

    alibi_log2 = 0.0
    if HAS_ALIBI:
        alibi_log2 = tl.load(Alibi + seq * stride_alibi + head) * 1.4426950408889634
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lo, flo, fhi, hi = _key_range(m0, n_q, n_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if HAS_LEFT:  # blocks cut by the left window edge
        acc, l_i, m_i = _fwd_key_blocks(
            acc, l_i, m_i, q, K_seq, V_seq, stride_kt, stride_vt, n_k, pos, q_rows, offs_n, offs_d, lo, flo, head,
            seed, qk_scale, softcap_log2, alibi_log2, window_left, window_right, dropout_p, HEAD_DIM, BLOCK_D,
            BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PRECISION)
    acc, l_i, m_i = _fwd_key_blocks(  # blocks every row sees whole
        acc, l_i, m_i, q, K_seq, V_seq, stride_kt, stride_vt, n_k, pos, q_rows, offs_n, offs_d, flo, fhi, head,
        seed, qk_scale, softcap_log2, alibi_log2, window_left, window_right, dropout_p, HEAD_DIM, BLOCK_D,
        BLOCK_N, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PRECISION)
    acc, l_i, m_i = _fwd_key_blocks(  # the diagonal / right window edge and the sequence's last partial block
        acc, l_i, m_i, q, K_seq, V_seq, stride_kt, stride_vt, n_k, pos, q_rows, offs_n, offs_d, fhi, hi, head,
        seed, qk_scale, softcap_log2, alibi_log2, window_left, window_right, dropout_p, HEAD_DIM, BLOCK_D,
        BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row_ok = rows < n_q
    o_ptrs = Out + (q_start + rows).to(tl.int64)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + head.to(tl.int64) * stride_lse + q_start + rows, lse, mask=row_ok)


def precision(dtype: torch.dtype) -> str | None:
    """tl.dot input precision: exact float32 products for float32 inputs (tf32 would miss the 1e-5 tolerance)."""
    return "ieee" if dtype == torch.float32 else None


@launches_on_input_device
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, softmax_scale: float, window_left: int, window_right: int,
                   softcap: float, alibi_slopes: torch.Tensor | None, dropout_p: float, seed: torch.Tensor | None,
                   config: BlockConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. q (total_q, Hq, D), k/v (total_k, Hkv, D) with a contiguous last dim; window bounds are
    -1 when absent (causal is window_right = 0). Returns out (total_q, Hq, D) and lse (Hq, total_q) float32."""
    total_q, n_heads, head_dim = q.shape
    cfg = config or choose_configs(head_dim, q.dtype, q.device).fwd
    out = torch.empty_like(q, memory_format=torch.contiguous_format)   # (total_q, Hq, D)
    lse = q.new_empty((n_heads, total_q), dtype=torch.float32)
    items = schedule(cu_seqlens_q, cu_seqlens_k, total_q, cfg.block_m, "q", window_left, window_right)
    grid = (items.shape[0] * n_heads,)
    if grid[0] == 0:
        return out, lse
    has_softcap = softcap > 0.0
    dummy = lse  # never read: stands in for absent optional tensors
    # Each tensor's strides read once, as a tuple: a .stride(i) call costs as much as .stride() does.
    sq, sk, sv, so = q.stride(), k.stride(), v.stride(), out.stride()
    # kernel.run(..., grid=, warmup=False) is what kernel[grid](...) calls, without the lambda in between that
    # forwards all ~40 arguments once more (~0.6 µs per launch).
    _attn_fwd_kernel.run(
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, items,
        alibi_slopes if alibi_slopes is not None else dummy, seed if seed is not None else dummy,
        sq[0], sq[1], sk[0], sk[1], sv[0], sv[1], so[0], so[1],
        total_q,  # lse's row stride (contiguous)
        alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
        n_heads,
        softmax_scale / softcap if has_softcap else softmax_scale * LOG2E, softcap * LOG2E,
        window_left, window_right, dropout_p,
        GROUP=n_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=has_softcap,
        HAS_ALIBI=alibi_slopes is not None, HAS_DROPOUT=dropout_p > 0.0, PRECISION=precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, grid=grid, warmup=False,
    )
    return out, lse


@triton.jit
def _dropout_mask_kernel(
    Seed,                   # (1,) int64 dropout seed
    Keep,                   # (n_heads, total_q, width) bool output: the forward's keep pattern
    total_q, width,
    dropout_p,
    BLOCK_T: tl.constexpr,  # query rows per program
    BLOCK_W: tl.constexpr,  # key columns per program
):
    head = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    keep = _dropout_keep(tl.load(Seed), head, rows[:, None], cols[None, :], dropout_p)
    ptrs = Keep + (head.to(tl.int64) * total_q + rows[:, None]) * width + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < total_q) & (cols[None, :] < width))


@launches_on_input_device
def dropout_mask(seed: torch.Tensor, n_heads: int, total_q: int, width: int, dropout_p: float) -> torch.Tensor:
    """The dropout pattern the kernels apply: keep[h, t, j] for packed query row t and key j of its sequence (the
    Philox counter depends on nothing else). For tests and flash-attn's return_attn_probs."""
    keep = torch.empty((n_heads, total_q, width), dtype=torch.int8, device=seed.device)
    if keep.numel():
        grid = (cdiv(total_q, 32), cdiv(width, 64), n_heads)
        _dropout_mask_kernel[grid](seed, keep, total_q, width, dropout_p, BLOCK_T=32, BLOCK_W=64)
    return keep.view(torch.bool)
