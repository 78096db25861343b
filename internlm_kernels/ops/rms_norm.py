"""RMSNorm with fused residual add: drop-in for flash_attn.ops.triton.layer_norm.rms_norm_fn (no bias)."""
from __future__ import annotations

from .. import reference
from .._checks import FLOAT_DTYPES, check_tensor
from ..backend import choose


def rms_norm(x, weight, eps=1e-6, residual=None, prenorm=False, residual_in_fp32=False):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=1, device=x.device)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[0]} entries but x's last dim is {x.shape[-1]}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES, device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    choose("rms_norm", x.device)
    return reference.rms_norm(x, weight, eps, residual, prenorm, residual_in_fp32)
