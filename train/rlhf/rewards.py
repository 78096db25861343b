"""Reward shaping for PPO: the reward model's score at the last response token minus a per-token KL penalty.

KL estimator: k1, the per-token log-ratio of the sampled token, ``kl_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)``
(what OpenRLHF and InternLM's recipe use for the reward penalty). Its expectation over the policy's samples is the
exact KL(pi || pi_ref) of that step; a single sample can be negative. Both log-probs are the *trainer's*
(recomputed with the same kernels for actor and reference), never the sampler's.

    rewards[b, t] = -kl_coef * kl[b, t] * mask[b, t]  +  score[b] * [t is the last valid position of row b]

InternLM2 (COOL RLHF): kl_coef = 0.01. Tensors are (B, T) in the action layout of ``train.rlhf.advantages``.
"""
from __future__ import annotations

import torch


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate log pi - log pi_ref, (B, T) float32, 0 where ``mask`` is 0."""
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    return (logprobs.float() - ref_logprobs.float()) * mask.float()


def last_valid_onehot(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) float: 1 at the last position where ``mask`` is 1 in each row (all 0 for an empty row)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got {tuple(mask.shape)}")
    m = mask.float()
    T = m.shape[1]
    # argmax of position * mask is the last valid index; an all-zero row yields index 0, removed by the mask.
    positions = torch.arange(1, T + 1, device=m.device, dtype=m.dtype)
    last = (positions * m).argmax(dim=1)
    return torch.nn.functional.one_hot(last, T).to(m.dtype) * m


def shape_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), both (B, T) float32: see the module docstring. ``scores`` (B,) is the reward model's score
    of each full response."""
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores must be (B,) with B = {mask.shape[0]}, got {tuple(scores.shape)}")
    if not (isinstance(kl_coef, (int, float)) and not isinstance(kl_coef, bool) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be a number >= 0, got {kl_coef!r}")
    kl = kl_k1(logprobs, ref_logprobs, mask)
    rewards = -kl_coef * kl + scores.float()[:, None] * last_valid_onehot(mask)
    return rewards, kl
