"""Refreshing the reward model between PPO rounds: fine-tune it on preference pairs (the fast path's targeted pairs,
the slow path's labelled comparisons, and a replay of earlier pairs) with COOL RLHF's loss (focal ranking + log
barrier, ``train.rlhf.reward_losses``), and measure its pair accuracy per domain.

Pairs are the jsonl records of ``train.rlhf.hacking`` (``prompt`` as chat messages, ``chosen``/``rejected`` as reply
texts); each is scored as ``train.rlhf.rollouts.reward_ids`` builds it (condition prompt on the reward side).
The reward model trains through a ``train.learner.Learner`` (``reward_learner``), the optimizer step of every
stage. A refresh starts a fresh AdamW state (the reward model's optimizer is not carried across rounds); its
batches are a seeded shuffle of the pairs, so a refresh is a pure function of (model, pairs, seed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from train.config import OptimConfig
from train.data.chat import Message
from train.learner import Learner
from train.parallel import Runtime
from train.rlhf.reward_losses import reward_loss
from train.rlhf.rollouts import Prompt, reward_ids


@dataclass
class RewardRefreshConfig:
    steps: int = 20                    # optimizer steps per refresh
    pairs_per_step: int = 16
    lr: float = 1e-5                   # InternLM2's RM: cosine 1e-5 -> 5e-6; a constant rate for a short refresh
    weight_decay: float = 0.01
    loss: str = "focal"                # focal | bradley_terry
    gamma: float = 2.0
    penalty: float = 0.02              # lambda of the log barrier
    grad_clip: float = 1.0
    replay_pairs: int = 64             # pairs of the RM's own training data mixed into every refresh (no forgetting)
    replay_task_pairs: int = 0         # ... and of its correct-vs-wrong pairs on the PPO tasks


def _prompt_of(pair: dict) -> Prompt:
    return Prompt("", "", pair["domain"], tuple(Message(**m) for m in pair["prompt"]), "")


def pair_sequences(pair: dict, tokenizer, conditions: Mapping[str, str], reward_id: int) -> tuple[list[int], list[int]]:
    prompt = _prompt_of(pair)
    return (reward_ids(tokenizer, prompt, pair["chosen"], conditions, reward_id),
            reward_ids(tokenizer, prompt, pair["rejected"], conditions, reward_id))


def _pair_scores(model, pairs: list[dict], tokenizer, conditions, reward_id, device) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [s for p in pairs for s in pair_sequences(p, tokenizer, conditions, reward_id)]
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)
    cu = torch.tensor([0] + [len(s) for s in seqs], device=device).cumsum(0).to(torch.int32)
    scores = model(ids, cu).scores.float()
    return scores[0::2], scores[1::2]


def reward_learner(model, runtime: Runtime, cfg: RewardRefreshConfig) -> Learner:
    """The reward model's Learner: a constant ``reward_refresh.lr``, AdamW's default betas (0.9, 0.999),
    ``reward_refresh.weight_decay``, clipped to ``reward_refresh.grad_clip``."""
    optim = OptimConfig(lr=cfg.lr, betas=[0.9, 0.999], weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    return Learner(model, runtime, optim)


def refresh_reward_model(learner: Learner, pairs: list[dict], tokenizer, conditions: Mapping[str, str],
                         reward_id: int, cfg: RewardRefreshConfig, seed: int) -> list[float]:
    """Fine-tune ``learner``'s model in place on ``pairs`` for ``cfg.steps`` steps from a fresh optimizer state;
    returns the loss per step."""
    if not pairs:
        raise ValueError("pairs: the reward model refresh needs at least one preference pair")
    device = learner.runtime.device
    learner.model.train()
    learner.reset_optimizer()
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []

    def loss_fn(model, batch: list[dict]):
        r_c, r_r = _pair_scores(model, batch, tokenizer, conditions, reward_id, device)
        return reward_loss(r_c, r_r, cfg.loss, cfg.gamma, cfg.penalty), 1, {}

    for _ in range(cfg.steps):
        if len(order) < cfg.pairs_per_step:
            order += torch.randperm(len(pairs), generator=gen).tolist()
        batch, order = [pairs[i] for i in order[:cfg.pairs_per_step]], order[cfg.pairs_per_step:]
        losses.append(float(learner.step([batch], loss_fn).loss))
    learner.model.eval()
    return losses


@torch.no_grad()
def pair_accuracy(model, pairs: list[dict], tokenizer, conditions: Mapping[str, str], reward_id: int,
                  device: torch.device, chunk: int = 32) -> dict[str, float]:
    """Share of pairs whose chosen reply scores higher, per domain (or per the pair's "set" when it names one), and
    over all pairs ("all")."""
    right: dict[str, list[bool]] = {}
    for i in range(0, len(pairs), chunk):
        batch = pairs[i:i + chunk]
        r_c, r_r = _pair_scores(model, batch, tokenizer, conditions, reward_id, device)
        for p, ok in zip(batch, (r_c > r_r).tolist()):
            right.setdefault(p.get("set", p["domain"]), []).append(ok)
    out = {d: sum(v) / len(v) for d, v in sorted(right.items())}
    every = [x for v in right.values() for x in v]
    out["all"] = sum(every) / len(every) if every else 0.0
    return out
