"""Fused linear + cross-entropy: the loss of hidden @ weight.T without materializing the logits."""
from __future__ import annotations

import torch

from .. import reference
from .._checks import FLOAT_DTYPES, check_tensor
from ..backend import choose


def fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0, return_z_loss=False):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2, device=hidden.device)
    check_tensor("target", target, dtypes=(torch.int64, torch.int32), ndim=1, device=hidden.device)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight is {tuple(weight.shape)} but hidden has {hidden.shape[1]} features")
    if target.shape[0] != hidden.shape[0]:
        raise ValueError(f"target has {target.shape[0]} entries but hidden has {hidden.shape[0]} rows")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    choose("linear_cross_entropy", hidden.device)
    loss, z_loss = reference.linear_cross_entropy(hidden, weight, target.long(), bias, ignore_index, reduction,
                                                  label_smoothing, lse_square_scale, softcap)
    return (loss, z_loss) if return_z_loss else loss
