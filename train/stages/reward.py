"""The conditional reward model of COOL RLHF (InternLM2 report, section 4.2).

One reward model for every preference domain: a condition system prompt names the domain (``train.data.preference``),
the score is read at the reward token appended to the end, and the loss is the focal ranking loss plus the log
barrier (``train.rlhf.reward_losses``; plain Bradley-Terry selectable).

    python -m train.stages.reward --config configs/reward_tiny.toml [--resume] [--section.key=value ...]
    torchrun --nproc_per_node 8 -m train.stages.reward --config configs/reward_7b.toml

``InternLM2ForScore`` starts from the SFT checkpoint (``reward.init_from``) with a fresh head drawn from
``run.seed``. Data: preference pairs (``train.data.preference``: jsonl or the embedded domain-flipped set), each
sequence = condition prompt + conversation + reward token; chosen and rejected of a pair sit next to each other in
one micro-batch, micro-batches filled with whole pairs up to ``stages.0.micro_batch_tokens`` (InternLM2: 16,384
tokens, max length 8192; a longer pair is dropped and counted). Evaluation before and after: held-out pair accuracy
per domain and score statistics; at the end a score histogram (``<run>/eval/reward_scores.png``). The stage ends
with an export of the score model in InternLM2's layout (``InternLM2ForScore.from_pretrained``).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch

from train.build import model_config
from train.config import CHECKPOINTING, repo_config
from train.data.items import Item, ItemBatch, ItemBatches
from train.data.preference import (
    CORRECT_OVER_WRONG,
    SYNTHETIC_DOMAINS,
    MixedPreferences,
    SyntheticPreferences,
    TaskPreferences,
    pair_item,
    read_preferences,
    reward_token_id,
)
from train.data.tokenizer import Tokenizer, load_tokenizer
from train.eval.reward import histogram_table, pair_accuracy, pair_scores, plot_score_histogram
from train.parallel import Runtime, barrier, init_runtime
from train.rlhf.policy_pairs import PolicySamplingConfig, PolicyTaskPreferences
from train.rlhf.reward_losses import (  # noqa: F401  (the losses are part of this module's API)
    bradley_terry_loss,
    focal_ranking_loss,
    log_barrier_penalty,
    reward_loss,
)
from train.stages.align_config import RewardConfig, parse_reward_cli, resolve_init, stage_geometry
from train.stages.runner import stage_main, stage_trainer
from train.trainer import Stage

DEFAULT_CONFIG = repo_config("reward_tiny.toml")


def pair_loss_fn(kind: str = "focal", gamma: float = 2.0, penalty: float = 0.02, bound: float = 5.0):
    """The Trainer's loss for packed pairs (chosen at even, rejected at odd sequences): (summed pair losses, the
    number of pairs, summed metrics: correct pairs, chosen-minus-rejected margin, |score|)."""
    def loss_fn(model: torch.nn.Module, batch: ItemBatch):
        if batch.seqs_per_item != 2:
            raise ValueError(f"a reward batch holds pairs (2 sequences per item), got {batch.seqs_per_item}")
        scores = model(batch.input_ids, batch.cu_seqlens, max_seqlen=batch.max_seqlen).scores   # (2P,) float32
        chosen, rejected = scores[0::2], scores[1::2]
        loss = reward_loss(chosen, rejected, kind, gamma, penalty, bound, reduction="sum")
        d = (chosen - rejected).detach()
        metrics = {"pair_acc": (d > 0).sum(), "margin": d.sum(),
                   "score_abs": (chosen.detach().abs() + rejected.detach().abs()).sum() / 2}
        return loss, len(batch.groups), metrics
    return loss_fn


# ---------------------------------------------------------------------------------------------------------------
# The stage: python -m train.stages.reward --config configs/reward_tiny.toml [--resume] [--section.key=value ...]


def preference_sets(cfg: RewardConfig, policy=None, tokenizer: Tokenizer | None = None):
    """(training pairs: a random-access stream or a list, held-out pairs, the evaluation group of each held-out
    pair, the evaluated groups). The groups are the domains; with ``reward.task_pairs_share`` the synthetic stream
    mixes in correct-vs-wrong pairs on the chat tasks (``TaskPreferences``, under ``reward.task_pairs_domain``),
    whose held-out pairs form one more group, ``correct>wrong``. With ``reward.task_pairs_policy_prompts`` the
    wrong replies, held-out ones included, are ``policy``'s own samples (``train.rlhf.policy_pairs``)."""
    r = cfg.reward
    seed = cfg.run.seed
    if r.pairs == "synthetic":
        flipped = SyntheticPreferences(seed, "heldout")
        held = [flipped[i] for i in range(r.heldout)]
        groups = [p.domain for p in held]
        train = SyntheticPreferences(seed, "train")
        if r.task_pairs_share == 0:
            return train, held, groups, SYNTHETIC_DOMAINS
        if r.task_pairs_policy_prompts:
            held_tasks = policy_task_pairs(cfg, policy, tokenizer, "heldout", r.task_pairs_heldout)
            train_tasks = policy_task_pairs(cfg, policy, tokenizer, "train", r.task_pairs_policy_prompts)
        else:
            held_tasks = TaskPreferences(seed, "heldout", r.task_pairs_tasks, r.task_pairs_domain)
            train_tasks = TaskPreferences(seed, "train", r.task_pairs_tasks, r.task_pairs_domain)
        held += [held_tasks[i] for i in range(r.task_pairs_heldout)]
        groups += [CORRECT_OVER_WRONG] * r.task_pairs_heldout
        train = MixedPreferences(train, train_tasks, r.task_pairs_share, seed)
        return train, held, groups, SYNTHETIC_DOMAINS + (CORRECT_OVER_WRONG,)
    pairs = read_preferences(r.pairs)
    if len(pairs) <= r.heldout:
        raise ValueError(f"reward.heldout ({r.heldout}) leaves no training pairs of {len(pairs)} in {r.pairs}")
    domains = tuple(dict.fromkeys(p.domain for p in pairs))
    return pairs[r.heldout:], pairs[:r.heldout], [p.domain for p in pairs[:r.heldout]], domains


def policy_task_pairs(cfg: RewardConfig, policy, tokenizer: Tokenizer, split: str, prompts: int):
    """``PolicyTaskPreferences`` of ``prompts`` prompts of ``split``, sampled from ``policy``."""
    r = cfg.reward
    if policy is None or tokenizer is None:
        raise ValueError("policy: reward.task_pairs_policy_prompts > 0 needs the policy model and its tokenizer")
    sampling = PolicySamplingConfig(prompts, r.task_pairs_policy_samples, r.task_pairs_temperature,
                                    r.task_pairs_top_p, r.task_pairs_max_new_tokens)
    start = time.time()
    pairs = PolicyTaskPreferences(policy, tokenizer, cfg.run.seed, split, r.task_pairs_tasks, r.task_pairs_domain,
                                  sampling)
    print(f"[reward] {split} correct-vs-wrong pairs from the policy's samples: {prompts} prompts x "
          f"{sampling.samples} replies, {pairs.wrong_share:.0%} of prompts with a wrong reply "
          f"({time.time() - start:.0f} s)", flush=True)
    return pairs


def load_policy(init_from: str, device: torch.device, dtype: torch.dtype):
    """The SFT model the reward model starts from, as a causal LM (its own samples make the wrong replies)."""
    from models import InternLM2ForCausalLM

    return InternLM2ForCausalLM.from_pretrained(init_from, dtype=dtype, device=device).eval()


def build_score_model(cfg: RewardConfig, rt: Runtime, vocab_size: int, init_from: str):
    """InternLM2ForScore: the SFT trunk with a fresh scalar head drawn from run.seed, or a seeded random init."""
    from models import InternLM2ForScore

    config = model_config(cfg.model, vocab_size, cfg.stages[0].rope_theta or None)
    if init_from:
        model = InternLM2ForScore.from_pretrained(init_from)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"reward.init_from: its vocabulary ({model.config.vocab_size}) is smaller than the "
                             f"tokenizer's ({vocab_size})")
        model.model.set_rope_theta(config.rope_theta)
        gen = torch.Generator().manual_seed(cfg.run.seed)
        with torch.no_grad():
            head = model.score_head.weight
            head.copy_(torch.randn(head.shape, generator=gen, dtype=torch.float32) * model.config.initializer_range)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            model = InternLM2ForScore(config)
    model.gradient_checkpointing = CHECKPOINTING[cfg.model.gradient_checkpointing]
    return model.to(rt.device, rt.dtype)


def reward_evaluator(items: list[Item], domains, device, batch_tokens: int):
    def evaluate(model) -> dict:
        scores = pair_scores(model, items, device, batch_tokens)
        evaluate.scores = scores
        return pair_accuracy(scores, domains)
    evaluate.scores = None
    return evaluate


@dataclass
class RewardResult:
    run_dir: str
    checkpoint: str | None
    model: torch.nn.Module
    tokenizer: Tokenizer
    finished: bool
    metrics_path: str
    init_from: str
    domains: tuple[str, ...] = ()
    data: dict = field(default_factory=dict)
    eval: dict | None = None                  # pair_accuracy() after training
    scores: dict | None = None                # held-out scores (chosen, rejected, group)
    histogram: str = ""                       # PNG of the held-out score histogram


def run_reward(cfg: RewardConfig) -> RewardResult:
    rt = init_runtime(cfg.run, cfg.parallel)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.byte_vocab_size)
    rid = reward_token_id(tokenizer)
    init_from = resolve_init(cfg.reward.init_from, "reward.init_from")
    model = build_score_model(cfg, rt, tokenizer.vocab_size, init_from)
    policy = load_policy(init_from, rt.device, rt.dtype) if cfg.reward.task_pairs_policy_prompts else None
    train_pairs, held, held_groups, domains = preference_sets(cfg, policy, tokenizer)
    del policy
    conditions = cfg.reward.conditions
    r = cfg.reward
    for d in (d for d in domains if d != CORRECT_OVER_WRONG):   # every domain needs its condition before any step
        if conditions and d not in conditions:
            raise ValueError(f"reward.conditions: no condition prompt for domain {d!r} (known: "
                             f"{', '.join(sorted(conditions))})")
    if isinstance(train_pairs, list):
        def source(i):
            return pair_item(train_pairs[i % len(train_pairs)], tokenizer, rid, conditions, domains)
    else:
        def source(i):
            return pair_item(train_pairs[i], tokenizer, rid, conditions, domains)
    seq_len, micro, accumulation = stage_geometry(cfg, rt.dims.dp, seqs_per_item=2)
    batches = ItemBatches(source, micro, seq_len, accumulation, "drop", rt.dims.dp_rank, rt.dims.dp,
                          max_seqs_per_item=2,
                          where="reward")
    held_items = [pair_item(p, tokenizer, rid, conditions, domains, g) for p, g in zip(held, held_groups)]
    held_items = [it for it in held_items if max(len(ids) for ids, _ in it.sequences) <= seq_len]
    evaluator = reward_evaluator(held_items, domains, rt.device, cfg.eval.batch_tokens)
    stage_cfg = cfg.stages[0]
    stage = Stage(stage_cfg.name, stage_cfg.steps, batches, pair_loss_fn(r.loss, r.gamma, r.penalty, r.bound),
                  evaluator=evaluator,
                  describe=f" (pairs packed up to {micro} tokens per micro-batch, {accumulation} micro-batches x "
                           f"{rt.dims.dp} data-parallel ranks, {r.loss} loss, conditions on {', '.join(conditions) or 'none'}, from "
                           f"{init_from or 'random init'})")
    trainer = stage_trainer(cfg, rt, model, tokenizer, total_steps=stage_cfg.steps,
                            signature=["reward", stage_cfg.name, stage_cfg.steps, seq_len],
                            export_layout="internlm2")    # a score model has no transformers Llama class
    start_step = trainer.state.global_step        # > 0 when resumed
    finished = trainer.train(stage)
    trained = trainer.state.global_step > start_step
    trainer.close()
    result = RewardResult(cfg.run_dir, trainer.latest, model, tokenizer, finished, trainer.metrics_path, init_from,
                          domains, batches.state_dict())
    if finished and evaluator.scores is None:     # a resumed finished run: evaluate for the report (on every
        model.eval()                              # rank: a tensor-parallel or FSDP forward is collective)
        evaluator(model)
    if rt.is_main and finished:
        if trained:                               # once per run (a resumed finished run trains nothing)
            trainer.log.write({"kind": "data", "step": trainer.state.global_step, "stage": stage_cfg.name,
                               **result.data})
        result.scores = evaluator.scores
        result.eval = pair_accuracy(evaluator.scores, domains)
        result.histogram = plot_score_histogram(evaluator.scores, domains,
                                                os.path.join(cfg.run_dir, "eval", "reward_scores.png"), r.bound)
    barrier(rt.dims)
    return result


def _report(cfg: RewardConfig, result: RewardResult) -> None:
    if result.finished and result.scores is not None:
        print(histogram_table(result.scores, result.domains))
    state = "finished" if result.finished else f"stopped at step {cfg.run.stop_at_step} (continue with --resume)"
    print(f"[reward] {state}; checkpoint {result.checkpoint}; held-out {result.eval}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, lambda args: parse_reward_cli(args, DEFAULT_CONFIG), run_reward, _report)


if __name__ == "__main__":
    sys.exit(main())
