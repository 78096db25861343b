"""Reward shaping for PPO: the reward model's score (plus, optionally, a checker's verdict) at the last response
token minus a per-token KL penalty.

KL estimator: k1, the per-token log-ratio of the sampled token, ``kl_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)``
(what OpenRLHF and InternLM's recipe use for the reward penalty). Its expectation over the policy's samples is the
exact KL(pi || pi_ref) of that step; a single sample can be negative. Both log-probs are the *trainer's*
(recomputed with the same kernels for actor and reference), never the sampler's.

    rewards[b, t] = -kl_coef * kl[b, t] * mask[b, t]  +  score[b] * [t is the last valid position of row b]

InternLM2 (COOL RLHF): kl_coef = 0.01. Tensors are (B, T) in the action layout of ``train.rlhf.advantages``.

A verifiable reward beside the reward model (``checker_scores``): where a prompt has a checker (an exact answer),
``score[b] = rm[b] + checker_weight * (+1 if the reply is right else -1)``; prompts without one keep the RM's score.
InternLM2's recipe is the reward model alone (weight 0); a rule-based verifier summed with the learned reward is what
RLVR-style recipes (Tulu 3) and TRL's weighted ``reward_funcs`` do.
"""
from __future__ import annotations

from typing import Sequence

import torch


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate log pi - log pi_ref, (B, T) float32, 0 where ``mask`` is 0."""
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    return (logprobs.float() - ref_logprobs.float()) * mask.float()


def checker_scores(rm_scores: torch.Tensor, correct: Sequence[bool | None], checker_weight: float) -> torch.Tensor:
    """(B,) float32: ``rm_scores`` plus ``checker_weight`` times each reply's verdict (+1 right, -1 wrong, 0 for a
    prompt without a checker)."""
    if rm_scores.dim() != 1 or rm_scores.shape[0] != len(correct):
        raise ValueError(f"rm_scores must be (B,) with B = len(correct) = {len(correct)}, got {tuple(rm_scores.shape)}")
    if not (isinstance(checker_weight, (int, float)) and not isinstance(checker_weight, bool) and checker_weight >= 0):
        raise ValueError(f"checker_weight must be a number >= 0, got {checker_weight!r}")
    if checker_weight == 0:
        return rm_scores.float()
    verdict = torch.tensor([0.0 if c is None else (1.0 if c else -1.0) for c in correct], dtype=torch.float32)
    return rm_scores.float() + checker_weight * verdict.to(rm_scores.device)


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
