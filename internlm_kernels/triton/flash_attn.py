"""Variable-length flash attention: what the forward and backward kernels share.

Notation (one sequence b of the packed batch, one query head h, its key/value head h // GROUP):

    s_ij = scale · q_i · k_j                              (Lq × Lk scores of the sequence)
    s_ij = softcap · tanh(s_ij / softcap)                 with softcap > 0
    s_ij = s_ij - slope_h · |i + Lk - Lq - j|             with ALiBi
    s_ij = -inf where key j is not visible to query i     (causal / sliding window, below)
    lse_i = log Σ_j exp(s_ij),  p_ij = exp(s_ij - lse_i),  o_i = Σ_j p_ij v_j

Queries are aligned to the bottom-right of the keys: query i sits at key position pos_i = i + Lk - Lq, and key j is
visible when ``pos_i - left <= j <= pos_i + right`` (a bound of -1 is absent; causal means right = 0). A row that sees
no key gets o_i = 0 and lse_i = +inf. The kernels work in base 2 (exp2/log2, the hardware's fast path): scores carry
a factor log2(e), folded into the scale, and the stored lse is converted back to natural log.

Work is scheduled over documents, not over a padded (batch, max_seqlen) grid: ``schedule`` lists the (sequence,
block) pairs that exist, most expensive first, and each program takes one pair for one head. Within a program the
loop over the other side's blocks is split in three ranges, computed by ``_key_range`` / ``_query_range``: blocks
partly hidden by the window bounds or past the sequence end (masked), and the blocks in between that every row sees
whole (no mask work at all). Blocks that no row sees are never loaded.

This module holds the block-size table, the schedule and the @triton.jit helpers; the kernels are in
flash_attn_fwd.py and flash_attn_bwd.py.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .._tensor_cache import PerTensorCache
from ._host_math import cdiv, next_power_of_2

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One kernel's launch shape. ``block_m`` counts query rows and ``block_n`` key rows in every kernel."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class AttnConfigs:
    fwd: BlockConfig
    dkdv: BlockConfig   # a program owns block_n keys and steps through queries block_m at a time
    dq: BlockConfig     # a program owns block_m queries and steps through keys block_n at a time


# Chosen per head dim for Hopper (sm_90) in 16-bit, from compiling every candidate for sm_90 (no card was available
# to time them): the largest tiles that Triton compiles without register spills (cuobjdump: REG <= 255, STACK 0)
# and within the 227 KB of shared memory, preferring 8 warps (two warpgroups, each on a 64-row wgmma tile) and, at
# equal size, the deeper pipeline. Registers per thread / shared memory of the choices (causal, no other feature):
#   D=64   fwd 109 / 65 KB (two programs fit an SM)   dK/dV 210 / 66 KB    dQ 128 / 82 KB
#   D=128  fwd 196 / 131 KB                           dK/dV 255 / 132 KB   dQ 220 / 164 KB
#   D=256  fwd 248 / 131 KB                           dK/dV 178 / 68 KB    dQ 255 / 197 KB
# The dK/dV kernel holds two (block_n, D) fp32 accumulators plus a transposed score tile, so each feature's extra
# live values (window bounds, softcap's tanh term, dropout's Philox state) can tip it into spilling: its blocks come
# from _SM90_DKDV per feature combination instead.
# benchmarks/bench_attention.py (ATTN_SWEEP=1) times the alternatives on the card; update this table from it.
_SM90_CONFIGS = {
    64: AttnConfigs(fwd=BlockConfig(128, 64, 8, 3), dkdv=BlockConfig(64, 128, 8, 2), dq=BlockConfig(128, 64, 8, 3)),
    128: AttnConfigs(fwd=BlockConfig(128, 64, 8, 3), dkdv=BlockConfig(64, 128, 8, 2), dq=BlockConfig(128, 64, 8, 3)),
    256: AttnConfigs(fwd=BlockConfig(128, 32, 8, 2), dkdv=BlockConfig(32, 32, 8, 2), dq=BlockConfig(128, 32, 8, 2)),
}
# dK/dV blocks on sm_90 per (head dim, (sliding window, softcap, dropout)): the first spill-free candidate in the
# order above (largest tile, then 8 warps, then deeper pipeline), measured by compiling every combination for
# sm_90 (causal, GQA group 4; tests/test_attention.py compiles a subset, and all of them with SM90_SWEEP=1).
# Spills the previous single entry per head dim had (bytes/thread): D=64 dropout 24; D=128 softcap 48, dropout 160,
# window+softcap 32, softcap+dropout 512; D=256 none 72, window 160. ALiBi is not in the sweep (no model here
# uses it with these features): it takes the entry of its other features. At D = 256 no tile with block_n >= 64
# (the 64-row wgmma minimum for dK/dV's dsᵀ·q product) compiles spill-free with any feature, so the table takes
# 32-key tiles on mma.sync: whether that beats a wgmma tile with a small spill is for ATTN_SWEEP=1 on a card.
_B64, _B32 = BlockConfig(64, 128, 8, 2), BlockConfig(32, 128, 8, 2)
_SM90_DKDV = {
    64: {(w, s, d): _B32 if d else _B64 for w in (False, True) for s in (False, True) for d in (False, True)},
    128: {(False, False, False): _B64, (True, False, False): _B64,
          (False, True, False): _B32, (False, False, True): _B32, (True, True, False): _B32, (True, False, True): _B32,
          (False, True, True): BlockConfig(32, 64, 8, 2), (True, True, True): BlockConfig(32, 64, 8, 2)},
    256: {(w, s, d): BlockConfig(16, 32, 4, 2) if (w, s, d) in ((True, False, False), (False, True, False))
          else BlockConfig(32, 32, 8, 2) for w in (False, True) for s in (False, True) for d in (False, True)},
}
# Ampere-class cards (mma.sync, at most 164 KB of shared memory), chosen the same way for sm_80: all spill-free.
_SM80_CONFIGS = {
    64: AttnConfigs(fwd=BlockConfig(128, 64, 8, 2), dkdv=BlockConfig(64, 128, 8, 1), dq=BlockConfig(128, 64, 8, 2)),
    128: AttnConfigs(fwd=BlockConfig(128, 64, 8, 2), dkdv=BlockConfig(64, 64, 8, 2), dq=BlockConfig(128, 32, 8, 2)),
    256: AttnConfigs(fwd=BlockConfig(64, 32, 8, 1), dkdv=BlockConfig(16, 64, 8, 1), dq=BlockConfig(64, 32, 8, 1)),
}
# float32 inputs (accepted for testing) take exact fp32 products, which run on the FMA units, not the tensor cores:
# small tiles keep the register spills modest (none at D=64, up to ~3 KB per thread at D=256).
_FP32_CONFIGS = AttnConfigs(fwd=BlockConfig(16, 32, 4, 1), dkdv=BlockConfig(32, 16, 4, 1), dq=BlockConfig(32, 16, 4, 1))
# The Triton interpreter (CPU tests): small blocks so sequence tails, window edges and multi-block loops all occur
# at test sizes; block_m != block_n so that a swapped block size would show.
_INTERPRETER_CONFIGS = AttnConfigs(fwd=BlockConfig(32, 16), dkdv=BlockConfig(16, 32), dq=BlockConfig(32, 16))


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot's smallest K); the tail is masked."""
    return max(16, next_power_of_2(head_dim))


@functools.lru_cache(maxsize=64)   # every launch asks; on CUDA the answer costs a device-capability query
def choose_configs(head_dim: int, dtype: torch.dtype, device: torch.device, *, window: bool = False,
                   softcap: bool = False, dropout: bool = False) -> AttnConfigs:
    """The block table entry for this head dim and these features on this device (the interpreter's on CPU)."""
    if device.type != "cuda":
        return _INTERPRETER_CONFIGS
    if dtype == torch.float32:
        return _FP32_CONFIGS
    if torch.cuda.get_device_capability(device)[0] < 9:
        return _SM80_CONFIGS[min(k for k in _SM80_CONFIGS if k >= block_d(head_dim))]
    return sm90_configs(head_dim, window=window, softcap=softcap, dropout=dropout)


def sm90_configs(head_dim: int, *, window: bool, softcap: bool, dropout: bool) -> AttnConfigs:
    """The 16-bit Hopper entry: _SM90_CONFIGS for the head dim with the dK/dV blocks of these features."""
    d = min(k for k in _SM90_CONFIGS if k >= block_d(head_dim))
    return dataclasses.replace(_SM90_CONFIGS[d], dkdv=_SM90_DKDV[d][(window, softcap, dropout)])


# --------------------------------------------------------------------------------------------------
# Schedule: which (sequence, block) pairs exist, most expensive first
# --------------------------------------------------------------------------------------------------
def num_slots(total: int, batch: int, block: int) -> int:
    """An upper bound on Σ_b ceil(L_b / block) known from shapes alone (no device sync): each sequence adds at most
    one partial block to total / block."""
    return cdiv(total, block) + batch


def build_schedule(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total: int, block: int, over: str,
                   window_left: int, window_right: int) -> torch.Tensor:
    """(num_slots, 2) int32 work items (sequence, block index), sorted by estimated work, largest first.

    ``over="q"``: blocks of ``block`` query rows (forward, dQ), work = keys the block sees.
    ``over="k"``: blocks of ``block`` key rows (dK/dV), work = queries that see the block.
    ``total`` is the number of rows on the blocked side (q.shape[0] or k.shape[0]). Slots beyond the real item count
    hold sequence -1 (the program exits at once). Computed with torch ops on the device, so no host sync: the slot
    count is the shape bound ``num_slots``. Ties keep sequence order (stable sort), so the schedule is deterministic.
    """
    cq, ck = cu_seqlens_q.long(), cu_seqlens_k.long()
    lq, lk = cq[1:] - cq[:-1], ck[1:] - ck[:-1]                             # (batch,)
    batch = lq.numel()
    nblocks = ((lq if over == "q" else lk) + block - 1) // block            # (batch,)
    ends = torch.cumsum(nblocks, 0)                                          # (batch,)
    slot = torch.arange(num_slots(total, batch, block), device=cq.device)   # (slots,)
    seq = torch.searchsorted(ends, slot, right=True)                        # (slots,) batch where no item
    valid = seq < batch
    seq = seq.clamp(max=batch - 1)
    blk = slot - (ends[seq] - nblocks[seq])
    lq, lk = lq[seq], lk[seq]
    off = lk - lq                                                            # query i sits at key position i + off
    start, end = blk * block, blk * block + block
    if over == "q":
        # keys seen by rows [start, min(end, Lq)): from pos_first - left to pos_last + right
        pos_first, pos_last = start + off, torch.minimum(end, lq) - 1 + off
        lo = (pos_first - window_left).clamp(min=0) if window_left >= 0 else torch.zeros_like(lk)
        hi = torch.minimum(lk, pos_last + window_right + 1) if window_right >= 0 else lk
    else:
        # queries that see keys [start, min(end, Lk)): i + off >= j - right and i + off <= j + left
        last = torch.minimum(end, lk) - 1
        lo = (start - window_right - off).clamp(min=0) if window_right >= 0 else torch.zeros_like(lq)
        hi = torch.minimum(lq, last + window_left - off + 1) if window_left >= 0 else lq
    work = torch.where(valid, (hi - lo).clamp(min=0), torch.full_like(hi, -1))
    order = torch.sort(work, descending=True, stable=True).indices
    seq = torch.where(valid, seq, torch.full_like(seq, -1))
    return torch.stack((seq[order], blk[order]), dim=1).to(torch.int32).contiguous()


# A model calls attention once per layer (and again in the backward) with the same cu_seqlens tensors, so the handful
# of small torch ops in ``build_schedule`` runs once per batch, not per call. Under CUDA graph capture the schedule is
# built inside the captured work (device ops only), so a replay after ``cu_seqlens.copy_(new)`` schedules the new
# contents.
_schedules = PerTensorCache("the attention schedule", capturable=True)


def schedule(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total: int, block: int, over: str,
             window_left: int, window_right: int) -> torch.Tensor:
    """``build_schedule``, reused while both cu_seqlens tensors are the same and unmodified."""
    return _schedules.get((cu_seqlens_q, cu_seqlens_k), (total, block, over, window_left, window_right),
                          lambda: build_schedule(cu_seqlens_q, cu_seqlens_k, total, block, over, window_left,
                                                 window_right))


def backward_schedules(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int,
                       block_q: int, block_k: int, window_left: int, window_right: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's two work lists, (dK/dV over key blocks of ``block_k``, dQ over query blocks of ``block_q``),
    from one cache lookup: the same as two ``schedule`` calls. The dQ list is taken through ``schedule``, so when
    the forward used the same query blocks (every block table here) its cached list is reused, not rebuilt."""
    def build():
        return (build_schedule(cu_seqlens_q, cu_seqlens_k, total_k, block_k, "k", window_left, window_right),
                schedule(cu_seqlens_q, cu_seqlens_k, total_q, block_q, "q", window_left, window_right))

    return _schedules.get((cu_seqlens_q, cu_seqlens_k), (total_q, total_k, block_q, block_k, window_left,
                                                         window_right), build)


# --------------------------------------------------------------------------------------------------
# @triton.jit helpers shared by the kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    """tanh from one exp2: sign(x) · (1 - e) / (1 + e) with e = exp(-2|x|), exact at the ends and free of overflow."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # -2·log2(e)·|x|
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _sequence_extent(Items, CuQ, CuK, item, seq, BLOCK: tl.constexpr):
    """For work item ``item`` of sequence ``seq`` (>= 0): (first row of its block, q start, q length, k start,
    k length). The block counts query rows (forward, dQ) or key rows (dK/dV), BLOCK at a time."""
    start = tl.load(Items + 2 * item + 1) * BLOCK
    q_start = tl.load(CuQ + seq)
    n_q = tl.load(CuQ + seq + 1) - q_start
    k_start = tl.load(CuK + seq)
    n_k = tl.load(CuK + seq + 1) - k_start
    return start, q_start, n_q, k_start, n_k


@triton.jit
def _load_tile(seq_base, rows, n_rows, stride, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """(len(rows), BLOCK_D) tile of a (tokens, heads, D) tensor: ``seq_base`` points at (the sequence's first token,
    this head, 0) and ``rows`` are token indices within the sequence; rows >= n_rows (when CHECK_ROWS) and features
    >= HEAD_DIM read as 0. Row offsets are int64 (long sequences overflow int32) and derived from the loop index
    rather than from a pointer carried through the loop: the software pipeliner then recomputes the addresses of
    the tiles in flight instead of keeping them in registers (a carried pointer spilled ~250 bytes per thread)."""
    ptrs = seq_base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _scores(qk, pos, cols, qk_scale, softcap_log2, alibi_log2,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Base-2 scores from raw q·k products; ``pos`` (query key-positions) and ``cols`` (key indices) broadcast to
    qk's shape. Returns (scores, tanh term): the backward needs tanh' = 1 - t² (t is unused without softcap)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * qk_scale)
        s = t * softcap_log2
    else:
        t = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        dist = pos - cols
        s = s - alibi_log2 * tl.where(dist < 0, -dist, dist).to(tl.float32)
    return s, t


@triton.jit
def _visible(pos, cols, n_keys, window_left, window_right,
             CHECK_KEYS: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Which (query, key) pairs of a tile are visible; ``pos``/``cols`` broadcast to the tile shape."""
    if CHECK_KEYS:
        ok = cols < n_keys
    else:
        ok = cols >= 0
    if HAS_RIGHT:
        ok = ok & (cols <= pos + window_right)
    if HAS_LEFT:
        ok = ok & (cols >= pos - window_left)
    return ok


@triton.jit
def _dropout_keep(seed, head, q_rows, k_cols, dropout_p):
    """Dropout keep-mask from Philox keyed by ``seed`` with counter (key index, global query row, head, 0): the same
    element always gets the same draw, so the backward regenerates the forward's mask. ``q_rows``/``k_cols``
    broadcast to the tile shape."""
    c0 = (k_cols + q_rows * 0).to(tl.uint32)
    c1 = (q_rows + k_cols * 0).to(tl.uint32)
    c2 = c0 * 0 + head.to(tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c0 * 0)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _key_range(m0, n_q, n_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks for the query block starting at row m0: [lo, hi) is every key some row sees; [flo, fhi) are the
    whole blocks every row sees (no masking); [lo, flo) and [fhi, hi) need the mask. lo, flo, fhi are multiples of
    BLOCK_N unless clamped to hi (then the ranges after them are empty). Integers stay >= 0 before division."""
    off = n_k - n_q
    pos_first = m0 + off
    pos_last = tl.minimum(m0 + BLOCK_M, n_q) - 1 + off
    lo = n_k * 0  # a tensor, not a Python int, in both compiled and interpreted code
    flo = lo
    hi = n_k
    fhi = (n_k // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = (tl.maximum(pos_first - window_left, 0) // BLOCK_N) * BLOCK_N
        flo = tl.cdiv(tl.maximum(pos_last - window_left, 0), BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(hi, tl.maximum(pos_last + window_right + 1, 0))
        fhi = tl.minimum(fhi, (tl.maximum(pos_first + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    flo = tl.minimum(tl.maximum(flo, lo), hi)
    fhi = tl.minimum(tl.maximum(fhi, flo), hi)
    return lo, flo, fhi, hi


@triton.jit
def _query_range(n0, n_q, n_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that see the key block starting at n0, split like ``_key_range``: [flo, fhi) are the query
    blocks whose every row sees every key of the block. Keys past the sequence end need no mask here: they only
    feed their own dK/dV rows, which are never stored."""
    off = n_k - n_q
    last = tl.minimum(n0 + BLOCK_N, n_k) - 1
    lo = n_q * 0  # a tensor, not a Python int, in both compiled and interpreted code
    flo = lo
    hi = n_q
    fhi = n_q
    if HAS_RIGHT:  # row i sees key j only if i + off >= j - right
        lo = (tl.maximum(n0 - window_right - off, 0) // BLOCK_M) * BLOCK_M
        flo = tl.cdiv(tl.maximum(last - window_right - off, 0), BLOCK_M) * BLOCK_M
    if HAS_LEFT:  # row i sees key j only if i + off <= j + left
        hi = tl.minimum(hi, tl.maximum(last + window_left - off + 1, 0))
        fhi = (tl.maximum(n0 + window_left - off + 1, 0) // BLOCK_M) * BLOCK_M
    flo = tl.minimum(tl.maximum(flo, lo), hi)
    fhi = tl.minimum(tl.maximum(fhi, flo), hi)
    return lo, flo, fhi, hi
