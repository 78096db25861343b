"""Modules for model code, wrapping the functional ops."""
from __future__ import annotations

import torch

from .ops.cross_entropy import fused_linear_cross_entropy
from .ops.rms_norm import rms_norm
from .ops.swiglu import swiglu


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dim; ``forward(x, residual=None, prenorm=False)`` fuses the residual add."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm(x, self.weight, self.eps, residual, prenorm, residual_in_fp32)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(torch.nn.Module):
    """silu(gate) * up."""

    def forward(self, gate, up):
        return swiglu(gate, up)


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Cross-entropy of ``hidden @ weight.T`` without materializing logits (Liger's module signature)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 lse_square_scale: float = 0.0, softcap: float = 0.0, return_z_loss: bool = False):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.return_z_loss = return_z_loss

    def forward(self, weight, hidden, target, bias=None):
        return fused_linear_cross_entropy(hidden, weight, target, bias, self.ignore_index, self.reduction,
                                          self.label_smoothing, self.lse_square_scale, self.softcap,
                                          self.return_z_loss)
