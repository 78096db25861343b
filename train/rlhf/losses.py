"""PPO losses over (B, T) action tensors (see ``train.rlhf.advantages`` for the layout).

Clipped policy surrogate (Schulman et al. 2017), with r_t = exp(log pi(a_t) - log pi_old(a_t)):
    L_policy = mean_t  -min(r_t * A_t, clip(r_t, 1 - eps, 1 + eps) * A_t)
Value loss, unclipped by default (InternLM2's recipe), clipped around the rollout's values when ``clip_eps`` is set:
    L_value = mean_t  0.5 * (V_t - R_t)^2
    L_value = mean_t  0.5 * max((V_t - R_t)^2, (V_old + clip(V_t - V_old, -eps, eps) - R_t)^2)
"mean_t" is over the valid tokens: the sum over valid tokens divided by ``num_tokens`` (default: the valid tokens of
these tensors; pass the count of the whole mini-batch when it is split into micro-batches, so the gradients add up
to the mini-batch's token mean). Statistics come back as 0-dim tensors: nothing is read to the host here.
"""
from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask.to(x.dtype)).sum()


def _denominator(mask: torch.Tensor, num_tokens) -> torch.Tensor | float:
    if num_tokens is None:
        return mask.float().sum().clamp_min(1.0)
    return num_tokens


def masked_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens=None) -> torch.Tensor:
    return masked_sum(x, mask) / _denominator(mask, num_tokens)


def _check_same(**tensors) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes differ: {shapes}")


def _check_clip(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2, num_tokens=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (a loss: minimize it). Stats: clip_fraction (share of tokens where the clipped term won),
    approx_kl (k1 of the update, mean of log pi_old - log pi), both over ``num_tokens`` like the loss (so the parts
    of a split mini-batch add up), and ratio_max (of these tokens)."""
    _check_same(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    _check_clip("clip_eps", clip_eps)
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        m = mask.bool()
        stats = {"clip_fraction": masked_mean((clipped < unclipped).float(), mask, num_tokens),
                 "approx_kl": masked_mean(-log_ratio, mask, num_tokens),
                 "ratio_max": torch.where(m, ratio, 0.0).amax()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float | None = None, num_tokens=None) -> torch.Tensor:
    """0.5 * squared error to the returns, optionally clipped around ``old_values`` (see the module docstring)."""
    _check_same(values=values, old_values=old_values, returns=returns, mask=mask)
    v, ret = values.float(), returns.float()
    error = (v - ret) ** 2
    if clip_eps is not None:
        _check_clip("value_clip_eps", clip_eps)
        old = old_values.float()
        v_clipped = old + torch.clamp(v - old, -clip_eps, clip_eps)
        error = torch.maximum(error, (v_clipped - ret) ** 2)
    return 0.5 * masked_mean(error, mask, num_tokens)
