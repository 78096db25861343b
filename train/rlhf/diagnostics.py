"""Sampler vs trainer log-probabilities: how far the generator's per-token log-probs (top-p renormalized, decode
kernels, maybe another precision) are from the ones the trainer recomputes. PPO's ratios use the trainer's; a
large gap here would bias them if the sampler's were used (reported as metrics, never used in the loss).

All statistics are over valid tokens and come back as 0-dim tensors (no host sync)."""
from __future__ import annotations

import torch

from train.rlhf.losses import masked_mean


def logprob_mismatch(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """mean_abs: mean |sampler - trainer|; mean: mean (sampler - trainer) (top-p renormalization makes it > 0);
    max_abs: the largest gap; ratio_mean: mean of exp(trainer - sampler), the importance weight the sampler's
    log-probs would have silently dropped (1 when they agree)."""
    if sampler_logprobs.shape != trainer_logprobs.shape or sampler_logprobs.shape != mask.shape:
        raise ValueError(f"sampler_logprobs {tuple(sampler_logprobs.shape)}, trainer_logprobs "
                         f"{tuple(trainer_logprobs.shape)} and mask {tuple(mask.shape)} must have one shape")
    diff = sampler_logprobs.float() - trainer_logprobs.float()
    valid = mask.bool()
    return {"mean_abs": masked_mean(diff.abs(), mask), "mean": masked_mean(diff, mask),
            "max_abs": torch.where(valid, diff.abs(), 0.0).amax(),
            "ratio_mean": masked_mean(torch.exp(-diff), mask)}
