"""Rotary embedding: drop-in for flash_attn.layers.rotary.apply_rotary_emb, the InternLM2 cos/sin builder, and a
fused rotary over the packed wqkv projection output.

Custom ops (torch.ops.internlm_kernels.*):
  apply_rotary(x, cos, sin, seqlen_offsets?, seqlen_offset, cu_seqlens?, interleaved, conjugate) -> out
      functional; its backward is itself with the conjugate rotation
  apply_rotary_(x, ...) -> ()   the same, written into x (autograd through _RotaryInPlace)
  qkv_rotary(wqkv_out, cos, sin, seqlen_offsets?, seqlen_offset, cu_seqlens?, n_kv_heads, head_dim, interleaved)
      -> (q, k, v); backward qkv_rotary_bwd(dq, dk, dv, ...) -> dwqkv_out
Kernels: internlm_kernels/triton/rotary.py.
"""
from __future__ import annotations

import functools

import torch

from .. import cpu, reference
from .._tensor_cache import PerTensorCache
from ..backend import choose
from ..checks import FLOAT_DTYPES, check_cu_seqlens, check_tensor, reads_values
from ..cpu import rotary as cpu_rotary
from . import _eager as eager

rotary_cos_sin = reference.rotary_cos_sin  # the InternLM2 table builder (theta, linear and dynamic NTK): plain torch


@functools.cache   # an import statement costs ~0.5 µs per call even when the module is loaded
def _kernels():
    # Imported on first use so that the package imports without triton (the reference backend needs none).
    from ..triton import rotary as kernels

    return kernels


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("internlm_kernels::apply_rotary", mutates_args=())
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlen_offsets: torch.Tensor | None,
                 seqlen_offset: int, cu_seqlens: torch.Tensor | None, interleaved: bool,
                 conjugate: bool) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)   # ~1 µs less than torch.empty(x.shape, ...)
    _kernels().rotary_forward(_last_dim_contiguous(x), cos, sin, out, cu_seqlens=cu_seqlens,
                              seqlen_offsets=seqlen_offsets, seqlen_offset=seqlen_offset, interleaved=interleaved,
                              conjugate=conjugate)
    return out


@apply_rotary.register_fake
def _(x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, interleaved, conjugate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_rotary(ctx, inputs, output):
    _x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, interleaved, conjugate = inputs
    ctx.save_for_backward(cos, sin, seqlen_offsets, cu_seqlens)
    ctx.options = (seqlen_offset, interleaved, conjugate)


def _backward_rotary(ctx, dout):
    # The rotation is orthogonal: its gradient is the rotation by the opposite angle.
    cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
    seqlen_offset, interleaved, conjugate = ctx.options
    dx = eager.call(apply_rotary, dout, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens,
                                                 interleaved, not conjugate)
    return dx, None, None, None, None, None, None, None


apply_rotary.register_autograd(_backward_rotary, setup_context=_setup_rotary)


@torch.library.custom_op("internlm_kernels::apply_rotary_", mutates_args=("x",))
def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlen_offsets: torch.Tensor | None,
                  seqlen_offset: int, cu_seqlens: torch.Tensor | None, interleaved: bool, conjugate: bool) -> None:
    _kernels().rotary_forward(x, cos, sin, x, cu_seqlens=cu_seqlens, seqlen_offsets=seqlen_offsets,
                              seqlen_offset=seqlen_offset, interleaved=interleaved, conjugate=conjugate)


@apply_rotary_.register_fake
def _(x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, interleaved, conjugate):
    return None


class _RotaryInPlace(torch.autograd.Function):
    """Autograd for the in-place op (torch.library registers autograd for functional ops only): x is rotated in
    place and marked dirty; the gradient is the conjugate rotation of the output's gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, interleaved):
        torch.ops.internlm_kernels.apply_rotary_(x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens,
                                                 interleaved, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, seqlen_offsets, cu_seqlens)
        ctx.options = (seqlen_offset, interleaved)
        return x

    @staticmethod
    def backward(ctx, dout):
        cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
        seqlen_offset, interleaved = ctx.options
        dx = eager.call(apply_rotary, dout, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens,
                                                     interleaved, True)
        return dx, None, None, None, None, None, None


@torch.library.custom_op("internlm_kernels::qkv_rotary", mutates_args=())
def qkv_rotary_fwd(wqkv_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlen_offsets: torch.Tensor | None,
                   seqlen_offset: int, cu_seqlens: torch.Tensor | None, n_kv_heads: int, head_dim: int,
                   interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _split_like(wqkv_out, n_kv_heads, head_dim)
    packed = _last_dim_contiguous(wqkv_out).view(*wqkv_out.shape[:-1], -1, head_dim)  # (..., Hkv·(g+2), D)
    _kernels().qkv_rotary(packed, q, k, v, cos, sin, backward=False, cu_seqlens=cu_seqlens,
                          seqlen_offsets=seqlen_offsets, seqlen_offset=seqlen_offset, interleaved=interleaved)
    return q, k, v


def _split_like(wqkv_out, n_kv_heads, head_dim):
    """Empty q (..., Hkv·g, D), k and v (..., Hkv, D) for a packed (..., Hkv·(g+2)·D) tensor."""
    lead = wqkv_out.shape[:-1]
    n_q_heads = wqkv_out.shape[-1] // head_dim - 2 * n_kv_heads
    new = lambda heads: torch.empty(*lead, heads, head_dim, dtype=wqkv_out.dtype, device=wqkv_out.device)  # noqa: E731
    return new(n_q_heads), new(n_kv_heads), new(n_kv_heads)


@qkv_rotary_fwd.register_fake
def _(wqkv_out, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, n_kv_heads, head_dim, interleaved):
    return _split_like(wqkv_out, n_kv_heads, head_dim)


@torch.library.custom_op("internlm_kernels::qkv_rotary_bwd", mutates_args=())
def qkv_rotary_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   seqlen_offsets: torch.Tensor | None, seqlen_offset: int, cu_seqlens: torch.Tensor | None,
                   interleaved: bool) -> torch.Tensor:
    dq, dk, dv = (t.contiguous() for t in (dq, dk, dv))  # the kernel indexes heads and features densely
    lead, head_dim = dq.shape[:-2], dq.shape[-1]
    dpacked = torch.empty(*lead, dq.shape[-2] + 2 * dk.shape[-2], head_dim, dtype=dq.dtype, device=dq.device)
    _kernels().qkv_rotary(dpacked, dq, dk, dv, cos, sin, backward=True, cu_seqlens=cu_seqlens,
                          seqlen_offsets=seqlen_offsets, seqlen_offset=seqlen_offset, interleaved=interleaved)
    return dpacked.view(*lead, -1)


@qkv_rotary_bwd.register_fake
def _(dq, dk, dv, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, interleaved):
    return dq.new_empty(*dq.shape[:-2], (dq.shape[-2] + 2 * dk.shape[-2]) * dq.shape[-1])


def _setup_qkv(ctx, inputs, output):
    _w, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, _hkv, _d, interleaved = inputs
    ctx.save_for_backward(cos, sin, seqlen_offsets, cu_seqlens)
    ctx.options = (seqlen_offset, interleaved)


def _backward_qkv(ctx, dq, dk, dv):
    cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
    seqlen_offset, interleaved = ctx.options
    dw = eager.call(qkv_rotary_bwd, dq, dk, dv, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens,
                                                   interleaved)
    return dw, None, None, None, None, None, None, None, None


qkv_rotary_fwd.register_autograd(_backward_qkv, setup_context=_setup_qkv)


# Values read from cu_seqlens / seqlen_offsets: a model passes the same tensors to every layer.
_values_read = PerTensorCache("rotary position check", capturable=False)


def _check_rotary(x: torch.Tensor, cos, sin, head_dim: int, seqlen_offsets, cu_seqlens,
                  max_seqlen) -> tuple[torch.Tensor | None, int]:
    """Checks shared by apply_rotary_emb and qkv_rotary, for x (batch, seqlen, ...) or packed (total, ...) with
    cu_seqlens; returns the offsets as the custom ops take them: (offset tensor or None, int offset)."""
    check_tensor("cos", cos, dtypes=FLOAT_DTYPES, ndim=2, device=x.device)
    check_tensor("sin", sin, dtypes=FLOAT_DTYPES, ndim=2, device=x.device)
    if cos.shape != sin.shape:
        raise ValueError(f"cos shape {tuple(cos.shape)} differs from sin shape {tuple(sin.shape)}")
    if cos.shape[1] == 0 or 2 * cos.shape[1] > head_dim:
        raise ValueError(f"cos/sin must have 1..head_dim/2 columns (rotary_dim / 2); got {cos.shape[1]} "
                         f"for head dim {head_dim}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be a non-negative int or None, got {max_seqlen!r}")
    if cu_seqlens is not None:
        check_cu_seqlens("cu_seqlens", cu_seqlens, x.shape[0], x.device)
        n_seqs = cu_seqlens.numel() - 1
    else:
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only meaningful with cu_seqlens")
        n_seqs = x.shape[0]
    if isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, (int, torch.Tensor)):
        raise ValueError(f"seqlen_offsets must be an int or a tensor of shape (batch,), got {seqlen_offsets!r}")
    if isinstance(seqlen_offsets, torch.Tensor):
        check_tensor("seqlen_offsets", seqlen_offsets, dtypes=(torch.int32, torch.int64), ndim=1, device=x.device)
        if seqlen_offsets.shape[0] != n_seqs:
            raise ValueError(f"seqlen_offsets has {seqlen_offsets.shape[0]} entries for {n_seqs} sequences")
    elif seqlen_offsets < 0:
        raise ValueError(f"seqlen_offsets must be >= 0, got {seqlen_offsets}")
    # Every position must have a table row. Known from shapes and hints on the host, else read from the tensors
    # where checks.reads_values allows it (CPU, or CUDA under the debug switch); the kernels mask positions past
    # the table, so an unchecked one reads zeros, never outside the table.
    if cu_seqlens is None:
        longest = x.shape[1]
    elif max_seqlen is not None:
        longest = max_seqlen
    elif reads_values(cu_seqlens):
        longest = _values_read.get((cu_seqlens,), "longest sequence",
                                   lambda: int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
    else:
        longest = None
    offset = seqlen_offsets
    if isinstance(seqlen_offsets, torch.Tensor):
        offset = None
        if reads_values(seqlen_offsets):
            low, offset = _values_read.get((seqlen_offsets,), "min, max", lambda: torch.stack(
                (seqlen_offsets.min(), seqlen_offsets.max())).tolist()) if n_seqs else (0, 0)
            if low < 0:
                raise ValueError(f"seqlen_offsets must be >= 0, got a minimum of {low}")
    if longest is not None and offset is not None and longest + offset > cos.shape[0]:
        raise ValueError(f"cos/sin have {cos.shape[0]} rows but positions reach {longest + offset - 1} "
                         f"(longest sequence {longest} + seqlen_offsets {offset})")
    if isinstance(seqlen_offsets, torch.Tensor):
        return seqlen_offsets, 0
    return None, seqlen_offsets


def _check_no_table_grad(cos, sin):
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise NotImplementedError("cos/sin require grad: gradients with respect to the rotary tables are not "
                                  "computed by the Triton and cpu kernels; use the reference backend")


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """Rotary embedding of x (B, S, H, D), or packed x (total, H, D) with cu_seqlens (positions restart at 0 in
    each sequence); cos/sin (seqlen_ro, rotary_dim / 2); features past rotary_dim pass through. ``seqlen_offsets``
    (int or (batch,) tensor) shifts each sequence's positions. ``max_seqlen`` is a hint: with cu_seqlens it bounds
    the positions checked against the tables without a device sync. ``inplace`` writes the result into x."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3 if cu_seqlens is not None else 4)
    offsets, offset = _check_rotary(x, cos, sin, x.shape[-1], seqlen_offsets, cu_seqlens, max_seqlen)
    backend = choose("rotary", x.device)
    if backend == "cpu" and cpu.runs_here(
            "rotary", x.dtype in cpu_rotary.DTYPES and not interleaved and cpu.plain(x, cos, sin),
            "interleaved=True" if interleaved else f"dtype {x.dtype} or tensor subclasses"):
        _check_no_table_grad(cos, sin)
        return cpu_rotary.apply_rotary_emb(x, cos, sin, seqlen_offsets, cu_seqlens, inplace)
    if backend != "triton":
        out = reference.apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens)
        if inplace:
            return x.copy_(out)
        return out
    _check_no_table_grad(cos, sin)
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    if inplace:
        if x.stride(-1) != 1:
            raise ValueError("x must have a contiguous last dim for inplace=True")
        return _RotaryInPlace.apply(x, cos, sin, offsets, offset, cu_seqlens, interleaved)
    return eager.call(apply_rotary, x, cos, sin, offsets, offset, cu_seqlens, interleaved, False)


def qkv_rotary(wqkv_out, cos, sin, n_kv_heads, head_dim, cu_seqlens=None, max_seqlen=None, seqlen_offsets=0,
               interleaved=False):
    """Split InternLM2's packed wqkv output and rotate q and k in one pass.

    wqkv_out (B, S, F), or (total, F) with cu_seqlens, F = n_kv_heads·(g + 2)·head_dim viewed as
    (n_kv_heads, g + 2, head_dim): per KV group g query heads, one key head, one value head.
    Returns q (..., n_kv_heads·g, head_dim) and k (..., n_kv_heads, head_dim) rotated as apply_rotary_emb would,
    and v (..., n_kv_heads, head_dim), all contiguous.
    """
    check_tensor("wqkv_out", wqkv_out, dtypes=FLOAT_DTYPES, ndim=2 if cu_seqlens is not None else 3)
    for name, value in (("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    F = wqkv_out.shape[-1]
    if F % (n_kv_heads * head_dim) != 0 or F // (n_kv_heads * head_dim) < 3:
        raise ValueError(f"wqkv_out's last dim {F} is not n_kv_heads ({n_kv_heads}) × (query heads per group + 2) × "
                         f"head_dim ({head_dim}) with at least one query head per group")
    offsets, offset = _check_rotary(wqkv_out, cos, sin, head_dim, seqlen_offsets, cu_seqlens, max_seqlen)
    backend = choose("rotary", wqkv_out.device)
    if backend == "cpu" and cpu.runs_here(
            "rotary", wqkv_out.dtype in cpu_rotary.DTYPES and not interleaved and cpu.plain(wqkv_out, cos, sin),
            "interleaved=True" if interleaved else f"dtype {wqkv_out.dtype} or tensor subclasses"):
        _check_no_table_grad(cos, sin)
        return cpu_rotary.qkv_rotary(wqkv_out, cos, sin, n_kv_heads, head_dim, seqlen_offsets, cu_seqlens)
    if backend != "triton":
        return reference.qkv_rotary(wqkv_out, cos, sin, n_kv_heads, head_dim, interleaved, seqlen_offsets, cu_seqlens)
    _check_no_table_grad(cos, sin)
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    return eager.call(qkv_rotary_fwd, wqkv_out, cos, sin, offsets, offset, cu_seqlens, n_kv_heads,
                                                 head_dim, interleaved)
