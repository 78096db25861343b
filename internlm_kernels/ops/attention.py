"""Variable-length flash attention: drop-in for flash_attn.flash_attn_varlen_func / flash_attn_func.

Custom ops (torch.ops.internlm_kernels.*):
  flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, window_right, softcap,
                        alibi_slopes?, dropout_p, seed?) -> (out, lse)
  flash_attn_varlen_bwd(dout, q, k, v, out, lse, dlse?, cu_seqlens_q, cu_seqlens_k, ...same...) -> (dq, dk, dv)
  flash_attn_dropout_mask(seed, n_heads, total_q, width, dropout_p) -> (n_heads, total_q, width) keep pattern
The forward op carries registered autograd that calls the backward op; gradients reach q, k, v (and flow back
through lse too). Kernels: internlm_kernels/triton/flash_attn*.py. The cpu backend: ops/attention_cpu.py.
"""
from __future__ import annotations

import functools
import math
import operator

import torch

from .. import reference
from ..backend import choose, requested
from ..checks import FLOAT_DTYPES, check_cu_seqlens, check_same_dtype, check_tensor
from . import _eager as eager
from . import attention_cpu

# The Triton kernels hold (rows, head dim) tiles in registers; beyond 256 they would not fit.
MAX_TRITON_HEAD_DIM = 256


@functools.cache   # an import statement costs ~0.5 µs per call even when the module is loaded
def _kernels():
    # Imported on first use so that the package imports without triton (the reference backend needs none).
    from ..triton import flash_attn_bwd, flash_attn_fwd

    return flash_attn_fwd, flash_attn_bwd


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any token/head strides (e.g. q, k, v sliced from one packed qkv tensor) but step through
    # the head dim with stride 1.
    return t if t.stride()[-1] == 1 else t.contiguous()   # .stride()[-1]: half the host cost of .stride(-1)


@torch.library.custom_op("internlm_kernels::flash_attn_varlen_fwd", mutates_args=())
def flash_attn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, softmax_scale: float, window_left: int, window_right: int,
                          softcap: float, alibi_slopes: torch.Tensor | None, dropout_p: float,
                          seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    fwd, _ = _kernels()
    return fwd.flash_attn_fwd(_last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v),
                              cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, window_right, softcap,
                              alibi_slopes, dropout_p, seed)


@flash_attn_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, window_right, softcap, alibi_slopes,
      dropout_p, seed):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("internlm_kernels::flash_attn_varlen_bwd", mutates_args=())
def flash_attn_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, dlse: torch.Tensor | None, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, softmax_scale: float, window_left: int, window_right: int,
                          softcap: float, alibi_slopes: torch.Tensor | None, dropout_p: float,
                          seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, bwd = _kernels()
    return bwd.flash_attn_bwd(
        _last_dim_contiguous(dout), _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v),
        out, lse, dlse.contiguous() if dlse is not None else None, cu_seqlens_q, cu_seqlens_k, softmax_scale,
        window_left, window_right, softcap, alibi_slopes, dropout_p, seed)


@flash_attn_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, window_right, softcap,
      alibi_slopes, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, window_right, softcap, alibi, dropout_p, seed = \
        inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi, seed)
    ctx.params = (softmax_scale, window_left, window_right, softcap)
    ctx.dropout_p = dropout_p
    # A caller that uses only out (the usual case) leaves lse's gradient None instead of a tensor of zeros to read.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi, seed = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = eager.call(flash_attn_varlen_bwd,
        dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, *ctx.params, alibi, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


flash_attn_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("internlm_kernels::flash_attn_dropout_mask", mutates_args=())
def flash_attn_dropout_mask(seed: torch.Tensor, n_heads: int, total_q: int, width: int,
                            dropout_p: float) -> torch.Tensor:
    fwd, _ = _kernels()
    return fwd.dropout_mask(seed, n_heads, total_q, width, dropout_p)


@flash_attn_dropout_mask.register_fake
def _(seed, n_heads, total_q, width, dropout_p):
    return seed.new_empty((n_heads, total_q, width), dtype=torch.bool)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
def _check_hint(name: str, value) -> int | None:
    """A max_seqlen hint: an int >= 0, or a one-element integer tensor (transformers passes those), which is not
    read (that would sync with the device); None then."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            raise ValueError(f"{name} must be an int >= 0 or a one-element integer tensor, got {value!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _window_pair(window_size) -> tuple[int, int]:
    """window_size as flash-attn takes it: any pair of integers >= -1 (a tuple or list of ints, NumPy ints or 0-d
    integer tensors, or a 2-element integer tensor), as two Python ints. Tensor entries are read on the host once."""
    if type(window_size) is tuple and len(window_size) == 2:   # the usual (int, int): no conversions needed
        left, right = window_size
        if type(left) is int and type(right) is int and left >= -1 and right >= -1:
            return window_size
    if isinstance(window_size, torch.Tensor) and window_size.dim() == 1 and not window_size.is_floating_point():
        window_size = window_size.tolist()
    try:
        pair = tuple(operator.index(w) for w in window_size if not isinstance(w, bool))
    except TypeError:
        pair = ()
    if len(pair) != 2 or len(window_size) != 2 or min(pair) < -1:
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {window_size!r}")
    return pair


def _check_qkv(q, k, v, ndim: int) -> None:
    """q, k, v are tensors of ``ndim`` dims, of one floating dtype, on one device.

    The usual call passes: one conjunction of the conditions (~1 µs less than the per-argument checks, which build
    error messages' arguments and compare devices one by one) decides that; only when it fails do the
    per-argument checks run, to raise the error that names the argument."""
    if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor):
        dtype, device = q.dtype, q.device
        if q.dim() == ndim and k.dim() == ndim and v.dim() == ndim and dtype in FLOAT_DTYPES and k.dtype == dtype \
                and v.dtype == dtype and k.device == device and v.device == device:
            return
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=ndim)
    device = q.device
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=ndim, device=device)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=ndim, device=device)
    check_same_dtype("k", k, "q", q)
    check_same_dtype("v", v, "q", q)


def _check_args(q, k, v, dropout_p, softmax_scale, window_size, softcap, alibi_slopes, deterministic,
                n_seqs: int) -> tuple[float, int, int]:
    """Checks shared by both entry points after ``_check_qkv``; returns (softmax_scale, window_left, window_right
    before causal)."""
    q_shape, k_shape = q.shape, k.shape   # every .shape builds a new torch.Size: read each once
    if k_shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k_shape)} and {tuple(v.shape)}")
    head_dim, n_heads, n_kv_heads = q_shape[-1], q_shape[-2], k_shape[-2]
    if head_dim != k_shape[-1]:
        raise ValueError(f"q head dim {head_dim} differs from k head dim {k_shape[-1]}")
    if head_dim == 0 or n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise ValueError(f"number of query heads ({n_heads}) must be a positive multiple of key/value heads "
                         f"({n_kv_heads}), with a head dim > 0")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    if not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    window_size = _window_pair(window_size)
    if not isinstance(softcap, (int, float)) or not softcap >= 0.0 or not math.isfinite(softcap):
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), ndim=(1, 2),
                     device=q.device)
        if alibi_slopes.shape not in ((n_heads,), (n_seqs, n_heads)):
            raise ValueError(f"alibi_slopes must have shape ({n_heads},) or ({n_seqs}, {n_heads}), "
                             f"got {tuple(alibi_slopes.shape)}")
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {deterministic!r}")
    return float(softmax_scale), int(window_size[0]), int(window_size[1])


def _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, dropout_p, softmax_scale, causal, window_left,
               window_right, softcap, alibi_slopes, return_attn_probs):
    """Dispatch to the chosen backend once the arguments are known to be valid."""
    if causal:
        window_right = 0
    backend = choose("attention", q.device)
    if backend == "cpu":
        lacking = attention_cpu.unsupported(dropout_p, window_left, window_right, softcap, alibi_slopes,
                                            return_attn_probs)
        if lacking is None:
            causal = window_right == 0
            if torch.compiler.is_compiling():    # one opaque op: the value-dependent choices below run inside it
                return attention_cpu.attention_traced(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                                                      requested("attention") != "auto")
            if not (causal and attention_cpu.rows_without_keys(cu_seqlens_q, cu_seqlens_k)):
                return attention_cpu.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
            lacking = attention_cpu.NO_KEY
        if requested("attention") != "auto":
            raise attention_cpu.unsupported_error(lacking)
        backend = "reference"  # auto: the reference covers every argument
    keep = None
    if dropout_p > 0.0 and (return_attn_probs or backend == "reference"):
        # The dropout pattern is (Hq, total_q, width): as wide as the hint, and at least the longest key sequence
        # when the reference draws it (reading that length syncs with the device; only this path needs it).
        lens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        longest = int(lens.max()) if lens.numel() else 0
        width = longest if max_seqlen_k is None else max_seqlen_k
    if backend == "reference":
        if dropout_p > 0.0:
            keep = torch.rand(q.shape[1], q.shape[0], max(width, longest), device=q.device) >= dropout_p
        out, lse = reference.flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, False,
                                               (window_left, window_right), softcap, alibi_slopes, dropout_p, keep)
        keep = keep[..., :width] if keep is not None else None
    else:
        if q.shape[-1] > MAX_TRITON_HEAD_DIM:
            raise NotImplementedError(f"head dim {q.shape[-1]} > {MAX_TRITON_HEAD_DIM} is not supported by the "
                                      "triton backend (the reference backend takes any head dim)")
        seed = None
        if dropout_p > 0.0:
            # Drawn from torch's generator, so torch.manual_seed makes dropout reproducible.
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
        out, lse = eager.call(flash_attn_varlen_fwd,
            q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, window_right, float(softcap),
            alibi_slopes, float(dropout_p), seed)
        if return_attn_probs and seed is not None:
            keep = eager.call(flash_attn_dropout_mask, seed, q.shape[1], q.shape[0], width,
                                                                      float(dropout_p))
    if return_attn_probs:
        return out, lse, keep
    return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Attention over packed sequences, with flash_attn.flash_attn_varlen_func's signature and semantics.

    q (total_q, Hq, D), k/v (total_k, Hkv, D) with Hq % Hkv == 0 (GQA/MQA read K/V head h // (Hq / Hkv));
    sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v
    (int32, non-decreasing, from 0). ``causal`` aligns queries to the bottom-right of the keys; ``window_size``
    (left, right) limits the keys each query sees (-1 = unbounded); ``softcap`` > 0 applies softcap·tanh(s/softcap);
    ``alibi_slopes`` (Hq,) or (batch, Hq) float32 subtracts slope·|i + Lk - Lq - j|; ``dropout_p`` drops attention
    weights (Philox, seeded from torch's generator). Returns out (total_q, Hq, D), or with ``return_attn_probs``
    (out, lse (Hq, total_q) float32, keep) where keep is the dropout pattern (Hq, total_q, max_seqlen_k) bool
    (True = kept; key columns are per sequence) when dropout_p > 0, else None. A query that sees no key gets
    out 0 and lse +inf. Gradients flow to q, k, v and through lse.

    ``max_seqlen_q``/``max_seqlen_k`` (ints or one-element tensors) are hints: the work list is built from
    cu_seqlens on the device, so any value is correct (max_seqlen_k sizes only the returned dropout pattern). ``deterministic`` is accepted for
    compatibility: the backward never uses atomics, so gradients are bitwise repeatable either way.

    ``block_table`` (batch, pages) int32 (flash-attn >= 2.5): k and v are paged caches (num_pages, page_size, Hkv, D)
    and sequence b's keys are the first cu_seqlens_k[b+1] - cu_seqlens_k[b] positions of its pages (inference only,
    no dropout; max_seqlen_q must bound the query lengths); see ops/kvcache.py.
    """
    if block_table is not None:
        from .kvcache import flash_attn_varlen_paged

        if dropout_p != 0.0:
            raise NotImplementedError("dropout_p > 0 with block_table (the paged path is inference only)")
        return flash_attn_varlen_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table, softmax_scale,
                                       causal, window_size, softcap, alibi_slopes, return_attn_probs)
    _check_qkv(q, k, v, 3)
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    if cu_seqlens_k is not cu_seqlens_q or k.shape[0] != q.shape[0]:   # self-attention: one tensor, checked once
        check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q ({cu_seqlens_q.numel()} entries) and cu_seqlens_k "
                         f"({cu_seqlens_k.numel()} entries) must describe the same number of sequences")
    _check_hint("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_hint("max_seqlen_k", max_seqlen_k)
    scale, left, right = _check_args(q, k, v, dropout_p, softmax_scale, window_size, softcap, alibi_slopes,
                                     deterministic, cu_seqlens_q.numel() - 1)
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, dropout_p, scale, bool(causal), left, right,
                      softcap, alibi_slopes, return_attn_probs)


@functools.lru_cache(maxsize=16)
def _shared_uniform_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    # A normal tensor even when first asked for under inference_mode: it is later saved for a backward.
    with torch.inference_mode(False):
        return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def _uniform_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of ``batch`` sequences of ``seqlen`` rows: one tensor per shape, so the kernels' schedule cache
    hits on every layer of a model; made anew while tracing or capturing a CUDA graph (a tensor made in a capture
    belongs to the graph's memory pool)."""
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
    return _shared_uniform_cu_seqlens(batch, seqlen, device)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """(B, S, H, D) attention, as flash_attn.flash_attn_func: every batch row is one sequence (Sq queries, Sk keys);
    runs the varlen kernel. With ``return_attn_probs`` the lse is (B, Hq, Sq) and the dropout pattern
    (B, Hq, Sq, Sk)."""
    _check_qkv(q, k, v, 4)
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    if k.shape[0] != B:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {B}")
    scale, left, right = _check_args(q, k, v, dropout_p, softmax_scale, window_size, softcap, alibi_slopes,
                                     deterministic, B)
    cu_q, cu_k = _uniform_cu_seqlens(B, Sq, q.device), _uniform_cu_seqlens(B, Sk, q.device)
    res = _attention(q.reshape(B * Sq, Hq, D), k.reshape(B * Sk, *k.shape[2:]), v.reshape(B * Sk, *v.shape[2:]),
                     cu_q, cu_k, Sk, dropout_p, scale, bool(causal), left, right, softcap, alibi_slopes,
                     return_attn_probs)
    if return_attn_probs:
        out, lse, keep = res
        if keep is not None:
            keep = keep.reshape(Hq, B, Sq, Sk).transpose(0, 1)
        return out.reshape(B, Sq, Hq, D), lse.reshape(Hq, B, Sq).transpose(0, 1), keep
    return res.reshape(B, Sq, Hq, D)
