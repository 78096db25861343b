"""Generalized advantage estimation over padded (B, T) batches, and masked whitening.

Conventions (the whole PPO stage uses them): position t of a (B, T) tensor is one *action* (a generated token);
``mask`` is 1 where that action belongs to the response and 0 at padding (or at tokens the policy did not choose,
e.g. tool results inside a response). ``values[b, t]`` is the critic's estimate of the return from action t on.

For a row's valid positions t_0 < t_1 < ... < t_n (masked positions are skipped, so a hole is not a step):
    delta_i = r_{t_i} + gamma * V_{t_{i+1}} - V_{t_i}          (V_{t_{n+1}} = 0: the episode ends after t_n)
    A_{t_i} = delta_i + gamma * lam * A_{t_{i+1}}             (A_{t_{n+1}} = 0)
    R_{t_i} = A_{t_i} + V_{t_i}                               (the critic's regression target)
Masked positions get A = R = 0. InternLM2 (COOL RLHF): gamma = 1, lam = 0.99.

The recursion runs backwards over T with tensor operations only: no device->host synchronisation, usable under
torch.inference_mode and torch.compile(fullgraph=True) (the loop over T unrolls at trace time).
"""
from __future__ import annotations

import torch


def _check_bt(name: str, t: torch.Tensor, shape: torch.Size | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a (B, T) tensor, got {getattr(t, 'shape', type(t))}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} differs from rewards shape {tuple(shape)}")


def _check_rate(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T) float32, zero where ``mask`` is 0. See the module docstring."""
    _check_bt("rewards", rewards)
    _check_bt("values", values, rewards.shape)
    _check_bt("mask", mask, rewards.shape)
    if values.device != rewards.device or mask.device != rewards.device:
        raise ValueError("rewards, values and mask must be on one device")
    _check_rate("gamma", gamma)
    _check_rate("lam", lam)
    valid = mask.bool()
    r = rewards.float()
    v = values.float().masked_fill(~valid, 0.0)
    B, T = r.shape
    next_value = r.new_zeros(B)          # V of the next valid action of each row (0 after the last one)
    next_adv = r.new_zeros(B)            # A of the next valid action
    advantages = torch.zeros_like(r)
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        ok = valid[:, t]
        advantages[:, t] = torch.where(ok, adv_t, 0.0)
        # A masked position is not a step: the carries pass over it unchanged.
        next_value = torch.where(ok, v[:, t], next_value)
        next_adv = torch.where(ok, adv_t, next_adv)
    returns = (advantages + v).masked_fill(~valid, 0.0)
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid positions (population std); masked positions become 0. The optional
    advantage normalization (off in InternLM2's recipe)."""
    _check_bt("x", x)
    _check_bt("mask", mask, x.shape)
    m = mask.to(x.dtype)
    count = m.sum().clamp_min(1.0)
    mean = (x * m).sum() / count
    var = (((x - mean) * m) ** 2).sum() / count
    return (x - mean) * torch.rsqrt(var + eps) * m
