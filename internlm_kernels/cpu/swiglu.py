"""SwiGLU silu(gate) · up on CPU: one autograd node.

With g = m_g · gate (Liger's gate multiplier), s = sigmoid(g) and m_d the down multiplier:
    out = g · s · up · m_d
    dup = dout · m_d · g · s,   dgate = dout · m_d · up · s · (1 + g · (1 - s)) · m_g
The extension's kernels (``_C.swiglu_cpu``, csrc/cpu/swiglu_kernels.h) run each pass in one sweep and keep nothing
but gate and up for the backward. As ATen ops (the path where the extension is not built, and what torch.compile
traces) the forward is silu and a product, the backward three calls (``silu_backward`` recomputes s) with silu(g)
kept from the forward when a gradient is wanted: at 2048 × 352 that was ~1.5 ms per layer forward and backward in
the tiny preset's training step (1 thread), ~0.4 ms per call of each product alone. Multipliers of 1 add no op on
the ATen path. float32 tensors (``DTYPES``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from . import extension_runs
from .attention import isa

DTYPES = (torch.float32,)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, width) with contiguous rows (a view where the layout allows)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(gate, up, out, dout, dgate, dup, gate_multiplier, down_multiplier, backward: bool) -> None:
    """The extension's pass over (rows, width) views with unit feature stride; None for what the pass does not use."""
    views = (gate, up, out, dout, dgate, dup)
    _ext.load().swiglu_cpu(tuple(0 if t is None else t.data_ptr() for t in views), gate.shape[0], gate.shape[1],
                           tuple(0 if t is None else t.stride(0) for t in views), gate_multiplier, down_multiplier,
                           backward, isa(), _ext.threads_for(gate.numel()))


def silu_mul_packed(a: torch.Tensor) -> torch.Tensor:
    """silu(a[:, :I]) · a[:, I:] of a float32 (rows, 2I), no autograd: the generator's MLP after its fused w1|w3 product
    (models/decode_step.py). One kernel call where the extension runs, else silu and an in-place product."""
    inter = a.shape[-1] // 2
    if not (extension_runs() and a.numel() > 0):
        return F.silu(a[:, :inter]).mul_(a[:, inter:])
    a2 = _rows(a)
    gate, up = a2[:, :inter], a2[:, inter:]
    out = torch.empty(gate.shape, dtype=a.dtype)
    _launch(gate, up, out, None, None, None, 1.0, 1.0, backward=False)
    return out


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, gate_multiplier=1.0, down_multiplier=1.0):
        ctx.multipliers = gate_multiplier, down_multiplier
        ctx.kernel = extension_runs() and gate.numel() > 0
        if ctx.kernel:
            g2, u2 = _rows(gate), _rows(up)
            out = torch.empty(g2.shape, dtype=gate.dtype)
            _launch(g2, u2, out, None, None, None, gate_multiplier, down_multiplier, backward=False)
            ctx.save_for_backward(g2, u2, None)
            return out.view(gate.shape)
        act = F.silu(gate if gate_multiplier == 1.0 else gate * gate_multiplier)
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(gate, up, act)
            out = act * up
        else:
            ctx.save_for_backward(gate, up, None)
            out = act.mul_(up)
        return out if down_multiplier == 1.0 else out.mul_(down_multiplier)

    @staticmethod
    def backward(ctx, dout):
        gate, up, act = ctx.saved_tensors
        gate_multiplier, down_multiplier = ctx.multipliers
        need_gate, need_up = ctx.needs_input_grad[:2]
        if ctx.kernel and extension_runs():
            shape = dout.shape
            d2 = _rows(dout)
            dgate = torch.empty(gate.shape, dtype=gate.dtype) if need_gate else None
            dup = torch.empty(gate.shape, dtype=gate.dtype) if need_up else None
            _launch(gate, up, None, d2, dgate, dup, gate_multiplier, down_multiplier, backward=True)
            return (None if dgate is None else dgate.view(shape), None if dup is None else dup.view(shape), None,
                    None)
        if ctx.kernel:   # saved as (rows, width) by the kernel's forward, no activation kept
            gate, up = gate.view(dout.shape), up.view(dout.shape)
        if gate_multiplier != 1.0:
            gate = gate * gate_multiplier
        if down_multiplier != 1.0:
            dout = dout * down_multiplier
        dgate = dup = None
        if need_gate:
            dgate = torch.ops.aten.silu_backward(dout * up, gate)
            if gate_multiplier != 1.0:
                dgate.mul_(gate_multiplier)
        if need_up:
            dup = (F.silu(gate) if act is None else act) * dout
        return dgate, dup, None, None


def swiglu(gate, up, gate_multiplier=1.0, down_multiplier=1.0):
    return SwiGLUFunction.apply(gate, up, gate_multiplier, down_multiplier)


class SwiGLUPackedFunction(torch.autograd.Function):
    """[gate | up] halves of one tensor; the backward writes both halves of one gradient buffer (no cat)."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.kernel = extension_runs() and gate_up.numel() > 0
        if ctx.kernel:
            gu = _rows(gate_up)
            gate, up = gu.chunk(2, dim=-1)
            out = torch.empty(gate.shape, dtype=gu.dtype)
            _launch(gate, up, out, None, None, None, 1.0, 1.0, backward=False)
            ctx.save_for_backward(gu)
            return out.view(*gate_up.shape[:-1], gate.shape[-1])
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, dout):
        (gate_up,) = ctx.saved_tensors
        if ctx.kernel and extension_runs():
            gate, up = gate_up.chunk(2, dim=-1)
            dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype)
            dgate, dup = dgate_up.chunk(2, dim=-1)
            _launch(gate, up, None, _rows(dout), dgate, dup, 1.0, 1.0, backward=True)
            return dgate_up.view(*dout.shape[:-1], gate_up.shape[-1])
        if ctx.kernel:   # saved as (rows, 2 · width) by the kernel's forward
            gate_up = gate_up.view(*dout.shape[:-1], gate_up.shape[-1])
        gate, up = gate_up.chunk(2, dim=-1)
        if torch.compiler.is_compiling():  # Dynamo refuses out= into a strided view
            return torch.cat((torch.ops.aten.silu_backward(dout * up, gate), F.silu(gate) * dout), dim=-1)
        dgate_up = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
        dgate, dup = dgate_up.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(dout * up, gate, grad_input=dgate)
        torch.mul(F.silu(gate), dout, out=dup)
        return dgate_up


def swiglu_packed(gate_up):
    return SwiGLUPackedFunction.apply(gate_up)
