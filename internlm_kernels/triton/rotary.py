"""Rotary position embedding: Triton kernels and their launch helpers (no autograd here).

A token at position p rotates each feature pair (x1, x2) of its first rotary_dim features by the angle whose
cosine and sine are c = cos[p, i], s = sin[p, i] (tables of shape (seqlen_ro, rotary_dim / 2)):

    (x1, x2) -> (x1 c - x2 s,  x1 s + x2 c)         conjugate (the backward): s -> -s

Pairs are (x[i], x[i + rotary_dim/2]) in the rotate-half form (InternLM2, Llama) and (x[2i], x[2i+1]) in the
interleaved form (GPT-J); features past rotary_dim pass through. Positions: in a (B, S, H, D) batch the token at
index t of sequence b sits at t + offset[b]; in a packed (total, H, D) tensor with cu_seqlens, positions restart at
0 in each sequence, so token t of the pack sits at t - cu_seqlens[b] + offset[b] where b is its sequence, found by a
binary search over cu_seqlens inside the kernel (so no max_seqlen-shaped grid and no host sync is needed).

Each program takes BLOCK_T tokens × BLOCK_H heads; it loads the cos/sin rows of its tokens once and applies them to
all its heads, reads every x element once and writes every output element once (one pass; in place when out is x:
each element is read before it is written by the same program).

The fused InternLM2 kernel reads the packed output of the wqkv projection, (..., n_kv_heads, g + 2, D): per KV group
g query heads, one key head, one value head. In one pass it writes q (..., n_kv_heads·g, D) and k (..., n_kv_heads, D)
rotated and v (..., n_kv_heads, D) copied (cos 1, sin 0), in the layout attention takes; its backward gathers dq, dk,
dv the same way and writes the gradient of the packed tensor, rotated back, in one pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import launches_on_input_device
from ._host_math import cdiv, next_power_of_2


@triton.jit
def _batch_and_tokens(seqlen, BLOCK_T: tl.constexpr):
    """(sequence, (BLOCK_T,) token indices) of this program: grid axis 0 enumerates (sequence, token block) pairs,
    so neither the batch nor the sequence length meets the 65,535 limit of grid axes 1 and 2."""
    n_token_blocks = tl.cdiv(seqlen, BLOCK_T)
    pid = tl.program_id(0)
    return pid // n_token_blocks, (pid % n_token_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)


@triton.jit
def _token_positions(
    tok,              # (BLOCK_T,) int32 token indices: inside sequence pid_b (batch) or inside the pack (packed)
    pid_b,            # the sequence of this program in batch mode
    CU_SEQLENS,       # (n_seqs + 1,) int32 sequence starts in the pack (read only when IS_VARLEN)
    SEQLEN_OFFSETS,   # (n_seqs,) per-sequence position offsets (read only when HAS_OFFSET_TENSOR)
    seqlen_offset,    # the offset of every sequence when there is no offset tensor
    n_seqs,           # number of sequences (packed mode)
    n_search_steps,   # ceil(log2(n_seqs)): binary-search steps that find a token's sequence
    IS_VARLEN: tl.constexpr,
    HAS_OFFSET_TENSOR: tl.constexpr,
):
    if IS_VARLEN:
        # Find the last sequence b with cu[b] <= tok; the invariant cu[lo] <= tok < cu[hi] skips empty sequences.
        lo = tl.zeros_like(tok)
        hi = tl.zeros_like(tok) + n_seqs
        for _ in range(n_search_steps):
            mid = (lo + hi) // 2
            go_right = tl.load(CU_SEQLENS + mid) <= tok
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        seq = lo
        pos = tok - tl.load(CU_SEQLENS + seq)
    else:
        seq = pid_b
        pos = tok
    if HAS_OFFSET_TENSOR:
        pos += tl.load(SEQLEN_OFFSETS + seq).to(tl.int32)
    else:
        pos += seqlen_offset
    return pos


@triton.jit
def _load_cos_sin(
    COS, SIN,         # (seqlen_ro, rotary_half) tables
    pos,              # (BLOCK_T,) positions
    tok_ok,           # (BLOCK_T,) which tokens exist
    stride_cos, stride_sin,
    rotary_half, seqlen_ro,
    CONJUGATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """cos and sin (BLOCK_T, 1, BLOCK_R) in float32, sin negated for the conjugate rotation."""
    r = tl.arange(0, BLOCK_R)
    # Positions past the table are refused by the ops layer; the mask only keeps the load inside the table.
    mask = (tok_ok & (pos < seqlen_ro))[:, None] & (r < rotary_half)[None, :]
    pos64 = pos.to(tl.int64)[:, None]
    cos = tl.load(COS + pos64 * stride_cos + r[None, :], mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + pos64 * stride_sin + r[None, :], mask=mask, other=0.0).to(tl.float32)
    if CONJUGATE:
        sin = -sin
    return cos[:, None, :], sin[:, None, :]


@triton.jit
def _rotate_rows(
    SRC,              # (BLOCK_T, BLOCK_H, 1) pointers to the first feature of each (token, head) row read
    DST,              # (BLOCK_T, BLOCK_H, 1) pointers to the first feature of each row written
    cos, sin,         # float32, broadcastable to (BLOCK_T, BLOCK_H, BLOCK_R)
    row_ok,           # (BLOCK_T, BLOCK_H, 1) which rows exist
    rotary_half,      # rotary_dim / 2
    head_dim,         # D
    INTERLEAVED: tl.constexpr,
    COPY_TAIL: tl.constexpr,     # copy features rotary_dim..D (out of place with rotary_dim < D)
    BLOCK_R: tl.constexpr,       # power of two >= rotary_half
    BLOCK_TAIL: tl.constexpr,    # power of two >= D - rotary_dim
):
    r = tl.arange(0, BLOCK_R)[None, None, :]
    mask = row_ok & (r < rotary_half)
    if INTERLEAVED:
        first = 2 * r
        second = 2 * r + 1
    else:
        first = r
        second = r + rotary_half
    x1 = tl.load(SRC + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(SRC + second, mask=mask, other=0.0).to(tl.float32)
    # tl.store casts the float32 results to the destination's dtype.
    tl.store(DST + first, x1 * cos - x2 * sin, mask=mask)
    tl.store(DST + second, x1 * sin + x2 * cos, mask=mask)
    if COPY_TAIL:
        d = 2 * rotary_half + tl.arange(0, BLOCK_TAIL)[None, None, :]
        tail_mask = row_ok & (d < head_dim)
        tl.store(DST + d, tl.load(SRC + d, mask=tail_mask), mask=tail_mask)


@triton.jit
def _rotary_kernel(
    X,                # (B, S, H, D), or (total, H, D) when IS_VARLEN, input rows
    OUT,              # same shape as X, output (may be X itself: in place)
    COS, SIN,         # (seqlen_ro, rotary_half) tables
    CU_SEQLENS,       # (n_seqs + 1,) int32 (read only when IS_VARLEN)
    SEQLEN_OFFSETS,   # (n_seqs,) int offsets (read only when HAS_OFFSET_TENSOR)
    stride_xb, stride_xs, stride_xh,   # x strides of batch (0 when packed), token and head; features contiguous
    stride_ob, stride_os, stride_oh,   # the same for out
    stride_cos, stride_sin,            # table row strides
    seqlen,           # tokens per sequence (batch) or in the pack (packed)
    n_heads,          # H
    head_dim,         # D
    rotary_half,      # rotary_dim / 2
    seqlen_ro,        # rows in the tables
    seqlen_offset,    # offset of every sequence when there is no offset tensor
    n_seqs,           # sequences (packed)
    n_search_steps,   # ceil(log2(n_seqs))
    IS_VARLEN: tl.constexpr,
    HAS_OFFSET_TENSOR: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJUGATE: tl.constexpr,
    COPY_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
):
    pid_b, tok = _batch_and_tokens(seqlen, BLOCK_T)
    tok_ok = tok < seqlen
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = _token_positions(tok, pid_b, CU_SEQLENS, SEQLEN_OFFSETS, seqlen_offset, n_seqs, n_search_steps,
                           IS_VARLEN, HAS_OFFSET_TENSOR)
    cos, sin = _load_cos_sin(COS, SIN, pos, tok_ok, stride_cos, stride_sin, rotary_half, seqlen_ro, CONJUGATE,
                             BLOCK_R)
    tok64 = tok.to(tl.int64)[:, None, None]  # token * stride overflows int32 beyond 2^31 elements
    head = heads[None, :, None]
    src = X + pid_b.to(tl.int64) * stride_xb + tok64 * stride_xs + head * stride_xh
    dst = OUT + pid_b.to(tl.int64) * stride_ob + tok64 * stride_os + head * stride_oh
    row_ok = tok_ok[:, None, None] & (head < n_heads)
    _rotate_rows(src, dst, cos, sin, row_ok, rotary_half, head_dim, INTERLEAVED, COPY_TAIL, BLOCK_R, BLOCK_TAIL)


@triton.jit
def _qkv_rotary_kernel(
    QKV,              # (B, S, Hkv·(g+2), D), or (total, ...) when IS_VARLEN: packed wqkv output (BACKWARD: written)
    Q,                # (B, S, Hkv·g, D) or (total, Hkv·g, D) (written; BACKWARD: read)
    K,                # (..., Hkv, D) (written; BACKWARD: read)
    V,                # (..., Hkv, D) (written; BACKWARD: read)
    COS, SIN,         # (seqlen_ro, rotary_half) tables
    CU_SEQLENS,       # (n_seqs + 1,) int32 (read only when IS_VARLEN)
    SEQLEN_OFFSETS,   # (n_seqs,) int offsets (read only when HAS_OFFSET_TENSOR)
    stride_qkv_b, stride_qkv_s,   # batch (0 when packed) and token strides; heads and features are contiguous
    stride_q_b, stride_q_s,
    stride_k_b, stride_k_s,
    stride_v_b, stride_v_s,
    stride_cos, stride_sin,
    seqlen,           # tokens per sequence (batch) or in the pack (packed)
    n_kv_heads,       # Hkv
    group,            # g = query heads per KV head
    head_dim,         # D
    rotary_half,
    seqlen_ro,
    seqlen_offset,
    n_seqs,
    n_search_steps,
    IS_VARLEN: tl.constexpr,
    HAS_OFFSET_TENSOR: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BACKWARD: tl.constexpr,       # gather q, k, v into the packed layout, rotating by -angle
    COPY_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,        # packed heads per program
    BLOCK_R: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
):
    pid_b, tok = _batch_and_tokens(seqlen, BLOCK_T)
    tok_ok = tok < seqlen
    packed = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)   # head index in the packed layout
    kv = packed // (group + 2)                                     # its KV group
    slot = packed % (group + 2)                                    # 0..g-1 query, g key, g+1 value
    is_q = slot < group
    is_v = slot == group + 1
    pos = _token_positions(tok, pid_b, CU_SEQLENS, SEQLEN_OFFSETS, seqlen_offset, n_seqs, n_search_steps,
                           IS_VARLEN, HAS_OFFSET_TENSOR)
    cos, sin = _load_cos_sin(COS, SIN, pos, tok_ok, stride_cos, stride_sin, rotary_half, seqlen_ro, BACKWARD,
                             BLOCK_R)
    # Value heads pass through unrotated: angle 0.
    cos = tl.where(is_v[None, :, None], 1.0, cos)
    sin = tl.where(is_v[None, :, None], 0.0, sin)

    b64 = pid_b.to(tl.int64)
    tok64 = tok.to(tl.int64)[:, None, None]
    n_q_heads = n_kv_heads * group
    packed_rows = QKV + b64 * stride_qkv_b + tok64 * stride_qkv_s + (packed * head_dim)[None, :, None]
    q_rows = Q + b64 * stride_q_b + tok64 * stride_q_s + ((kv * group + slot) * head_dim)[None, :, None]
    k_rows = K + b64 * stride_k_b + tok64 * stride_k_s + (kv * head_dim)[None, :, None]
    v_rows = V + b64 * stride_v_b + tok64 * stride_v_s + (kv * head_dim)[None, :, None]
    split_rows = tl.where(is_q[None, :, None], q_rows, tl.where(is_v[None, :, None], v_rows, k_rows))
    row_ok = tok_ok[:, None, None] & (packed < n_q_heads + 2 * n_kv_heads)[None, :, None]
    if BACKWARD:
        _rotate_rows(split_rows, packed_rows, cos, sin, row_ok, rotary_half, head_dim, INTERLEAVED, COPY_TAIL,
                     BLOCK_R, BLOCK_TAIL)
    else:
        _rotate_rows(packed_rows, split_rows, cos, sin, row_ok, rotary_half, head_dim, INTERLEAVED, COPY_TAIL,
                     BLOCK_R, BLOCK_TAIL)


def grid(batch: int, seqlen: int, n_heads: int, block_t: int, block_h: int) -> tuple[int, int]:
    """Axis 0: every (sequence, token block) pair (up to 2^31 - 1); axis 1: head blocks (a handful)."""
    return batch * cdiv(seqlen, block_t), cdiv(n_heads, block_h)


def _blocks(n_heads: int, rotary_half: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_R, BLOCK_TAIL): ~2048 feature pairs per program, heads first."""
    block_r = next_power_of_2(rotary_half)
    block_h = min(next_power_of_2(n_heads), max(1, 2048 // block_r))
    block_t = max(1, 2048 // (block_h * block_r))
    block_tail = next_power_of_2(max(1, head_dim - 2 * rotary_half))
    return block_t, block_h, block_r, block_tail


def _position_kwargs(cu_seqlens: torch.Tensor | None, seqlen_offsets: torch.Tensor | None, seqlen_offset: int,
                     batch: int, dummy: torch.Tensor) -> dict:
    """The position arguments both kernels share. A tensor an option does not use is replaced by ``dummy``
    (never read: its constexpr switch is off)."""
    n_seqs = cu_seqlens.numel() - 1 if cu_seqlens is not None else batch
    return dict(
        CU_SEQLENS=cu_seqlens if cu_seqlens is not None else dummy,
        SEQLEN_OFFSETS=seqlen_offsets if seqlen_offsets is not None else dummy,
        seqlen_offset=seqlen_offset, n_seqs=n_seqs,
        n_search_steps=(n_seqs - 1).bit_length() if cu_seqlens is not None else 0,
        IS_VARLEN=cu_seqlens is not None, HAS_OFFSET_TENSOR=seqlen_offsets is not None,
    )


@launches_on_input_device
def rotary_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, *,
                   cu_seqlens: torch.Tensor | None = None, seqlen_offsets: torch.Tensor | None = None,
                   seqlen_offset: int = 0, interleaved: bool = False, conjugate: bool = False) -> None:
    """Rotate x (B, S, H, D), or packed x (total, H, D) with cu_seqlens, into out (same shape; out may be x).

    ``seqlen_offsets`` (n_seqs,) gives each sequence's offset, else ``seqlen_offset`` applies to all.
    x and out need a contiguous last dim; cos/sin (seqlen_ro, rotary_dim / 2) too.
    """
    if cu_seqlens is None:
        batch, seqlen, n_heads, head_dim = x.shape
        x_strides, out_strides = x.stride()[:3], out.stride()[:3]
    else:
        batch, (seqlen, n_heads, head_dim) = 1, x.shape
        x_strides, out_strides = (0, *x.stride()[:2]), (0, *out.stride()[:2])
    if seqlen == 0 or n_heads == 0 or batch == 0:
        return
    rotary_half = cos.shape[1]
    block_t, block_h, block_r, block_tail = _blocks(n_heads, rotary_half, head_dim)
    _rotary_kernel[grid(batch, seqlen, n_heads, block_t, block_h)](
        x, out, cos, sin,
        stride_xb=x_strides[0], stride_xs=x_strides[1], stride_xh=x_strides[2],
        stride_ob=out_strides[0], stride_os=out_strides[1], stride_oh=out_strides[2],
        stride_cos=cos.stride(0), stride_sin=sin.stride(0),
        seqlen=seqlen, n_heads=n_heads, head_dim=head_dim, rotary_half=rotary_half, seqlen_ro=cos.shape[0],
        INTERLEAVED=interleaved, CONJUGATE=conjugate, COPY_TAIL=out is not x and 2 * rotary_half < head_dim,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_TAIL=block_tail, num_warps=4,
        **_position_kwargs(cu_seqlens, seqlen_offsets, seqlen_offset, batch, cos),
    )


@launches_on_input_device
def qkv_rotary(qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, *, backward: bool, cu_seqlens: torch.Tensor | None = None,
               seqlen_offsets: torch.Tensor | None = None, seqlen_offset: int = 0,
               interleaved: bool = False) -> None:
    """Forward: read packed qkv (..., Hkv·(g+2), D), write q (..., Hkv·g, D) and k rotated, v copied.
    Backward: read dq, dk, dv (passed as q, k, v), write d(qkv) rotated back.

    Leading dims are (B, S), or (total,) with cu_seqlens. Heads and features of every tensor are contiguous.
    """
    varlen = cu_seqlens is not None
    n_kv_heads, head_dim = k.shape[-2:]
    group = q.shape[-2] // n_kv_heads
    batch, seqlen = (1, qkv.shape[0]) if varlen else qkv.shape[:2]
    if seqlen == 0 or batch == 0:
        return

    def token_strides(t, name):  # batch (0 when packed) and token strides, as keyword arguments
        return {f"stride_{name}_b": 0 if varlen else t.stride(0), f"stride_{name}_s": t.stride(0 if varlen else 1)}

    rotary_half = cos.shape[1]
    n_packed = n_kv_heads * (group + 2)
    block_t, block_h, block_r, block_tail = _blocks(n_packed, rotary_half, head_dim)
    _qkv_rotary_kernel[grid(batch, seqlen, n_packed, block_t, block_h)](
        qkv, q, k, v, cos, sin,
        **token_strides(qkv, "qkv"), **token_strides(q, "q"), **token_strides(k, "k"), **token_strides(v, "v"),
        stride_cos=cos.stride(0), stride_sin=sin.stride(0),
        seqlen=seqlen, n_kv_heads=n_kv_heads, group=group, head_dim=head_dim, rotary_half=rotary_half,
        seqlen_ro=cos.shape[0],
        INTERLEAVED=interleaved, BACKWARD=backward, COPY_TAIL=2 * rotary_half < head_dim,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_TAIL=block_tail, num_warps=4,
        **_position_kwargs(cu_seqlens, seqlen_offsets, seqlen_offset, batch, cos),
    )
