"""Attention over a KV cache (decode, speculative / chunked prefill): Triton kernels and launch helpers.

Three kernels, no autograd (inference only):

``_append_kv_kernel`` writes the new keys and values of each sequence into the cache at positions
cache_seqlens[b] + t, rotating the keys on the way (the rotary helpers of triton/rotary.py), so the new k is read once
and written once, straight into its page.

``_decode_attn_kernel`` (split-KV "flash-decoding"). Sequence b has L_b keys at cache positions [first_b, L_b)
(first_b = the left padding), and n_q_b query tokens, query i at key position pos_i = i + L_b - n_q_b (bottom-right).
One program takes one key/value head, a tile of BLOCK_M query rows and one of ``num_splits`` slices of the keys. Its
rows are (query token, query head of the group) pairs, row r = token r // GROUP, head kv_head·GROUP + r % GROUP: the
GROUP query heads that share a key/value head read each key once, as one (BLOCK_M × D)·(D × BLOCK_N) product, which is
what makes GQA decode memory-bound on the KV cache alone rather than on GROUP re-reads of it. Per key block:

    s = scale · q kᵀ  (softcap · tanh(s / softcap); − slope·|pos_i − j|);  masked (window, causal, ends) to −inf
    m_new = max(m, rowmax s);  α = 2^(m − m_new);  p = 2^(s − m_new);  l = α l + Σ p;  acc = α acc + p V

(base 2, the scale carries log2 e); whole blocks that every row of the tile sees skip the mask, only the edge ranges
apply it. The keys of a split are the split's share of [first_b, last visible key]: with
S splits each takes ceil(span / S) keys rounded up to BLOCK_N, computed per sequence inside the kernel, so a long
sequence fills the card even at batch 1 and short ones end at once. Paged keys are found per key through the block
table (physical page block_table[b, j // PAGE_SIZE], row j % PAGE_SIZE); a key block lies in one or two pages.

``_combine_splits_kernel`` merges the S partial results (o_s, lse_s) of a row:

    lse = log Σ_s exp(lse_s),   o = Σ_s exp(lse_s − lse) · o_s          (a split that saw no key has lse_s = −inf)

With one split the attention kernel writes the final output itself and no combine runs. A row that sees no key gets
out = 0 and lse = +inf, as flash-attn.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .flash_attn import LOG2E, _scores, _visible, block_d
from .rotary import _blocks, _load_cos_sin, _rotate_rows

LN2 = tl.constexpr(0.6931471805599453)
# Keys a split should at least have before another split pays off (its partial result costs one extra row write).
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64


def launches_on_input_device(fn):
    """Run ``fn(t, ...)`` with t's GPU as the current device: Triton launches on the current device, and the inputs
    may live on another one."""
    @functools.wraps(fn)
    def on_device(t: torch.Tensor, *args, **kwargs):
        with torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext():
            return fn(t, *args, **kwargs)

    return on_device


# --------------------------------------------------------------------------------------------------
# Cache addressing
# --------------------------------------------------------------------------------------------------
@triton.jit
def _cache_rows(Cache, BlockTable, stride_bt, row_or_seq, cols, col_ok, stride_page, stride_tok, kv_head, stride_h,
                PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Pointers to (key j = cols, head kv_head, feature 0) of one sequence's cache, shape of ``cols``.
    Contiguous (PAGED False): Cache[row_or_seq, j]. Paged: Cache[block_table[row_or_seq, j // PAGE_SIZE],
    j % PAGE_SIZE]; ``col_ok`` keeps the block-table read inside the sequence's pages."""
    cols64 = cols.to(tl.int64)
    if PAGED:
        page = tl.load(BlockTable + row_or_seq.to(tl.int64) * stride_bt + cols // PAGE_SIZE, mask=col_ok, other=0)
        base = page.to(tl.int64) * stride_page + (cols64 % PAGE_SIZE) * stride_tok
    else:
        base = row_or_seq.to(tl.int64) * stride_page + cols64 * stride_tok
    return Cache + base + kv_head * stride_h


@triton.jit
def _cache_row_of(b, CacheBatchIdx, HAS_BATCH_IDX: tl.constexpr):
    """The cache row (contiguous) or block-table row (paged) of sequence b."""
    if HAS_BATCH_IDX:
        return tl.load(CacheBatchIdx + b).to(tl.int32)
    return b


# --------------------------------------------------------------------------------------------------
# Append (with rotary)
# --------------------------------------------------------------------------------------------------
@triton.jit
def _append_kv_kernel(
    K, V,                   # (B, Snew, Hkv, D) new keys / values; features contiguous
    KCache, VCache,         # contiguous (B_cache, S_cache, Hkv, D) or paged (num_pages, PAGE_SIZE, Hkv, D)
    CacheSeqlens,           # (B,) int32: keys already cached; new token t goes to position cache_seqlens[b] + t
    CacheBatchIdx,          # (B,) int32 cache row of each sequence (read only when HAS_BATCH_IDX)
    BlockTable,             # (B, pages) int32 (read only when PAGED)
    COS, SIN,               # (seqlen_ro, rotary_half) rotary tables (read only when HAS_ROTARY)
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_kc_page, stride_kc_tok, stride_kc_h,     # cache strides: batch row or page, token in it, head
    stride_vc_page, stride_vc_tok, stride_vc_h,
    stride_bt,              # block-table row stride
    stride_cos, stride_sin,
    n_new,                  # Snew
    n_kv_heads,             # Hkv
    head_dim,               # D
    rotary_half,            # rotary_dim / 2
    seqlen_ro,              # rows of the rotary tables
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
    HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, COPY_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr,  # new tokens per program
    BLOCK_H: tl.constexpr,  # heads per program
    BLOCK_R: tl.constexpr,  # power of two >= rotary_half
    BLOCK_TAIL: tl.constexpr,  # power of two >= D - rotary_dim
    BLOCK_D: tl.constexpr,  # power of two >= D (value copy)
):
    b = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < n_new
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    head = heads[None, :, None]
    row_ok = tok_ok[:, None, None] & (head < n_kv_heads)
    pos = tl.load(CacheSeqlens + b) + tok                                        # (BLOCK_T,) cache positions
    row = _cache_row_of(b, CacheBatchIdx, HAS_BATCH_IDX)
    tok64 = tok.to(tl.int64)[:, None, None]
    b64 = b.to(tl.int64)
    k_src = K + b64 * stride_kb + tok64 * stride_kt + head * stride_kh
    v_src = V + b64 * stride_vb + tok64 * stride_vt + head * stride_vh
    k_dst = _cache_rows(KCache, BlockTable, stride_bt, row, pos, tok_ok, stride_kc_page, stride_kc_tok, 0, 0,
                        PAGED, PAGE_SIZE)[:, None, None] + head * stride_kc_h
    v_dst = _cache_rows(VCache, BlockTable, stride_bt, row, pos, tok_ok, stride_vc_page, stride_vc_tok, 0, 0,
                        PAGED, PAGE_SIZE)[:, None, None] + head * stride_vc_h
    d = tl.arange(0, BLOCK_D)[None, None, :]
    d_ok = row_ok & (d < head_dim)
    if HAS_ROTARY:
        cos, sin = _load_cos_sin(COS, SIN, pos, tok_ok, stride_cos, stride_sin, rotary_half, seqlen_ro, False,
                                 BLOCK_R)
        _rotate_rows(k_src, k_dst, cos, sin, row_ok, rotary_half, head_dim, INTERLEAVED, COPY_TAIL, BLOCK_R,
                     BLOCK_TAIL)
    else:
        tl.store(k_dst + d, tl.load(k_src + d, mask=d_ok), mask=d_ok)
    tl.store(v_dst + d, tl.load(v_src + d, mask=d_ok), mask=d_ok)


@launches_on_input_device
def append_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              cache_seqlens: torch.Tensor, cache_batch_idx: torch.Tensor | None, block_table: torch.Tensor | None,
              cos: torch.Tensor | None, sin: torch.Tensor | None, interleaved: bool) -> None:
    """Write k, v (B, Snew, Hkv, D) into the caches at positions cache_seqlens[b] + t, rotating k when cos/sin are
    given. Every tensor's last dim is contiguous; cache_seqlens, cache_batch_idx and block_table are int32."""
    B, n_new, n_kv_heads, head_dim = k.shape
    if B == 0 or n_new == 0:
        return
    rotary_half = cos.shape[1] if cos is not None else head_dim // 2
    block_t, block_h, block_r, block_tail = _blocks(n_kv_heads, rotary_half, head_dim)
    dummy = cache_seqlens
    paged = block_table is not None
    grid = (triton.cdiv(n_new, block_t), B, triton.cdiv(n_kv_heads, block_h))
    _append_kv_kernel[grid](
        k, v, k_cache, v_cache, cache_seqlens,
        cache_batch_idx if cache_batch_idx is not None else dummy, block_table if paged else dummy,
        cos if cos is not None else k, sin if sin is not None else k,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_table.stride(0) if paged else 0,
        cos.stride(0) if cos is not None else 0, sin.stride(0) if sin is not None else 0,
        n_new, n_kv_heads, head_dim, rotary_half, cos.shape[0] if cos is not None else 0,
        PAGED=paged, PAGE_SIZE=k_cache.shape[1] if paged else 1, HAS_BATCH_IDX=cache_batch_idx is not None,
        HAS_ROTARY=cos is not None, INTERLEAVED=interleaved, COPY_TAIL=2 * rotary_half < head_dim,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_TAIL=block_tail,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)


# --------------------------------------------------------------------------------------------------
# Split-KV attention
# --------------------------------------------------------------------------------------------------
@triton.jit
def _decode_key_blocks(acc, l_i, m_i, lo, hi, q, KCache, VCache, BlockTable, stride_bt, row, kv_head, stride_kc_page,
                       stride_kc_tok, stride_kc_h, stride_vc_page, stride_vc_tok, stride_vc_h, pos, offs_n,
                       offs_d, qk_scale, softcap_log2, alibi_log2, window_left, window_right,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                       MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update over the keys [lo, hi) in blocks of BLOCK_N. MASKED applies the visibility mask and
    cuts the last block at hi (edge ranges); unmasked ranges are whole blocks that every row sees."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n                                           # (BLOCK_N,) key positions
        if MASKED:
            col_ok = cols < hi
            load_ok = col_ok[:, None] & d_ok
        else:
            col_ok = cols >= 0
            load_ok = d_ok
        k_ptrs = _cache_rows(KCache, BlockTable, stride_bt, row, cols, col_ok, stride_kc_page, stride_kc_tok,
                             kv_head, stride_kc_h, PAGED, PAGE_SIZE)
        k = tl.load(k_ptrs[:, None] + offs_d[None, :], mask=load_ok, other=0.0)      # (BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)      # (BLOCK_M, BLOCK_N)
        s, _ = _scores(qk, pos[:, None], cols[None, :], qk_scale, softcap_log2, alibi_log2, HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            ok = _visible(pos[:, None], cols[None, :], hi, window_left, window_right, True, HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)    # nothing visible yet: keep p = α = 0
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = _cache_rows(VCache, BlockTable, stride_bt, row, cols, col_ok, stride_vc_page, stride_vc_tok,
                             kv_head, stride_vc_h, PAGED, PAGE_SIZE)
        v = tl.load(v_ptrs[:, None] + offs_d[None, :], mask=load_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _decode_attn_kernel(
    Q,                      # (total_q, Hq, D) queries of all sequences, packed (rows CuQ[b]:CuQ[b+1] are sequence b)
    KCache, VCache,         # contiguous (B_cache, S_cache, Hkv, D) or paged (num_pages, PAGE_SIZE, Hkv, D)
    Out,                    # (total_q, Hq, D) output (written when SPLITS == 1)
    Lse,                    # (Hq, total_q) float32 output (written when SPLITS == 1)
    OutPart,                # (SPLITS, total_q, Hq, D) float32 partial outputs (SPLITS > 1)
    LsePart,                # (SPLITS, total_q, Hq) float32 partial lse, -inf for a split that saw no key (SPLITS > 1)
    CuQ,                    # (B + 1,) int32 query offsets
    SeqlensK,               # (B,) int32 keys of each sequence, after the append
    CacheBatchIdx,          # (B,) int32 cache / block-table row of each sequence (read only when HAS_BATCH_IDX)
    LeftPad,                # (B,) int32 first valid cache position (read only when HAS_LEFTPAD)
    BlockTable,             # (B, pages) int32 (read only when PAGED)
    Alibi,                  # (Hq,) or (B, Hq) float32 slopes (read only when HAS_ALIBI)
    stride_qt, stride_qh,
    stride_kc_page, stride_kc_tok, stride_kc_h,
    stride_vc_page, stride_vc_tok, stride_vc_h,
    stride_ot, stride_oh,
    stride_lse,             # head stride of Lse (= total_q)
    stride_bt,              # block-table row stride
    stride_alibi,           # sequence stride of Alibi (0: one slope per head for all)
    total_q,                # rows of Q (partial-result strides)
    n_heads,                # Hq
    qk_scale,               # softmax_scale·log2(e), or softmax_scale / softcap with HAS_SOFTCAP
    softcap_log2,           # softcap·log2(e) (HAS_SOFTCAP)
    window_left, window_right,   # visible keys pos - left <= j <= pos + right (HAS_LEFT / HAS_RIGHT; causal: right 0)
    GROUP: tl.constexpr,    # Hq // Hkv
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # (token, head) rows per program, a power of two >= 16
    BLOCK_N: tl.constexpr,  # keys per loop step
    SPLITS: tl.constexpr,   # key slices per (sequence, kv head, row tile)
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for float32 inputs)
):
    pid = tl.program_id(0)
    b = pid // (n_heads // GROUP)
    kv_head = pid % (n_heads // GROUP)
    split = tl.program_id(2)
    q_start = tl.load(CuQ + b)
    n_q = tl.load(CuQ + b + 1) - q_start
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)         # (BLOCK_M,) row = token · GROUP + group member
    tok = r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_ok = tok < n_q
    if tl.program_id(1) * BLOCK_M >= n_q * GROUP:
        return
    n_k = tl.load(SeqlensK + b)
    pos = tok + n_k - n_q                                           # key position of each row's query
    first = 0
    if HAS_LEFTPAD:
        first = tl.load(LeftPad + b)
    # Keys some row of the tile may see: [lo, hi).
    lo = n_k * 0 + first
    hi = n_k
    pos_first = tl.program_id(1) * BLOCK_M // GROUP + n_k - n_q
    pos_last = tl.minimum(tl.program_id(1) * BLOCK_M + BLOCK_M - 1, n_q * GROUP - 1) // GROUP + n_k - n_q
    if HAS_LEFT:
        lo = tl.maximum(lo, pos_first - window_left)
    if HAS_RIGHT:
        hi = tl.minimum(hi, pos_last + window_right + 1)
    span = tl.maximum(hi - lo, 0)
    chunk = tl.cdiv(tl.cdiv(span, SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)

    row = _cache_row_of(b, CacheBatchIdx, HAS_BATCH_IDX)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok, other=0.0)              # (BLOCK_M, BLOCK_D)
    alibi_log2 = 0.0
    if HAS_ALIBI:
        alibi_log2 = (tl.load(Alibi + b * stride_alibi + head, mask=row_ok, other=0.0) * 1.4426950408889634)[:, None]

    # Keys every row of the tile sees, [full_lo, full_hi) in whole blocks, skip the mask; the edges keep it.
    full_lo = start
    full_hi = end
    if HAS_LEFT:
        full_lo = tl.minimum(tl.maximum(start, pos_last - window_left), end)
    if HAS_RIGHT:
        full_hi = tl.maximum(full_lo, tl.minimum(end, pos_first + window_right + 1))
    full_hi = full_lo + (full_hi - full_lo) // BLOCK_N * BLOCK_N

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    ranges_args = (q, KCache, VCache, BlockTable, stride_bt, row, kv_head, stride_kc_page, stride_kc_tok,
                   stride_kc_h, stride_vc_page, stride_vc_tok, stride_vc_h, pos, offs_n, offs_d, qk_scale,
                   softcap_log2, alibi_log2, window_left, window_right)
    if HAS_LEFT:
        acc, l_i, m_i = _decode_key_blocks(acc, l_i, m_i, start, full_lo, *ranges_args, HEAD_DIM, BLOCK_N, PAGED,
                                           PAGE_SIZE, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, PRECISION)
    acc, l_i, m_i = _decode_key_blocks(acc, l_i, m_i, full_lo, full_hi, *ranges_args, HEAD_DIM, BLOCK_N, PAGED,
                                       PAGE_SIZE, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, PRECISION)
    acc, l_i, m_i = _decode_key_blocks(acc, l_i, m_i, full_hi, end, *ranges_args, HEAD_DIM, BLOCK_N, PAGED,
                                       PAGE_SIZE, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2
    if SPLITS == 1:
        lse = tl.where(empty, float("inf"), lse)
        o_ptrs = Out + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok)
        tl.store(Lse + head.to(tl.int64) * stride_lse + q_rows, lse, mask=row_ok)
    else:
        lse = tl.where(empty, float("-inf"), lse)
        part = (split * total_q + q_rows) * n_heads + head                # (BLOCK_M,) row of the partial results
        tl.store(OutPart + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok)
        tl.store(LsePart + part, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    OutPart,                # (SPLITS, total_q, Hq, D) float32 partial outputs
    LsePart,                # (SPLITS, total_q, Hq) float32 partial lse (-inf: the split saw no key)
    Out,                    # (total_q, Hq, D) output
    Lse,                    # (Hq, total_q) float32 output
    stride_ot, stride_oh, stride_lse,
    total_q, n_heads,
    SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # SPLITS padded to a power of two
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)                              # (token, head) = (row // Hq, row % Hq)
    t = row // n_heads
    h = row % n_heads
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LsePart + s * (total_q * n_heads) + row, mask=s < SPLITS, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_use)                                        # 0 for empty splits
    total = tl.sum(w, 0)
    o_s = tl.load(OutPart + (s[:, None] * (total_q * n_heads) + row) * HEAD_DIM + d[None, :],
                  mask=(s[:, None] < SPLITS) & (d[None, :] < HEAD_DIM), other=0.0)
    empty = total == 0.0
    out = tl.sum(o_s * w[:, None], 0) / tl.where(empty, 1.0, total)
    lse = tl.where(empty, float("inf"), m_use + tl.log(tl.where(empty, 1.0, total)))
    tl.store(Out + t * stride_ot + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d < HEAD_DIM)
    tl.store(Lse + h * stride_lse + t, lse)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_splits(batch: int, n_kv_heads: int, row_tiles: int, key_capacity: int, device: torch.device) -> int:
    """num_splits=0: enough programs to fill the card twice over, from shapes alone (no device sync), never giving a
    split fewer than MIN_KEYS_PER_SPLIT keys of the cache's capacity. One split on CPU (the interpreter)."""
    if device.type != "cuda":
        return 1
    programs = batch * n_kv_heads * row_tiles
    want = triton.cdiv(2 * _sm_count(device), max(programs, 1))
    return max(1, min(want, triton.cdiv(key_capacity, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


def decode_blocks(group: int, max_q: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): a row tile that holds the query heads of a group for as many query tokens as fit in 64
    rows (16 at least: tl.dot's smallest M), and key blocks of 64 (32 with fp32 or D = 256, for registers; 16 under
    the interpreter so multi-block loops and page crossings occur at test sizes)."""
    block_m = max(16, min(64, triton.next_power_of_2(group * max(max_q, 1))))
    if device.type != "cuda":
        return block_m, 16
    return block_m, 32 if dtype == torch.float32 or head_dim > 128 else 64


@launches_on_input_device
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     seqlens_k: torch.Tensor, max_q: int, cache_batch_idx: torch.Tensor | None,
                     cache_leftpad: torch.Tensor | None, block_table: torch.Tensor | None, softmax_scale: float,
                     window_left: int, window_right: int, softcap: float, alibi_slopes: torch.Tensor | None,
                     num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (total_q, Hq, D) packed by cu_seqlens_q (B + 1,) int32, at most ``max_q`` tokens per sequence; sequence b
    attends to cache positions [cache_leftpad[b], seqlens_k[b]). Returns out (total_q, Hq, D), lse (Hq, total_q)
    float32. ``num_splits`` 0 chooses from the shapes (``choose_splits``)."""
    total_q, n_heads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    n_kv_heads = k_cache.shape[2]
    group = n_heads // n_kv_heads
    out = torch.empty_like(q)
    lse = torch.empty((n_heads, total_q), dtype=torch.float32, device=q.device)
    block_m, block_n = decode_blocks(group, max_q, head_dim, q.dtype, q.device)
    row_tiles = triton.cdiv(group * max(max_q, 1), block_m)
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    splits = num_splits or choose_splits(batch, n_kv_heads, row_tiles, capacity, q.device)
    if total_q == 0 or batch == 0:
        return out, lse
    if splits > 1:
        out_part = torch.empty((splits, total_q, n_heads, head_dim), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, total_q, n_heads), dtype=torch.float32, device=q.device)
    else:
        out_part = lse_part = lse  # never written
    has_softcap = softcap > 0.0
    dummy = seqlens_k
    grid = (batch * n_kv_heads, row_tiles, splits)
    _decode_attn_kernel[grid](
        q, k_cache, v_cache, out, lse, out_part, lse_part, cu_seqlens_q, seqlens_k,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        cache_leftpad if cache_leftpad is not None else dummy,
        block_table if paged else dummy,
        alibi_slopes if alibi_slopes is not None else lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(1), lse.stride(0), block_table.stride(0) if paged else 0,
        alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
        total_q, n_heads,
        softmax_scale / softcap if has_softcap else softmax_scale * LOG2E, softcap * LOG2E,
        window_left, window_right,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n, SPLITS=splits,
        PAGED=paged, PAGE_SIZE=k_cache.shape[1] if paged else 1,
        HAS_BATCH_IDX=cache_batch_idx is not None, HAS_LEFTPAD=cache_leftpad is not None,
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=has_softcap,
        HAS_ALIBI=alibi_slopes is not None, PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=4, num_stages=2,
    )
    if splits > 1:
        _combine_splits_kernel[(total_q * n_heads,)](
            out_part, lse_part, out, lse, out.stride(0), out.stride(1), lse.stride(0), total_q, n_heads,
            SPLITS=splits, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)
    return out, lse
