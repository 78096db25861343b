"""Modules for model code, wrapping the functional ops."""
from __future__ import annotations

import torch

from .ops.cross_entropy import fused_linear_cross_entropy
from .ops.linear import linear
from .ops.rms_norm import rms_norm
from .ops.rotary import rotary_cos_sin
from .ops.swiglu import swiglu, swiglu_packed


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dim; ``forward(x, residual=None, prenorm=False)`` fuses the residual add.

    ``offset`` is added to the weight (Gemma: 1, the weight then starts at 0); ``casting_mode`` "gemma" (all
    in fp32), "llama" (normalized row rounded to x's dtype before the weight) or "none" (Liger's: statistics and
    scaling in x's dtype), as in ``ik.rms_norm``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None, offset: float = 0.0,
                 casting_mode: str = "gemma"):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.casting_mode = casting_mode
        # weight + offset starts at 1: the identity scale
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), 1.0 - offset, device=device, dtype=dtype))

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm(x, self.weight, self.eps, residual, prenorm, residual_in_fp32, self.offset, self.casting_mode)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}, "
                f"casting_mode={self.casting_mode!r}")


class Linear(torch.nn.Linear):
    """torch.nn.Linear (same parameters, state dict and init) whose forward runs ``internlm_kernels.linear``."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class SwiGLU(torch.nn.Module):
    """silu(gate) * up; called with one tensor, it holds [gate | up] halves on its last dim (fused w1/w3 output).

    ``gate_multiplier`` / ``down_multiplier`` (Liger's LigerSiLUMulFunction, Falcon-H1's ``mlp_multipliers``):
    silu(gate_multiplier · gate) · up · down_multiplier; the packed form takes the defaults only."""

    def __init__(self, gate_multiplier: float = 1.0, down_multiplier: float = 1.0):
        super().__init__()
        self.gate_multiplier, self.down_multiplier = float(gate_multiplier), float(down_multiplier)

    def forward(self, gate, up=None):
        if up is None:
            if (self.gate_multiplier, self.down_multiplier) != (1.0, 1.0):
                raise NotImplementedError("gate/down multipliers with a packed [gate | up] tensor: pass gate and up")
            return swiglu_packed(gate)
        return swiglu(gate, up, self.gate_multiplier, self.down_multiplier)

    def extra_repr(self) -> str:
        return f"gate_multiplier={self.gate_multiplier}, down_multiplier={self.down_multiplier}"


class RotaryEmbedding(torch.nn.Module):
    """InternLM2's RoPE tables, built once and cached: ``forward(seqlen, device)`` -> cos, sin (seqlen, dim / 2).

    ``scaling_type`` None, "linear" (positions divided by the factor) or "dynamic" (NTK: the base grows once
    seqlen exceeds max_position_embeddings, so such tables are built for that exact seqlen). Tables are float32 by
    default (the kernels compute in float32 whatever the dtype of x) and are not part of the state dict.
    """

    def __init__(self, dim: int, theta: float = 10000.0, scaling_type: str | None = None, scaling_factor: float = 1.0,
                 max_position_embeddings: int | None = None):
        super().__init__()
        if scaling_type not in (None, "linear", "dynamic"):
            raise NotImplementedError(f"scaling_type {scaling_type!r} (supported: None, 'linear', 'dynamic')")
        if scaling_type == "dynamic" and max_position_embeddings is None:
            raise ValueError("scaling_type='dynamic' needs max_position_embeddings")
        self.dim, self.theta = dim, theta
        self.scaling_type, self.scaling_factor = scaling_type, scaling_factor
        self.max_position_embeddings = max_position_embeddings
        self._cached: tuple[int | None, torch.device, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def forward(self, seqlen: int, device=None, dtype: torch.dtype = torch.float32):
        device = torch.device(device if device is not None else "cpu")
        if self.scaling_type == "dynamic" and seqlen > self.max_position_embeddings:
            key, length = seqlen, seqlen  # the NTK-rescaled base depends on seqlen: this table serves only seqlen
        else:
            key, length = None, max(seqlen, self.max_position_embeddings or 0)  # plain base: prefixes serve all
        c = self._cached
        if c is None or c[:3] != (key, device, dtype) or c[3].shape[0] < length:
            cos, sin = rotary_cos_sin(length, self.dim, self.theta, self.scaling_type, self.scaling_factor,
                                      self.max_position_embeddings, device=device, dtype=dtype)
            self._cached = c = (key, device, dtype, cos, sin)
        return c[3][:seqlen], c[4][:seqlen]

    def extra_repr(self) -> str:
        return (f"{self.dim}, theta={self.theta}, scaling_type={self.scaling_type}, "
                f"scaling_factor={self.scaling_factor}, max_position_embeddings={self.max_position_embeddings}")


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Cross-entropy of ``hidden @ weight.T`` without materializing logits: Liger's module's ``forward(lin_weight,
    _input, target, bias=None)`` and its options, by keyword (the positional order of ours differs: Liger's first
    is ``ce_weight``). ``softcap`` None means none. Returns the loss, or a tuple (loss[, z_loss][, token_accuracy]
    [, predicted_tokens]) where Liger returns its CrossEntropyOutput dataclass."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 lse_square_scale: float = 0.0, softcap: float | None = 0.0, return_z_loss: bool = False, *,
                 ce_weight: torch.Tensor | None = None, accum_dtype: torch.dtype | None = None,
                 use_token_scaling: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.ce_weight = ce_weight
        self.accum_dtype = accum_dtype
        self.use_token_scaling = use_token_scaling
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens

    def forward(self, weight, hidden, target, bias=None):
        return fused_linear_cross_entropy(hidden, weight, target, bias, self.ignore_index, self.reduction,
                                          self.label_smoothing, self.lse_square_scale, self.softcap,
                                          self.return_z_loss, ce_weight=self.ce_weight,
                                          return_token_accuracy=self.return_token_accuracy,
                                          return_predicted_tokens=self.return_predicted_tokens,
                                          accum_dtype=self.accum_dtype, use_token_scaling=self.use_token_scaling)
