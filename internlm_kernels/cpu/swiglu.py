"""SwiGLU silu(gate) · up on CPU: one autograd node, ATen's fused silu and silu_backward kernels.

Forward 2 ops; backward 4: du = dout · silu(g), dg = silu_backward(dout · u, g) (the reference's graph is
sigmoid, two muls and their backwards). float32 tensors (``DTYPES``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = (torch.float32,)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate = dup = None
        if ctx.needs_input_grad[0]:
            dgate = torch.ops.aten.silu_backward(dout * up, gate)
        if ctx.needs_input_grad[1]:
            dup = F.silu(gate).mul_(dout)
        return dgate, dup


def swiglu(gate, up):
    return SwiGLUFunction.apply(gate, up)


class SwiGLUPackedFunction(torch.autograd.Function):
    """[gate | up] halves of one tensor; the backward writes both halves of one gradient buffer (no cat)."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, dout):
        (gate_up,) = ctx.saved_tensors
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
