"""SwiGLU activation silu(gate) * up."""
from __future__ import annotations

from .. import reference
from .._checks import FLOAT_DTYPES, check_same_dtype, check_tensor
from ..backend import choose


def swiglu(gate, up):
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor("up", up, dtypes=FLOAT_DTYPES, device=gate.device)
    check_same_dtype("up", up, "gate", gate)
    if gate.shape != up.shape:
        raise ValueError(f"gate shape {tuple(gate.shape)} differs from up shape {tuple(up.shape)}")
    choose("swiglu", gate.device)
    return reference.swiglu(gate, up)
