"""Rotary embedding (rotate-half layout) and the fused wqkv split + rotary on CPU: autograd Functions whose
forward and backward write each output once.

With c = cos[pos], s = sin[pos] gathered once per call and x1, x2 the two halves of the rotary features:
    out1 = x1·c - x2·s,  out2 = x2·c + x1·s     (4 ATen ops writing into the output's halves; no cat, no stack)
the backward is the same rotation with -s, written straight into the gradient of the packed wqkv output (the
reference's graph slices, cats and zero-fills per head group). Features past rotary_dim pass through.

qkv_rotary rotates through the extension's one-pass loop (``_C.rotary_heads_cpu``, csrc/cpu/rotary.cpp) when it is
built: as ATen ops each output half is a separate call whose innermost loop is half a head (16 floats at head_dim
32), and the 8 calls of a forward plus 8 of a backward cost ~3.7 ms per layer at 2048 tokens × 6 rotated heads under
ATEN_CPU_CAPABILITY=avx2, one thread (thread CPU time), several times the bytes they move. Same products and sums
in the same order (no FMA contraction), so both paths round alike; traced by torch.compile, ATen ops.
Interleaved (GPT-J) rotation is not covered: ``auto`` runs the reference for it. float32 tensors (``DTYPES``).
"""
from __future__ import annotations

import torch

from .. import _ext
from . import extension_runs

DTYPES = (torch.float32,)


def positions(x_shape, device, seqlen_offsets, cu_seqlens) -> torch.Tensor:
    """Rotary position of every token: (B, S) for (B, S, ...) input, (total,) for packed input with cu_seqlens
    (restarting at 0 in each sequence); plus seqlen_offsets (int, or one per sequence)."""
    if cu_seqlens is None:
        B, S = x_shape[:2]
        pos = torch.arange(S, device=device).expand(B, S)
        if isinstance(seqlen_offsets, torch.Tensor):
            return pos + seqlen_offsets.to(device)[:, None]
        return pos + seqlen_offsets
    starts = cu_seqlens[:-1].long()
    lens = cu_seqlens[1:].long() - starts
    total = x_shape[0]
    offset = starts if not isinstance(seqlen_offsets, torch.Tensor) else starts - seqlen_offsets.long()
    pos = torch.arange(total, device=device) - torch.repeat_interleave(offset, lens, output_size=total)
    return pos + seqlen_offsets if not isinstance(seqlen_offsets, torch.Tensor) else pos


def tables(cos, sin, pos, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos[pos], sin[pos] as (..., 1, rotary_dim / 2) in ``dtype``, broadcasting over heads."""
    return cos.to(dtype)[pos].unsqueeze(-2), sin.to(dtype)[pos].unsqueeze(-2)


def rotate_into(out: torch.Tensor, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> None:
    """out = rotation of x by (c, s); out must not overlap x. c, s broadcast against x[..., :rotary_dim / 2]."""
    half = c.shape[-1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    o1, o2 = out[..., :half], out[..., half:2 * half]
    if torch.compiler.is_compiling():
        # Dynamo refuses out= into a strided view; traced, the same math is functional and Inductor fuses it.
        o1.copy_(x1 * c - x2 * s)
        o2.copy_(x2 * c + x1 * s)
    else:
        torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1.0)
        torch.mul(x2, c, out=o2).addcmul_(x1, s)
    if 2 * half < x.shape[-1]:
        out[..., 2 * half:].copy_(x[..., 2 * half:])


def _heads(t: torch.Tensor) -> tuple[int, int, int]:
    """(token, group, head) strides of a (tokens, groups, heads, D) view."""
    return t.stride(0), t.stride(1), t.stride(2)


def rotate_heads(out: torch.Tensor, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, sign: float) -> None:
    """out = rotation of x by (c, sign·s) for x, out (tokens, groups, heads, D) float32 views (out with unit feature
    stride), c, s (tokens, rotary_dim / 2) contiguous float32: the extension's loop if it runs, else ATen ops."""
    if not extension_runs():
        rotate_into(out, x, c[:, None, None], s[:, None, None] if sign > 0 else -s[:, None, None])
        return
    if x.stride(3) != 1:
        x = x.contiguous()
    T, G, H, D = x.shape
    _ext.load().rotary_heads_cpu(x.data_ptr(), out.data_ptr(), c.data_ptr(), s.data_ptr(), T, G, H, D, c.shape[-1],
                                 _heads(x), _heads(out), sign, _ext.threads_for(x.numel()))


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c, s):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rotate_into(out, x, c, s)
        ctx.save_for_backward(c, s)
        return out

    @staticmethod
    def backward(ctx, dout):
        c, s = ctx.saved_tensors
        dx = torch.empty(dout.shape, dtype=dout.dtype, device=dout.device)
        rotate_into(dx, dout, c, -s)
        return dx, None, None


class QKVRotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wqkv_out, c, s, n_kv_heads: int, head_dim: int):
        lead = wqkv_out.shape[:-1]
        T, F = lead.numel(), wqkv_out.shape[-1]
        qkv = wqkv_out.reshape(T, n_kv_heads, F // (n_kv_heads * head_dim), head_dim)   # (T, Hkv, g + 2, D)
        g = qkv.shape[2] - 2
        c, s = c.reshape(T, c.shape[-1]).contiguous(), s.reshape(T, s.shape[-1]).contiguous()  # (T, rd/2)
        q = torch.empty(T, n_kv_heads, g, head_dim, dtype=qkv.dtype, device=qkv.device)
        k = torch.empty(T, n_kv_heads, 1, head_dim, dtype=qkv.dtype, device=qkv.device)
        rotate_heads(q, qkv[:, :, :g], c, s, 1.0)
        rotate_heads(k, qkv[:, :, g:g + 1], c, s, 1.0)
        v = qkv[:, :, g + 1].contiguous()
        ctx.save_for_backward(c, s)
        ctx.shape = (lead, n_kv_heads, g, head_dim)
        return (q.view(*lead, n_kv_heads * g, head_dim), k.view(*lead, n_kv_heads, head_dim),
                v.view(*lead, n_kv_heads, head_dim))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        c, s = ctx.saved_tensors
        lead, n_kv_heads, g, head_dim = ctx.shape
        T = c.shape[0]
        dqkv = torch.empty(T, n_kv_heads, g + 2, head_dim, dtype=dq.dtype, device=dq.device)
        rotate_heads(dqkv[:, :, :g], dq.reshape(T, n_kv_heads, g, head_dim), c, s, -1.0)
        rotate_heads(dqkv[:, :, g:g + 1], dk.reshape(T, n_kv_heads, 1, head_dim), c, s, -1.0)
        dqkv[:, :, g + 1].copy_(dv.reshape(T, n_kv_heads, head_dim))
        return dqkv.view(*lead, n_kv_heads * (g + 2) * head_dim), None, None, None, None


def apply_rotary_emb(x, cos, sin, seqlen_offsets, cu_seqlens, inplace):
    c, s = tables(cos, sin, positions(x.shape, x.device, seqlen_offsets, cu_seqlens), x.dtype)
    out = RotaryFunction.apply(x, c, s)
    return x.copy_(out) if inplace else out


def qkv_rotary(wqkv_out, cos, sin, n_kv_heads, head_dim, seqlen_offsets, cu_seqlens):
    pos = positions(wqkv_out.shape, wqkv_out.device, seqlen_offsets, cu_seqlens)
    c, s = tables(cos, sin, pos, wqkv_out.dtype)
    return QKVRotaryFunction.apply(wqkv_out, c, s, n_kv_heads, head_dim)
