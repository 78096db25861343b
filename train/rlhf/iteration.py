"""One PPO iteration on a batch of rollouts: experience (trainer-side log-probs, values, shaped rewards, GAE),
then PPO epochs over mini-batches for the actor (clipped surrogate + the pretraining loss) and the critic.

Layout. A rollout is a right-padded (B, S) batch of prompt + response tokens. Its *actions* are the (B, S-1)
positions t = 0..S-2: action t is token t+1, chosen after seeing tokens 0..t. ``action_mask[b, t]`` is 1 when token
t+1 of row b is a response token the policy sampled. The actor's log-prob of action t and the critic's value of
action t are both read at position t (the hidden state that has seen tokens 0..t).

Per-token log-probs come from the final hidden states and the output head through ``ik.fused_linear_logprobs``
(never materializing tokens x vocab logits) — recomputed in the trainer for the actor and the reference with the same kernels, never the sampler's (which are top-p
renormalized and come from the decode path; ``train.rlhf.diagnostics`` measures the gap).

The iteration (``ppo_iteration``):
    old_logp, ref_logp, old_values   (no grad)                       from actor, reference, critic
    rewards, kl = shape_rewards(scores, old_logp, ref_logp, mask, kl_coef)
    advantages, returns = gae(rewards, old_values, mask, gamma, lam)     [whitened if normalize_advantages]
    for epoch in 1..ppo_epochs:
        order = randperm(B, generator)                                    one permutation per epoch
        for each of the mini_batches slices of order:
            actor:  policy_loss(actor logp, old_logp, A) + ptx_coef * LM loss on the next pretraining batch
                    -> Learner.step (clip, FusedAdamW)                    (skipped while the actor is frozen)
            critic: value_loss(critic values, old_values, returns)  -> Learner.step
The actor and the critic are ``train.learner.Learner``s: the optimizer step of every stage, whatever the parallel
mode. Their losses are means over the mini-batch's action tokens, so each step's loss function returns n = 1.
Statistics are accumulated on the device and read once at the end. When the rollout carries the generator's own
log-probs, their gap to the trainer's (``train.rlhf.diagnostics.logprob_mismatch``) is reported as
``sampler_mismatch_*`` — a metric only, never used in the loss.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from train.config import OptimConfig
from train.learner import Learner
from train.parallel import Runtime
from train.rlhf.advantages import gae, whiten
from train.rlhf.diagnostics import logprob_mismatch
from train.rlhf.losses import masked_mean, policy_loss, value_loss
from train.rlhf.rewards import shape_rewards


@dataclass
class PPOConfig:
    """The ``[ppo]`` section. Defaults are InternLM2's COOL RLHF recipe where it gives one."""
    kl_coef: float = 0.01              # per-token k1 KL penalty to the reference in the reward
    checker_weight: float = 0.0        # + this x (+1 right / -1 wrong) on prompts with a checker (train.rlhf.rewards);
                                       # 0 = the reward model alone (InternLM2)
    gamma: float = 1.0
    lam: float = 0.99
    clip_eps: float = 0.2              # policy ratio clip
    value_clip_eps: float = 0.0        # 0 = unclipped value loss (InternLM2); > 0 clips around the rollout values
    normalize_advantages: bool = False  # InternLM2: no advantage normalization
    ptx_coef: float = 0.5              # weight of the pretraining (language-modelling) loss in the actor's loss
    ppo_epochs: int = 1                # passes over each rollout batch
    mini_batches: int = 1              # optimizer steps per epoch (the batch is split into this many)
    actor_lr: float = 1e-6
    critic_lr: float = 5e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0             # per model; 0 = no clipping
    temperature: float = 1.0           # sampling temperature; log-probs are of logits / temperature


@dataclass
class Rollout:
    input_ids: torch.Tensor            # (B, S) int64, prompt + response, right padded
    attention_mask: torch.Tensor       # (B, S) 0/1
    action_mask: torch.Tensor          # (B, S-1) 0/1: token t+1 is a sampled response token
    scores: torch.Tensor               # (B,) float32, the reward model's score of each response
    sampler_logprobs: torch.Tensor | None = None   # (B, S-1) the generator's log-probs of the actions (metric only)

    def rows(self, index: torch.Tensor) -> "Rollout":
        sampler = None if self.sampler_logprobs is None else self.sampler_logprobs[index]
        return Rollout(self.input_ids[index], self.attention_mask[index], self.action_mask[index], self.scores[index],
                       sampler)


@dataclass
class Experience:
    rollout: Rollout
    old_logprobs: torch.Tensor         # (B, S-1) actor, before the update
    ref_logprobs: torch.Tensor         # (B, S-1) reference
    old_values: torch.Tensor           # (B, S-1) critic, before the update
    rewards: torch.Tensor              # (B, S-1) shaped
    kl: torch.Tensor                   # (B, S-1) k1 per token
    advantages: torch.Tensor           # (B, S-1)
    returns: torch.Tensor              # (B, S-1)


def action_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """(B, S-1) float32: log-prob of token t+1 at position t (0 where token t+1 is padding), through the model's
    forward (``logprobs_temperature``: fused, no logits), so ``model`` may be a DDP / ZeRO / FSDP2 module, or
    tensor parallel (the log-probs then vocabulary-parallel, the same on every rank of the tp group)."""
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids, logprobs_temperature=temperature)
    return out.logprobs[:, :-1]


def action_values(critic, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S-1) float32: the critic's value of action t, read at position t."""
    return critic(input_ids, attention_mask=attention_mask).values[:, :-1]


@torch.no_grad()
def make_experience(actor, reference, critic, rollout: Rollout, cfg: PPOConfig, parallel=None) -> Experience:
    """The experience of ``rollout`` (this rank's rows). With a data-parallel ``parallel`` (the actor's), every
    rank's rows are then gathered, in rank order, so every rank holds the whole batch's experience (the rows of
    the 1-process batch, in its order); advantages are whitened over the whole batch."""
    ids, attn, mask = rollout.input_ids, rollout.attention_mask, rollout.action_mask
    old_logp = action_logprobs(actor, ids, attn, cfg.temperature)
    ref_logp = action_logprobs(reference, ids, attn, cfg.temperature)
    old_values = action_values(critic, ids, attn)
    rewards, kl = shape_rewards(rollout.scores, old_logp, ref_logp, mask, cfg.kl_coef)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    exp = Experience(rollout, old_logp, ref_logp, old_values, rewards, kl, advantages, returns)
    if parallel is not None and parallel.dims.dp > 1:
        exp = gather_experience(exp, parallel.dp_group, parallel.dims.dp)
    if cfg.normalize_advantages:
        exp.advantages = whiten(exp.advantages, exp.rollout.action_mask)
    return exp


def _gather_rows(t: torch.Tensor | None, width: int, pad, group, world: int) -> torch.Tensor | None:
    """Every rank's ``t`` (same row count everywhere), right-padded to ``width`` columns, concatenated in rank
    order."""
    import torch.distributed as dist

    if t is None:
        return None
    if t.dim() == 2 and t.shape[1] < width:
        t = torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def gather_experience(exp: Experience, group, world: int, pad_id: int = 0) -> Experience:
    """All ranks' experience rows (right-padded to the longest row of any rank: padding is masked out of every
    loss, so a row's values do not depend on the width)."""
    import torch.distributed as dist

    ro = exp.rollout
    width = torch.tensor(ro.input_ids.shape[1], device=ro.input_ids.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
    S = int(width)                                   # one host read per iteration: the gathered tensors' width

    def rows(t, pad=0, full=False):
        return _gather_rows(t, S if full else S - 1, pad, group, world)

    rollout = Rollout(rows(ro.input_ids, pad_id, True), rows(ro.attention_mask, 0, True), rows(ro.action_mask),
                      rows(ro.scores), rows(ro.sampler_logprobs))
    return Experience(rollout, rows(exp.old_logprobs), rows(exp.ref_logprobs), rows(exp.old_values),
                      rows(exp.rewards), rows(exp.kl), rows(exp.advantages), rows(exp.returns))


def ppo_learner(model, runtime: Runtime, cfg: PPOConfig, lr: float) -> Learner:
    """The actor's (``lr`` = ppo.actor_lr) or the critic's (ppo.critic_lr) Learner: a constant rate, ``ppo.betas``,
    ``ppo.weight_decay``, clipped to ``ppo.grad_clip``."""
    optim = OptimConfig(lr=lr, betas=list(cfg.betas), weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    return Learner(model, runtime, optim)


def ppo_update(actor: Learner, critic: Learner, exp: Experience, cfg: PPOConfig, generator: torch.Generator,
               ptx_batches: Callable[[], object] | None = None, train_actor: bool = True) -> dict[str, torch.Tensor]:
    """The PPO epochs over ``exp``'s mini-batches (module docstring). Returns the per-update means of the losses
    and statistics as device tensors.

    Data parallel (``exp`` holds the whole batch on every rank): each mini-batch's rows are split over the
    data-parallel ranks; each rank's losses are its share of the mini-batch's token means (the sums over its rows
    divided by the whole mini-batch's action tokens, and 1/dp of the pretraining term, whose batch every rank
    draws alike) with n = 1/dp, so the Learner's sum over the ranks is the 1-process loss and gradient."""
    rollout = exp.rollout
    B = rollout.input_ids.shape[0]
    if cfg.mini_batches > B:
        raise ValueError(f"ppo.mini_batches ({cfg.mini_batches}) exceeds the rollout batch ({B})")
    device = rollout.input_ids.device
    dims = actor.parallel.dims
    dp, share = dims.dp, 1.0 / dims.dp
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, value: torch.Tensor) -> None:
        sums[name] = sums.get(name, torch.zeros((), device=device)) + value.detach().float()

    updates = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator).to(device)
        for index in order.tensor_split(cfg.mini_batches):
            if len(index) < dp:
                raise ValueError(f"ppo.mini_batches: a mini-batch of {len(index)} rows cannot be split over {dp} "
                                 "data-parallel ranks (rollout.prompts_per_iteration / ppo.mini_batches >= ranks)")
            tokens = rollout.action_mask[index].float().sum().clamp_min(1.0)   # the whole mini-batch's actions
            index = index.tensor_split(dp)[dims.dp_rank]                       # this rank's rows of it
            mb = rollout.rows(index)
            ratio_max = []

            def actor_loss(model, mb: Rollout, index=index, tokens=tokens, ratio_max=ratio_max):
                logp = action_logprobs(model, mb.input_ids, mb.attention_mask, cfg.temperature)
                loss, stats = policy_loss(logp, exp.old_logprobs[index], exp.advantages[index], mb.action_mask,
                                          cfg.clip_eps, num_tokens=tokens)
                ratio_max.append(stats.pop("ratio_max"))     # a maximum, not a share: reduced on its own
                metrics = {"policy_loss": loss, **stats}
                if ptx_batches is not None and cfg.ptx_coef > 0:
                    batch = ptx_batches().to(device)
                    ptx = model(batch.input_ids, batch.cu_seqlens, labels=batch.labels,
                                max_seqlen=batch.max_seqlen).loss
                    metrics["ptx_loss"] = ptx * share          # x 1.0 in one process: exact
                    loss = loss + cfg.ptx_coef * metrics["ptx_loss"]
                return loss, share, metrics

            def critic_loss(model, mb: Rollout, index=index, tokens=tokens):
                values = action_values(model, mb.input_ids, mb.attention_mask)
                vloss = value_loss(values, exp.old_values[index], exp.returns[index], mb.action_mask,
                                   cfg.value_clip_eps if cfg.value_clip_eps > 0 else None, num_tokens=tokens)
                return vloss, share, {}

            if train_actor:
                out = actor.step([mb], actor_loss)
                for k, v in out.metrics.items():
                    add(k, v)
                add("ratio_max", actor.parallel.all_reduce_(ratio_max[0].detach().clone(), max=True))
                add("actor_grad_norm", out.grad_norm)
            out = critic.step([mb], critic_loss)
            add("value_loss", out.loss)
            add("critic_grad_norm", out.grad_norm)
            updates += 1
    return {k: v / updates for k, v in sums.items()}


def ppo_iteration(actor: Learner, reference, critic: Learner, rollout: Rollout, cfg: PPOConfig,
                  generator: torch.Generator, ptx_batches: Callable[[], object] | None = None,
                  train_actor: bool = True) -> dict[str, float]:
    """``make_experience`` then ``ppo_update`` (module docstring), with the statistics read to the host once.
    ``actor`` and ``critic`` are Learners (``ppo_learner``); ``rollout`` is this rank's rows. ``ptx_batches()``
    returns the next packed pretraining batch (``train.data.packing.Batch``) for the actor's language-modelling
    term; None (or ``ptx_coef`` 0) leaves it out. ``train_actor=False`` is the critic warmup: the
    actor is neither stepped nor given gradients."""
    t0 = time.perf_counter()
    exp = make_experience(actor.model, reference, critic.model, rollout, cfg, actor.parallel)
    rollout = exp.rollout                               # the whole batch (every rank's rows)
    if rollout.input_ids.device.type == "cuda":     # only for the time split of the metrics
        torch.cuda.synchronize(rollout.input_ids.device)
    t1 = time.perf_counter()
    means = ppo_update(actor, critic, exp, cfg, generator, ptx_batches, train_actor)
    out = {k: float(v) for k, v in means.items()}      # the iteration's device read
    t2 = time.perf_counter()
    mask = rollout.action_mask
    out.update(score=float(rollout.scores.mean()), kl=float(exp.kl.sum(1).mean()),
               reward=float(exp.rewards.sum(1).mean()), response_length=float(mask.float().sum(1).mean()),
               advantage_mean=float(masked_mean(exp.advantages, mask)),
               return_mean=float(masked_mean(exp.returns, mask)),
               time_logprobs_s=t1 - t0, time_train_s=t2 - t1)
    if rollout.sampler_logprobs is not None:
        gap = logprob_mismatch(rollout.sampler_logprobs, exp.old_logprobs, mask)
        out.update({f"sampler_mismatch_{k}": float(v) for k, v in gap.items()})
    return out
