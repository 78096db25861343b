"""SwiGLU activation silu(gate) * up, on two tensors or on one packed [gate | up] tensor.

Custom ops (torch.ops.internlm_kernels.*), any leading shape:
  swiglu_fwd(gate, up, m_g, m_d) -> out       swiglu_bwd(dout, gate, up, m_g, m_d) -> (dgate, dup)
  swiglu_packed_fwd(gate_up) -> out           swiglu_packed_bwd(dout, gate_up) -> dgate_up
Packed layout: gate_up (..., 2I) holds gate in [..., :I] and up in [..., I:] (what one matmul with the w1 and w3
weights stacked as rows [w1; w3] produces); out is (..., I), and the gradient comes back packed the same way.
m_g / m_d are the gate and down multipliers of Liger's LigerSiLUMulFunction: silu(m_g · gate) · up · m_d.
Kernels: internlm_kernels/triton/swiglu.py.
"""
from __future__ import annotations

import functools
import math

import torch

from .. import cpu, reference
from ..backend import choose
from ..checks import FLOAT_DTYPES, check_same_dtype, check_tensor
from ..cpu import swiglu as cpu_swiglu
from ..triton._rows import rows_of
from . import _eager as eager


@functools.cache   # an import statement costs ~0.5 µs per call even when the module is loaded
def _kernels():
    # Imported on first use so that the package imports without triton (the reference backend needs none).
    from ..triton import swiglu as kernels

    return kernels


def _new_like(t: torch.Tensor, shape=None) -> torch.Tensor:
    # empty_like is ~1 µs cheaper per call than torch.empty(t.shape, dtype=..., device=...)
    if shape is None:
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return torch.empty(shape, dtype=t.dtype, device=t.device)


@torch.library.custom_op("internlm_kernels::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, gate_multiplier: float = 1.0,
               down_multiplier: float = 1.0) -> torch.Tensor:
    out = _new_like(gate)
    if out.numel():
        _kernels().swiglu_forward(rows_of(gate), rows_of(up), rows_of(out), gate_multiplier, down_multiplier)
    return out


@swiglu_fwd.register_fake
def _(gate, up, gate_multiplier=1.0, down_multiplier=1.0):
    return _new_like(gate)


@torch.library.custom_op("internlm_kernels::swiglu_bwd", mutates_args=())
def swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_multiplier: float = 1.0,
               down_multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = _new_like(gate), _new_like(up)
    if dgate.numel():
        _kernels().swiglu_backward(rows_of(dout), rows_of(gate), rows_of(up), rows_of(dgate), rows_of(dup),
                                   gate_multiplier, down_multiplier)
    return dgate, dup


@swiglu_bwd.register_fake
def _(dout, gate, up, gate_multiplier=1.0, down_multiplier=1.0):
    return _new_like(gate), _new_like(up)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.multipliers = inputs[2:]


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return (*eager.call(swiglu_bwd, dout, gate, up, *ctx.multipliers), None, None)


swiglu_fwd.register_autograd(_backward, setup_context=_setup)


def _halves(gate_up_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up halves of packed rows (M, 2I): two strided (M, I) views, no copy."""
    half = gate_up_rows.shape[-1] // 2
    return gate_up_rows[:, :half], gate_up_rows[:, half:]


@torch.library.custom_op("internlm_kernels::swiglu_packed_fwd", mutates_args=())
def swiglu_packed_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    half = gate_up.shape[-1] // 2
    out = _new_like(gate_up, (*gate_up.shape[:-1], half))
    if out.numel():
        gate, up = _halves(rows_of(gate_up))
        _kernels().swiglu_forward(gate, up, out.view(-1, half))
    return out


@swiglu_packed_fwd.register_fake
def _(gate_up):
    return _new_like(gate_up, (*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("internlm_kernels::swiglu_packed_bwd", mutates_args=())
def swiglu_packed_bwd(dout: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    dgate_up = _new_like(gate_up)
    if dgate_up.numel():
        gate, up = _halves(rows_of(gate_up))
        dgate, dup = _halves(dgate_up.view(-1, gate_up.shape[-1]))
        _kernels().swiglu_backward(rows_of(dout), gate, up, dgate, dup)
    return dgate_up


@swiglu_packed_bwd.register_fake
def _(dout, gate_up):
    return _new_like(gate_up)


def _setup_packed(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward_packed(ctx, dout):
    (gate_up,) = ctx.saved_tensors
    return eager.call(swiglu_packed_bwd, dout, gate_up)


swiglu_packed_fwd.register_autograd(_backward_packed, setup_context=_setup_packed)


def swiglu(gate, up, gate_multiplier=1.0, down_multiplier=1.0):
    """silu(gate_multiplier · gate) · up · down_multiplier, computed in float32 and returned in gate's dtype.

    The multipliers are those of Liger's ``LigerSiLUMulFunction.apply(a, b, gate_multiplier, down_multiplier)``
    (Falcon-H1's ``mlp_multipliers``); the defaults give plain SwiGLU."""
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor("up", up, dtypes=FLOAT_DTYPES, device=gate.device)
    check_same_dtype("up", up, "gate", gate)
    if gate.shape != up.shape:
        raise ValueError(f"gate shape {tuple(gate.shape)} differs from up shape {tuple(up.shape)}")
    if gate.dim() == 0:
        raise ValueError("gate must have at least one dim")
    for name, value in (("gate_multiplier", gate_multiplier), ("down_multiplier", down_multiplier)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    gate_multiplier, down_multiplier = float(gate_multiplier), float(down_multiplier)
    backend = choose("swiglu", gate.device)
    if backend == "cpu" and cpu.runs_here("swiglu", gate.dtype in cpu_swiglu.DTYPES and cpu.plain(gate, up),
                                          f"dtype {gate.dtype} or tensor subclasses"):
        return cpu_swiglu.swiglu(gate, up, gate_multiplier, down_multiplier)
    if backend != "triton":
        return reference.swiglu(gate, up, gate_multiplier, down_multiplier)
    return eager.call(swiglu_fwd, gate, up, gate_multiplier, down_multiplier)


def swiglu_packed(gate_up):
    """SwiGLU of one tensor holding [gate | up] halves on its last dim: silu(gate_up[..., :I]) * gate_up[..., I:]."""
    check_tensor("gate_up", gate_up, dtypes=FLOAT_DTYPES)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2 != 0:
        raise ValueError(f"gate_up's last dim must be even ([gate | up] halves), got shape {tuple(gate_up.shape)}")
    backend = choose("swiglu", gate_up.device)
    if backend == "cpu" and cpu.runs_here("swiglu", gate_up.dtype in cpu_swiglu.DTYPES and cpu.plain(gate_up),
                                          f"dtype {gate_up.dtype} or tensor subclasses"):
        return cpu_swiglu.swiglu_packed(gate_up)
    if backend != "triton":
        return reference.swiglu_packed(gate_up)
    return eager.call(swiglu_packed_fwd, gate_up)
