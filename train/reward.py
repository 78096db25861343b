"""The conditional reward model of COOL RLHF (InternLM2 report, section 4.2).

One reward model for every preference domain: a condition system prompt names the domain (``train.preference``),
the score is read at the reward token appended to the end, and the loss is the focal ranking loss plus the log
barrier (``train.reward_losses``; plain Bradley-Terry selectable).
"""
from __future__ import annotations

import torch

from .item_packing import ItemBatch
from .reward_losses import (  # noqa: F401  (the losses are part of this module's API)
    bradley_terry_loss,
    focal_ranking_loss,
    log_barrier_penalty,
    reward_loss,
)


def pair_loss_fn(kind: str = "focal", gamma: float = 2.0, penalty: float = 0.02, bound: float = 5.0):
    """The Trainer's loss for packed pairs (chosen at even, rejected at odd sequences): (summed pair losses, the
    number of pairs, summed metrics: correct pairs, chosen-minus-rejected margin, |score|)."""
    def loss_fn(model: torch.nn.Module, batch: ItemBatch):
        if batch.seqs_per_item != 2:
            raise ValueError(f"a reward batch holds pairs (2 sequences per item), got {batch.seqs_per_item}")
        scores = model(batch.input_ids, batch.cu_seqlens).scores            # (2P,) float32
        chosen, rejected = scores[0::2], scores[1::2]
        loss = reward_loss(chosen, rejected, kind, gamma, penalty, bound, reduction="sum")
        d = (chosen - rejected).detach()
        metrics = {"pair_acc": (d > 0).sum(), "margin": d.sum(),
                   "score_abs": (chosen.detach().abs() + rejected.detach().abs()).sum() / 2}
        return loss, len(batch.groups), metrics
    return loss_fn
