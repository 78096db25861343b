"""Attention over a KV cache: drop-in for flash_attn.flash_attn_with_kvcache, and the paged path of
flash_attn_varlen_func(..., block_table=...).

Inference only: these ops have no backward (a decode step never needs one). ``flash_attn_with_kvcache`` on tensors
that require grad with grad mode on raises NotImplementedError; the paged ``flash_attn_varlen_func`` runs (as
flash-attn's does) and raises NotImplementedError, naming block_table, only when a backward reaches it.
A cache too small for the keys asked for raises ``KVCacheOverflowError``: a ValueError naming the argument that is
also a RuntimeError, the type flash-attn's own check raises.

Custom ops (torch.ops.internlm_kernels.*):
  flash_attn_with_kvcache(q, k_cache!, v_cache!, k?, v?, rotary_cos?, rotary_sin?, cache_seqlens, cache_batch_idx?,
                          cache_leftpad?, block_table?, alibi_slopes?, softmax_scale, window_left, window_right,
                          softcap, rotary_interleaved, num_splits) -> (out, lse)      appends k/v into the caches
  flash_attn_varlen_paged(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_table, alibi_slopes?, max_seqlen_q,
                          softmax_scale, window_left, window_right, softcap, num_splits) -> (out, lse)
Kernels: internlm_kernels/triton/flash_decode.py. Backend op name: ``kvcache`` (reference or triton).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._tensor_cache import PerTensorCache
from ..backend import choose, requested
from ..checks import FLOAT_DTYPES, check_cu_seqlens, check_same_dtype, check_tensor, reads_values, records_grad
from .attention import _check_args, _check_hint, _last_dim_contiguous, _uniform_cu_seqlens

INT32 = (torch.int32,)


def _kernels():
    from ..triton import flash_decode, rotary

    return flash_decode, rotary


# --------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("internlm_kernels::flash_attn_with_kvcache", mutates_args=("k_cache", "v_cache"))
def flash_attn_with_kvcache_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None, v: Tensor | None,
                               rotary_cos: Tensor | None, rotary_sin: Tensor | None, cache_seqlens: Tensor,
                               cache_batch_idx: Tensor | None, cache_leftpad: Tensor | None,
                               block_table: Tensor | None, alibi_slopes: Tensor | None, softmax_scale: float,
                               window_left: int, window_right: int, softcap: float, rotary_interleaved: bool,
                               num_splits: int) -> tuple[Tensor, Tensor]:
    """(out (B, Sq, Hq, D), lse (B, Hq, Sq) float32); k/v (if given) are first written into the caches."""
    fd, rot = _kernels()
    B, Sq, Hq, D = q.shape
    n_new = 0
    if k is not None:
        n_new = k.shape[1]
        fd.append_kv(_last_dim_contiguous(k), _last_dim_contiguous(v), k_cache, v_cache, cache_seqlens,
                     cache_batch_idx, block_table, rotary_cos, rotary_sin, rotary_interleaved)
        if rotary_cos is not None:
            # Queries sit at the positions of the new keys (causal / windowed), else all at the first new one.
            q_rot = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
            local = window_left >= 0 or window_right >= 0
            src, dst = (q, q_rot) if local else (q.reshape(B, 1, Sq * Hq, D), q_rot.view(B, 1, Sq * Hq, D))
            rot.rotary_forward(_last_dim_contiguous(src), rotary_cos, rotary_sin, dst, seqlen_offsets=cache_seqlens,
                               interleaved=rotary_interleaved)
            q = q_rot
    seqlens_k = cache_seqlens + n_new if n_new else cache_seqlens
    cu_q = (torch.arange(0, (B + 1) * Sq, Sq, dtype=torch.int32, device=q.device) if torch.compiler.is_compiling()
            else _uniform_cu_seqlens(B, Sq, q.device))
    out, lse = fd.decode_attention(
        _last_dim_contiguous(q.reshape(B * Sq, Hq, D)), k_cache, v_cache, cu_q, seqlens_k, Sq, cache_batch_idx,
        cache_leftpad, block_table, softmax_scale, window_left, window_right, softcap, alibi_slopes, num_splits)
    return out.view(B, Sq, Hq, D), lse.view(Hq, B, Sq).permute(1, 0, 2).contiguous()


@flash_attn_with_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
      alibi_slopes, softmax_scale, window_left, window_right, softcap, rotary_interleaved, num_splits):
    B, Sq, Hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, Sq), dtype=torch.float32)


@torch.library.custom_op("internlm_kernels::flash_attn_varlen_paged", mutates_args=())
def flash_attn_varlen_paged_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor,
                               cu_seqlens_k: Tensor, block_table: Tensor, alibi_slopes: Tensor | None,
                               max_seqlen_q: int, softmax_scale: float, window_left: int, window_right: int,
                               softcap: float, num_splits: int) -> tuple[Tensor, Tensor]:
    """(out (total_q, Hq, D), lse (Hq, total_q) float32) of varlen queries over a paged cache."""
    fd, _ = _kernels()
    seqlens_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    return fd.decode_attention(_last_dim_contiguous(q), k_cache, v_cache, cu_seqlens_q, seqlens_k, max_seqlen_q,
                               None, None, block_table, softmax_scale, window_left, window_right, softcap,
                               alibi_slopes, num_splits)


@flash_attn_varlen_paged_op.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_table, alibi_slopes, max_seqlen_q, softmax_scale,
      window_left, window_right, softcap, num_splits):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
class KVCacheOverflowError(ValueError, RuntimeError):
    """cache_seqlens / cu_seqlens_k ask for more positions than the cache (its block_table's pages) holds, or the
    block_table points outside the page pool: a ValueError naming the argument (our convention) and a RuntimeError
    (flash-attn raises one from its TORCH_CHECK), so code written for either catches it."""


class _PagedNoBackward(torch.autograd.Function):
    """Runs ``compute`` (the paged forward) without a graph and gives its (out, lse) a backward that raises: flash-attn
    runs a paged forward on tensors that require grad, so ours refuses only once a backward actually reaches it."""

    @staticmethod
    def forward(ctx, compute, *inputs):
        return compute()

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("flash_attn_varlen_func with block_table (a paged KV cache) has no backward: the "
                                  "paged path is inference only; run the unpaged call to train through attention")


def _refuse_grad(*tensors) -> None:
    if records_grad(*tensors):
        raise NotImplementedError("attention over a KV cache (block_table / flash_attn_with_kvcache) is inference "
                                  "only and has no backward; call it under torch.no_grad() or inference_mode()")


# The value checks read tensors on the host: CPU tensors always, CUDA ones only under the debug switch
# (checks.reads_values), so a decode step never waits for the GPU. A block table reused across steps is checked once.
_values_read = PerTensorCache("kvcache value check", capturable=False)


def _check_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    check_tensor("k_cache", k_cache, ndim=4, device=q.device)
    check_tensor("v_cache", v_cache, ndim=4, device=q.device)
    check_same_dtype("k_cache", k_cache, "q", q)
    check_same_dtype("v_cache", v_cache, "q", q)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last dim (they are written in place)")


def _check_block_table(block_table, batch: int, device) -> None:
    check_tensor("block_table", block_table, dtypes=INT32, ndim=2, device=device)
    if block_table.shape[0] != batch or block_table.shape[1] == 0:
        raise ValueError(f"block_table must be (batch={batch}, pages per sequence >= 1), got "
                         f"{tuple(block_table.shape)}")


def _check_pages(block_table: Tensor, lengths: Tensor, page_size: int, n_pages: int) -> Tensor:
    """(B,) bool: sequence b's used block-table entries are not all valid page indices."""
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page_size < lengths[:, None]
    return (used & ((block_table < 0) | (block_table >= n_pages))).any(dim=1)


def _check_seqlen_tensor(name: str, t, batch: int, device) -> None:
    check_tensor(name, t, dtypes=INT32, ndim=1, device=device)
    if t.shape[0] != batch:
        raise ValueError(f"{name} must have one entry per sequence ({batch}), got shape {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q over a KV cache, with flash_attn.flash_attn_with_kvcache's signature and semantics.

    q (B, Sq, Hq, D). Contiguous cache: k_cache/v_cache (B_cache, S_cache, Hkv, D), sequence b in row
    cache_batch_idx[b] (default b). Paged cache (``block_table`` (B, pages) int32): (num_pages, page_size, Hkv, D),
    position p of sequence b in page block_table[b, p // page_size], row p % page_size; pages may be in any order.
    ``cache_seqlens`` (int or (B,) int32): keys already cached (None: the cache is full). New ``k``/``v``
    (B, Snew, Hkv, D) are written **in place** at positions cache_seqlens[b] .. + Snew - 1, rotated by
    ``rotary_cos``/``rotary_sin`` (seqlen_ro >= cache capacity, rotary_dim / 2) when given — q is then rotated too:
    at positions cache_seqlens[b] + i when causal or windowed, else all at cache_seqlens[b]. Queries attend to cache
    positions [cache_leftpad[b], cache_seqlens[b] + Snew), query i at key position i + L_b - Sq (causal aligns
    bottom-right); window_size, softcap and alibi_slopes ((Hq,) or (B, Hq) float32) as flash_attn_varlen_func.
    ``num_splits``: key slices per sequence (0 = chosen from the shapes; > 1 runs the split-KV kernel and its
    reduction). Returns out (B, Sq, Hq, D), and (out, softmax_lse (B, Hq, Sq) float32) with return_softmax_lse.

    Inference only (no backward). Bad block tables, cache_seqlens beyond the cache and dtype mismatches raise
    ValueError naming the argument; the value checks read the tensors once per version (not while compiling or
    capturing a CUDA graph).
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4)
    _check_cache(q, k_cache, v_cache)
    B, Sq, Hq, D = q.shape
    paged = block_table is not None
    if paged:
        _check_block_table(block_table, B, q.device)
        if cache_batch_idx is not None:
            raise NotImplementedError("cache_batch_idx with a paged cache (block_table): index block_table's rows "
                                      "instead")
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append) or both be None")
    n_new = 0
    if k is not None:
        check_tensor("k", k, ndim=4, device=q.device)
        check_tensor("v", v, ndim=4, device=q.device)
        check_same_dtype("k", k, "q", q)
        check_same_dtype("v", v, "q", q)
        want = (B, k.shape[1], k_cache.shape[2], D)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k and v must be (batch, new tokens, kv heads, head dim) = {want}, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        n_new = k.shape[1]
    scale, left, right = _check_args(q, k_cache, v_cache, 0.0, softmax_scale, window_size, softcap, alibi_slopes,
                                     False, B)
    if causal:
        right = 0
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is needed to append k and v (None means the cache is full)")
        cache_seqlens = capacity
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
        if cache_seqlens > capacity - n_new:
            raise KVCacheOverflowError(f"cache_seqlens={cache_seqlens} plus {n_new} new tokens exceeds the cache's "
                                       f"{capacity} positions{_pages_note(paged)}")
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    _check_seqlen_tensor("cache_seqlens", cache_seqlens, B, q.device)
    if cache_batch_idx is not None:
        _check_seqlen_tensor("cache_batch_idx", cache_batch_idx, B, q.device)
    if cache_leftpad is not None:
        _check_seqlen_tensor("cache_leftpad", cache_leftpad, B, q.device)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin rotate the appended k and q: they need k and v")
        check_tensor("rotary_cos", rotary_cos, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=2, device=q.device)
        check_tensor("rotary_sin", rotary_sin, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=2, device=q.device)
        if rotary_cos.shape != rotary_sin.shape or not 0 < 2 * rotary_cos.shape[1] <= D:
            raise ValueError(f"rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2) with rotary_dim <= "
                             f"head dim {D}, got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        if rotary_cos.shape[0] < capacity:
            raise ValueError(f"rotary_cos has {rotary_cos.shape[0]} positions but the cache holds {capacity}")
        if rotary_cos.stride(-1) != 1 or rotary_sin.stride(-1) != 1:
            rotary_cos, rotary_sin = rotary_cos.contiguous(), rotary_sin.contiguous()
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    for name, flag in (("causal", causal), ("rotary_interleaved", rotary_interleaved),
                       ("return_softmax_lse", return_softmax_lse)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    _refuse_grad(q, k_cache, v_cache, k, v)
    if reads_values(cache_seqlens):
        _check_kvcache_values(k_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, n_new, capacity)

    backend = choose("kvcache", q.device)
    if backend == "cpu":
        lacking = ("return_softmax_lse" if return_softmax_lse else "softcap" if softcap > 0
                   else "alibi_slopes" if alibi_slopes is not None else None)
        if lacking is None:
            return _sdpa_over_cache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                    cache_batch_idx, cache_leftpad, block_table, scale, left, right,
                                    rotary_interleaved)
        if requested("kvcache") != "auto":
            raise NotImplementedError(f"the cpu kvcache backend (torch SDPA over the gathered cache) does not support "
                                      f"{lacking}; use the reference or triton backend")
        backend = "reference"
    if backend == "reference":
        out, lse = reference.flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            block_table, scale, causal, (left, right), softcap, rotary_interleaved, alibi_slopes)
    else:
        out, lse = torch.ops.internlm_kernels.flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            block_table, alibi_slopes, scale, left, right, float(softcap), rotary_interleaved, num_splits)
    return (out, lse) if return_softmax_lse else out


def _sdpa_over_cache(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                     block_table, scale: float, left: int, right: int, interleaved: bool) -> Tensor:
    """The cpu backend: the append as one indexed write, then torch SDPA (ATen's fused CPU kernel) over every
    sequence's cache gathered to its full capacity, with a mask of the visible keys. Same semantics as the
    reference, without its per-sequence loop."""
    B, Sq, Hq, D = q.shape
    lengths = cache_seqlens.long()
    rows = torch.arange(B, device=q.device) if cache_batch_idx is None else cache_batch_idx.long()
    page_size = k_cache.shape[1]
    if k is not None:
        positions = lengths[:, None] + torch.arange(k.shape[1], device=q.device)           # (B, Snew)
        if cos is not None:
            k = reference.apply_rotary_emb(k, cos, sin, interleaved, seqlen_offsets=lengths)
            if left >= 0 or right >= 0:
                q = reference.apply_rotary_emb(q, cos, sin, interleaved, seqlen_offsets=lengths)
            else:
                q = reference.apply_rotary_emb(q.reshape(B, 1, Sq * Hq, D), cos, sin, interleaved,
                                               seqlen_offsets=lengths).reshape(B, Sq, Hq, D)
        if block_table is not None:
            where = (block_table.long().gather(1, positions // page_size), positions % page_size)
        else:
            where = (rows[:, None].expand_as(positions), positions)
        k_cache[where] = k
        v_cache[where] = v
        lengths = lengths + k.shape[1]
    if block_table is not None:
        pages = block_table.long().clamp(0, k_cache.shape[0] - 1)                             # unused entries
        keys = k_cache[pages].flatten(1, 2)                                                    # (B, capacity, ...)
        values = v_cache[pages].flatten(1, 2)
    else:
        keys, values = k_cache[rows], v_cache[rows]
    j = torch.arange(keys.shape[1], device=q.device)
    pos = torch.arange(Sq, device=q.device)[None, :, None] + (lengths[:, None, None] - Sq)      # (B, Sq, 1)
    visible = j < lengths[:, None, None]
    if cache_leftpad is not None:
        visible = visible & (j >= cache_leftpad.long()[:, None, None])
    if right >= 0:
        visible = visible & (j <= pos + right)
    if left >= 0:
        visible = visible & (j >= pos - left)
    seen = visible.any(dim=-1, keepdim=True)                                                   # (B, Sq, 1)
    # A row that sees no key gets out 0 (flash-attn); SDPA would give NaN, so it attends to everything and is zeroed.
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=(visible | ~seen)[:, None],
        scale=scale, enable_gqa=Hq != k_cache.shape[2]).transpose(1, 2)                       # (B, Sq, Hq, D)
    return out * seen[..., None].to(out.dtype)


def _check_kvcache_values(k_cache, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, n_new: int,
                          capacity: int) -> None:
    optional = (cache_batch_idx, cache_leftpad, block_table)
    key = ("kvcache", n_new, capacity, tuple(k_cache.shape), tuple(t is not None for t in optional))

    def check():
        lengths = cache_seqlens + n_new
        flags = [(cache_seqlens < 0).any(), (lengths > capacity).any()]
        if cache_batch_idx is not None:
            flags.append(((cache_batch_idx < 0) | (cache_batch_idx >= k_cache.shape[0])).any())
        if cache_leftpad is not None:
            flags.append(((cache_leftpad < 0) | (cache_leftpad > cache_seqlens)).any())
        if block_table is not None:
            flags.append(_check_pages(block_table, lengths, k_cache.shape[1], k_cache.shape[0]).any())
        bad = torch.stack(flags).tolist()  # one device sync for all checks
        if bad[0]:
            raise ValueError("cache_seqlens must be >= 0")
        if bad[1]:
            raise KVCacheOverflowError(f"cache_seqlens plus {n_new} new tokens exceeds the cache's {capacity} "
                                       f"positions{_pages_note(block_table is not None)}")
        names = [n for n, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad),
                                ("block_table", block_table)) if t is not None]
        for name, flag in zip(names, bad[2:]):
            if flag:
                raise (KVCacheOverflowError if name == "block_table" else ValueError)({
                    "cache_batch_idx": f"cache_batch_idx must lie in [0, {k_cache.shape[0]})",
                    "cache_leftpad": "cache_leftpad must lie in [0, cache_seqlens]",
                    "block_table": f"block_table holds a page index outside [0, {k_cache.shape[0]}) among the pages "
                                   "the sequences use",
                }[name])

    _values_read.get((cache_seqlens, *(t for t in optional if t is not None)), key, check)


def flash_attn_varlen_paged(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table,
                            softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs):
    """The ``block_table`` path of ``flash_attn_varlen_func`` (flash-attn >= 2.5): keys/values of sequence b are the
    first cu_seqlens_k[b+1] - cu_seqlens_k[b] positions of its pages in the paged caches k_cache/v_cache
    (num_pages, page_size, Hkv, D). Inference only. Returns out, or (out, lse (Hq, total_q), None)."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    _check_cache(q, k_cache, v_cache)
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    batch = cu_seqlens_q.numel() - 1
    check_tensor("cu_seqlens_k", cu_seqlens_k, dtypes=INT32, ndim=1, device=q.device)
    if cu_seqlens_k.numel() != batch + 1:
        raise ValueError(f"cu_seqlens_k ({cu_seqlens_k.numel()} entries) and cu_seqlens_q ({batch + 1} entries) "
                         "must describe the same number of sequences")
    _check_block_table(block_table, batch, q.device)
    hint = _check_hint("max_seqlen_q", max_seqlen_q)
    scale, left, right = _check_args(q, k_cache, v_cache, 0.0, softmax_scale, window_size, softcap, alibi_slopes,
                                     False, batch)
    if causal:
        right = 0
    capacity = block_table.shape[1] * k_cache.shape[1]
    if reads_values(cu_seqlens_k):
        def check():
            lengths = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
            longest_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()
            bad = torch.stack([(cu_seqlens_k[0] != 0), (lengths < 0).any(), (lengths > capacity).any(),
                               _check_pages(block_table, lengths, k_cache.shape[1], k_cache.shape[0]).any(),
                               longest_q > (hint if hint is not None else q.shape[0])]).tolist()
            if bad[0] or bad[1]:
                raise ValueError("cu_seqlens_k must start at 0 and be non-decreasing")
            if bad[2]:
                raise KVCacheOverflowError(f"cu_seqlens_k gives a sequence more keys than its block_table's "
                                           f"{capacity} positions")
            if bad[3]:
                raise KVCacheOverflowError(f"block_table holds a page index outside [0, {k_cache.shape[0]}) among "
                                           "the pages the sequences use")
            if bad[4]:
                raise ValueError(f"max_seqlen_q={hint} is shorter than the longest query sequence (with a block_table "
                                 "it sizes the launch, as in flash-attn)")

        _values_read.get((cu_seqlens_k, block_table, cu_seqlens_q), ("paged varlen", capacity, hint), check)
    backend = choose("kvcache", q.device)
    if backend == "cpu":
        if requested("kvcache") != "auto":
            raise NotImplementedError("the cpu kvcache backend covers flash_attn_with_kvcache, not the paged varlen "
                                      "path; use the reference or triton backend")
        backend = "reference"

    def compute():
        if backend == "reference":
            return reference.flash_attn_varlen_paged(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_table,
                                                    scale, False, (left, right), softcap, alibi_slopes)
        return torch.ops.internlm_kernels.flash_attn_varlen_paged(
            q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_table, alibi_slopes,
            hint if hint is not None else q.shape[0], scale, left, right, float(softcap), 0)

    out, lse = _PagedNoBackward.apply(compute, q, k_cache, v_cache) if records_grad(q, k_cache, v_cache) else compute()
    return (out, lse, None) if return_attn_probs else out


def _pages_note(paged: bool) -> str:
    return " (its block_table's pages)" if paged else ""
