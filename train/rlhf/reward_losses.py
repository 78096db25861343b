"""COOL RLHF's reward-model losses (InternLM2 report, section 4.2), and plain Bradley-Terry.

For a pair with scores r_c (chosen) and r_r (rejected), P = sigmoid(r_c - r_r):

    Bradley-Terry:  L = -log P
    focal ranking:  L = -(1 - 2 * max(0, P - 0.5)) ** gamma * log P        (gamma = 2: easy pairs, P -> 1, count
                                                                             little; a pair the model gets wrong,
                                                                             P <= 0.5, keeps the full -log P)
    log barrier:    L = -(log(b + s) + log(b - s))  per score s,  b = 5    (keeps scores inside (-b, b))
    total:          L = ranking + lambda * barrier,  lambda = 0.02

``-log P`` is computed as ``softplus(r_r - r_c)`` (no log of an underflowed sigmoid). Gradients flow through the
focal weight too (the loss is the formula as written, not a re-weighted BT with a constant weight).

Outside (-b, b) the barrier is undefined. It is **clamped, not raised** (raising would need a device-to-host sync
in every step, and one escaped score would kill a long run): the score is clamped to
[-(b - margin), b - margin] with margin = BARRIER_MARGIN * b, and beyond that point the barrier continues along
its tangent, ``L(s) = L(c) + L'(c) (s - c)`` with c the clamped score. The loss stays finite, convex and
continuous, and an escaped score is still pushed back with the barrier's steepest slope (about 1 / margin).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BARRIER_MARGIN = 1e-3      # fraction of the bound where the log barrier turns into its tangent
RANKING_LOSSES = ("focal", "bradley_terry")


def _reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_pair(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> None:
    for name, t in (("r_chosen", r_chosen), ("r_rejected", r_rejected)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen shape {tuple(r_chosen.shape)} differs from r_rejected shape "
                         f"{tuple(r_rejected.shape)}")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), reduced over pairs."""
    _check_pair(r_chosen, r_rejected)
    return _reduce(F.softplus(r_rejected - r_chosen), reduction)


def focal_ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, gamma: float = 2.0,
                       reduction: str = "mean") -> torch.Tensor:
    """-(1 - 2 max(0, P - 0.5))^gamma log P with P = sigmoid(r_chosen - r_rejected), reduced over pairs."""
    _check_pair(r_chosen, r_rejected)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    diff = r_chosen - r_rejected
    weight = (1.0 - 2.0 * (torch.sigmoid(diff) - 0.5).clamp(min=0.0)) ** gamma
    return _reduce(weight * F.softplus(-diff), reduction)


def log_barrier_penalty(scores: torch.Tensor, bound: float = 5.0, reduction: str = "mean") -> torch.Tensor:
    """-(log(bound + s) + log(bound - s)) per score, reduced; tangent continuation near and beyond +-bound
    (module docstring)."""
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError("scores must be a floating-point tensor")
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound!r}")
    edge = bound * (1.0 - BARRIER_MARGIN)
    c = scores.clamp(-edge, edge)
    value = -(torch.log(bound + c) + torch.log(bound - c))
    slope = 1.0 / (bound - c) - 1.0 / (bound + c)          # d/ds of the barrier at c
    return _reduce(value + slope.detach() * (scores - c), reduction)


def reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, kind: str = "focal", gamma: float = 2.0,
                penalty: float = 0.02, bound: float = 5.0, reduction: str = "mean") -> torch.Tensor:
    """Per pair: ranking (``kind``: focal | bradley_terry) + penalty * mean of the barrier over its two scores;
    so with "mean" the penalty term is the mean over all scores, as in the report."""
    if kind == "focal":
        rank = focal_ranking_loss(r_chosen, r_rejected, gamma, reduction="none")
    elif kind == "bradley_terry":
        rank = bradley_terry_loss(r_chosen, r_rejected, reduction="none")
    else:
        raise ValueError(f"reward.loss must be one of {', '.join(RANKING_LOSSES)}, got {kind!r}")
    if penalty:
        barrier = log_barrier_penalty(torch.stack([r_chosen, r_rejected]), bound, reduction="none")
        rank = rank + penalty * barrier.mean(dim=0)
    return _reduce(rank, reduction)
