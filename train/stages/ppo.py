"""COOL RLHF's PPO stage (InternLM2): online PPO in rounds, with the reward model refreshed between rounds.

    python -m train.stages.ppo --config configs/ppo_tiny.toml              # models.actor = SFT dir, models.reward = RM dir
    python -m train.stages.ppo --config configs/ppo_tiny.toml --resume     # continue after the last finished round
    torchrun --nproc_per_node 8 -m train.stages.ppo --config configs/ppo_tiny.toml --parallel.mode=fsdp
    torchrun --nproc_per_node 8 -m train.stages.ppo --config configs/ppo_tiny.toml --parallel.mode=fsdp --parallel.tp=2

Models: actor and reference from the SFT checkpoint; reward model and critic from the RM checkpoint (the critic is
the reward model's copy, then warmed up with the actor frozen). The reference and the reward model only run
forward, under inference mode (bf16 on a GPU). The algorithms are in ``train.rlhf`` (``gae`` is public here).

The run:
    [demo only] make the first reward model hackable: fine-tune it to prefer the SFT policy's own wrong replies
        (online.hackable_rm_prompts; mislabelled comparisons)
    critic <- copy of the reward model; evaluate the SFT model; SFT replies to the comparison prompts
    critic warmup: online.critic_warmup_iterations PPO iterations that step only the critic
    for each round:
        [online.restart_after_hack = last_clean, the previous round flagged] the actor (and its optimizer) restart
            from the last round the fast path did not flag (the SFT model when none)
        [after a refresh] online.critic_rewarmup_iterations critic-only iterations against the refreshed RM
        online.iterations_per_round PPO iterations (rollouts -> train.rlhf.iteration.ppo_iteration)
        evaluate on held-out prompts: greedy task accuracy, mean reward, KL to the reference
        fast path: hacking rules on the round's late replies (comparison prompts + late rollouts) vs the SFT
                   replies -> targeted pairs (rejected: a hacked reply; chosen: a correct reply, and an earlier
                   reply to the same prompt without the pattern)
        slow path: labelled comparisons (a jsonl file; the checkers on SFT / early / late replies, and every
                   wrong late rollout against the reference answer)
        refresh the reward model on all online pairs so far + a replay of its own training pairs (not after the
        last round); its held-out accuracy, and its scores of the round's and SFT's held-out replies
        checkpoint the round (actor, critic, reward model, optimizers, the online state) atomically
Every random draw is seeded from (run.seed, what, iteration), so a run resumed at a round boundary repeats exactly
what the uninterrupted run does.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field

import torch

from models import InternLM2ForCausalLM
from models.internlm2 import InternLM2ForScore
from train.checkpoint import read_state_dir, write_state_dir
from train.config import repo_config
from train.data.corpus import SyntheticCorpus
from train.data.packing import PackedStream, collate
from train.data.preference import reward_token_id
from train.data.tokenizer import load_tokenizer, save_hf_tokenizer
from train.learner import Learner
from train.parallel import init_runtime, parallelize
from train.rlhf.advantages import gae
from train.rlhf.hacking import (
    Sample,
    answer_pairs,
    detect_hacking,
    label_comparisons,
    load_comparisons,
    targeted_pairs,
    write_pairs,
)
from train.rlhf.iteration import action_logprobs, ppo_iteration, ppo_learner
from train.rlhf.probe_pairs import mislabelled_pairs, preference_pairs, probe_pairs, task_pairs
from train.rlhf.release import released_round
from train.rlhf.reward_refresh import pair_accuracy, refresh_reward_model, reward_learner
from train.rlhf.rollouts import Generated, Sampler, SyntheticPrompts, generate_and_score, reward_ids, score
from train.stages.ppo_config import PPOStageConfig, model_dir, parse_ppo_cli
from train.stages.runner import stage_main

__all__ = ["gae", "run_ppo", "PPOResult"]

DEFAULT_CONFIG = repo_config("ppo_tiny.toml")


def seed_of(cfg: PPOStageConfig, what: str, index: int = 0) -> int:
    """A seed per (run seed, purpose, index): resumption needs no generator state."""
    return zlib.crc32(f"{cfg.run.seed}:{what}:{index}".encode())


@dataclass
class OnlineState:
    """What a round boundary carries besides the models and optimizers (state.json of a round checkpoint)."""
    rounds_done: int = 0
    iterations_done: int = 0
    # [mean reward, accuracy, SFT's mean reward under the same RM] per evaluation, SFT first
    history: list[list[float]] = field(default_factory=list)
    online_pairs: list[dict] = field(default_factory=list)     # fast + slow path pairs so far (replayed at refresh)
    sft_samples: list[dict] = field(default_factory=list)      # SFT replies to the comparison prompts
    ptx: dict = field(default_factory=dict)                    # pretraining stream position
    evals: list[dict] = field(default_factory=list)            # per evaluation: SFT, then each round
    episodes: list[dict] = field(default_factory=list)         # hacking findings per round
    restarts: list[dict] = field(default_factory=list)         # rounds started from an earlier round's policy


@dataclass
class PPOResult:
    run_dir: str
    state: OnlineState
    actor: torch.nn.Module
    critic: torch.nn.Module
    reward_model: torch.nn.Module
    finished: bool


class Stage:
    """The models, data and helpers of one PPO run."""

    def __init__(self, cfg: PPOStageConfig):
        self.cfg = cfg
        self.runtime = init_runtime(cfg.run, cfg.parallel)
        self.device, self.dtype, self.dims = self.runtime.device, self.runtime.dtype, self.runtime.dims
        self.is_main = self.runtime.is_main
        if cfg.rollout.prompts_per_iteration % self.dims.dp:
            raise ValueError(f"rollout.prompts_per_iteration ({cfg.rollout.prompts_per_iteration}) must be a multiple "
                             f"of the data-parallel ranks ({self.dims.dp}): each rank samples an equal share")
        self.tokenizer = load_tokenizer(cfg.models.tokenizer, cfg.models.byte_vocab_size)
        self.reward_id = reward_token_id(self.tokenizer)
        self.stop_ids = (self.tokenizer.special_ids["<|im_end|>"], self.tokenizer.eos_id)
        self.conditions = dict(cfg.conditions)
        r = cfg.rollout
        self.train_prompts = SyntheticPrompts(cfg.run.seed, "ppo_train", r.tasks, r.domain)
        self.heldout = SyntheticPrompts(cfg.run.seed, "ppo_heldout", r.tasks, r.domain).take(0, r.heldout_prompts)
        self.validation = SyntheticPrompts(cfg.run.seed, "ppo_validation", r.tasks, r.domain).take(
            0, r.validation_prompts)
        self.comparison = SyntheticPrompts(cfg.run.seed, "ppo_compare", r.tasks, r.domain).take(0, r.comparison_prompts)
        n = cfg.online.rm_heldout_pairs
        self.rm_probe = probe_pairs(self.heldout[:n], cfg.run.seed)
        domains = {d for d in ("concise", "helpful") if d in self.conditions}
        self.rm_probe += [p for p in preference_pairs(cfg.run.seed, 2 * n) if p["domain"] in domains]
        # A refresh retrains on the new pairs plus a replay of the conditional RM's own (train split) pairs, so the
        # domains it was trained on are not forgotten.
        self.rm_replay = [p for p in preference_pairs(cfg.run.seed, cfg.reward_refresh.replay_pairs, "train")
                          if p["domain"] in domains]
        # ... and of its correct-vs-wrong pairs on the PPO tasks, so a refresh keeps it checking answers.
        self.rm_replay += task_pairs(cfg.run.seed, r.tasks, r.domain, cfg.reward_refresh.replay_task_pairs)
        self.sampler: Sampler | None = None
        self.ptx_stream = PackedStream(SyntheticCorpus(seed=cfg.run.seed, split="train"), self.tokenizer,
                                       cfg.ptx.seq_len)

    # models --------------------------------------------------------------------------------------------------
    def load(self, actor_dir: str, critic_dir: str, reward_dir: str):
        dev, dt = self.device, self.dtype
        actor = InternLM2ForCausalLM.from_pretrained(actor_dir, dtype=dt, device=dev)
        reference = InternLM2ForCausalLM.from_pretrained(model_dir(self.cfg.models.actor), dtype=dt,
                                                         device=dev).eval()
        reference.requires_grad_(False)
        if self.dims.distributed and (self.cfg.parallel.mode == "fsdp" or self.dims.tp > 1):
            # sharded like the trained models (tp > 1: tensor parallel in every mode); forward only (no optimizer)
            parallelize(reference, self.runtime)
        critic = InternLM2ForScore.from_pretrained(critic_dir, dtype=dt, device=dev)
        reward_model = InternLM2ForScore.from_pretrained(reward_dir, dtype=dt, device=dev).eval()
        return actor, reference, critic, reward_model

    def reward_learner(self, reward_model) -> Learner:
        return reward_learner(reward_model, self.runtime, self.cfg.reward_refresh)

    def learners(self, actor, critic) -> tuple[Learner, Learner]:
        """The actor's and the critic's Learners (train.rlhf.iteration.ppo_learner)."""
        p = self.cfg.ppo
        return ppo_learner(actor, self.runtime, p, p.actor_lr), ppo_learner(critic, self.runtime, p, p.critic_lr)

    def next_ptx(self):
        return collate([self.ptx_stream.next_row() for _ in range(self.cfg.ptx.rows)])

    # rollouts and evaluation ---------------------------------------------------------------------------------
    def generate(self, actor, reward_model, prompts, batch: tuple[str, int] | None, first: int = 0,
                 share: bool = False) -> Generated:
        """Replies of the plain ``actor`` (one rank alone runs it), scored by ``reward_model``, all prompts decoded
        together. ``batch`` None: greedy; else the batch's key (purpose, index): ``prompts`` are its prompts
        ``first``, ``first + 1``, ..., and prompt i samples from its own generator seeded from (run seed, batch,
        i), so its reply does not depend on which prompts share its call or rank. ``share``: ``prompts`` are this
        rank's share of a batch (the others score other replies, so the ranks agree on the number of scoring
        chunks)."""
        gen = None if batch is None else [
            torch.Generator(device=self.device).manual_seed(seed_of(self.cfg, f"{batch[0]}:{batch[1]}", first + i))
            for i in range(len(prompts))]
        # no_grad, not inference_mode: the sampled tokens and the scores feed the PPO update's autograd graph, and
        # inference tensors cannot be saved for backward (the library's ops themselves run under inference_mode).
        with torch.no_grad():
            if self.sampler is None or self.sampler.actor is not actor:
                r = self.cfg.rollout
                self.sampler = Sampler(actor, min(64, max(r.prompts_per_iteration, r.heldout_prompts,
                                                          r.comparison_prompts)))
            return generate_and_score(self.sampler, reward_model, self.tokenizer, prompts,
                                      max_new_tokens=self.cfg.rollout.max_new_tokens,
                                      temperature=0.0 if batch is None else self.cfg.ppo.temperature,
                                      top_p=self.cfg.rollout.top_p, stop_ids=self.stop_ids,
                                      conditions=self.conditions, reward_id=self.reward_id, generators=gen,
                                      device=self.device, agree=self._most if share and self.dims.dp > 1 else None)

    def _most(self, count: int) -> int:
        """The largest ``count`` over the ranks."""
        t = torch.tensor(count, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t)

    def evaluate(self, actor: Learner, reference, reward_model, name: str, index: int) -> dict:
        """Held-out prompts: greedy accuracy, mean reward and length; KL to the reference on sampled replies (the
        batch ("eval", index)); greedy accuracy on the validation prompts when set. Every rank evaluates the whole
        set (the replies from the actor's plain copy)."""
        plain = actor.plain_model()
        greedy = self.generate(plain, reward_model, self.heldout, None)
        sampled = self.generate(plain, reward_model, self.heldout, ("eval", index))
        ro = sampled.rollout(self.tokenizer.pad_id, self.device)
        with torch.no_grad():
            kl = ((action_logprobs(actor.model, ro.input_ids, ro.attention_mask, self.cfg.ppo.temperature)
                   - action_logprobs(reference, ro.input_ids, ro.attention_mask, self.cfg.ppo.temperature))
                  * ro.action_mask).sum(1).mean()
        by_task: dict[str, list[bool]] = {}
        for p, c in zip(greedy.prompts, greedy.correct):
            by_task.setdefault(p.task, []).append(bool(c))
        out = {}
        if self.validation:   # the release choice's figure (train.rlhf.release), never the reported one
            out["validation_accuracy"] = self.generate(plain, reward_model, self.validation, None).accuracy()
        return out | {"name": name, "accuracy": greedy.accuracy(), "reward": float(greedy.scores.mean()),
                "replies": greedy.texts,
                "length": sum(map(len, greedy.responses)) / len(greedy.responses),
                "sampled_accuracy": sampled.accuracy(), "sampled_reward": float(sampled.scores.mean()),
                "sampled_length": sum(map(len, sampled.responses)) / len(sampled.responses), "kl": float(kl),
                "accuracy_by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())},
                "example": {"prompt": greedy.prompts[0].message_dicts()[-1]["content"], "reply": greedy.texts[0]}}

    def heldout_reward(self, reward_model, replies: list[str]) -> float:
        """Mean score of ``replies`` to the held-out prompts (e.g. an earlier evaluation's, under a refreshed RM)."""
        seqs = [reward_ids(self.tokenizer, p, t, self.conditions, self.reward_id) for p, t in zip(self.heldout, replies)]
        return float(score(reward_model, seqs, self.device).mean())

    def gather(self, share: Generated, group=None) -> Generated:
        """Every data-parallel rank's share of one batch, in rank order (the whole batch, as one process has it);
        ``group``: the data-parallel ranks of this rank's tensor-parallel position (None: the world, tp = 1)."""
        if self.dims.dp == 1:
            return share
        parts = [None] * self.dims.dp
        cpu = dataclasses.replace(share, scores=share.scores.cpu())
        torch.distributed.all_gather_object(parts, cpu, group=group)
        whole = Generated.concat(parts)
        return dataclasses.replace(whole, scores=whole.scores.to(self.device))

    def rm_accuracy(self, reward_model) -> dict[str, float]:
        return pair_accuracy(reward_model, self.rm_probe, self.tokenizer, self.conditions, self.reward_id, self.device)

    def refresh(self, reward: Learner, pairs: list[dict], seed: int, steps: int = 0) -> list[float]:
        """Fine-tune the reward model on ``pairs`` (``reward_refresh``; ``steps`` > 0 overrides its step count)."""
        cfg = self.cfg.reward_refresh
        return refresh_reward_model(reward, pairs, self.tokenizer, self.conditions, self.reward_id,
                                    dataclasses.replace(cfg, steps=steps or cfg.steps), seed)


# --------------------------------------------------------------------------------------------------------------
# Round checkpoints: rounds/round_NN/ written by train.checkpoint.write_state_dir, the writer of every stage:
#     state/          torch.distributed.checkpoint of {"actor": {model, optimizer}, "critic": {model, optimizer},
#                     "reward": {model}}: each rank writes its part, any number of ranks reads it back
#     state.json      the OnlineState (rank 0)
#     actor/ critic/ reward/   HF-layout exports (InternLM2 layout), for reading and later stages; never read to resume
_ROUND = re.compile(r"^round_\d{2}$")


def round_dir(run_dir: str, rounds_done: int) -> str:
    return os.path.join(run_dir, "rounds", f"round_{rounds_done:02d}")


def latest_round(run_dir: str) -> str | None:
    root = os.path.join(run_dir, "rounds")
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root) if _ROUND.match(d))
    return os.path.join(root, done[-1]) if done else None


def _round_state(actor: Learner, critic: Learner, reward: Learner) -> dict:
    return {"actor": actor.state_dict(), "critic": critic.state_dict(), "reward": reward.state_dict(optimizer=False)}


def save_round(run_dir: str, state: OnlineState, actor: Learner, critic: Learner, reward: Learner,
               tokenizer=None) -> str:
    """Every rank calls it; atomic (a save killed midway leaves the previous round loadable). With ``tokenizer`` the
    actor's export also gets the transformers tokenizer files (``save_hf_tokenizer``), so it serves and evaluates
    as it is."""
    final = round_dir(run_dir, state.rounds_done)

    def exports(tmp: str) -> None:
        for name, learner in (("actor", actor), ("critic", critic), ("reward", reward)):
            learner.parallel.export(os.path.join(tmp, name), "internlm2")

    def write_main(tmp: str) -> None:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dataclasses.asdict(state), f)
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, os.path.join(tmp, "actor"))

    write_state_dir(final, actor.runtime.dims, lambda: _round_state(actor, critic, reward), write_main, exports)
    return final


def publish_released(run_dir: str, round_no: int) -> None:
    """``run_dir/released`` -> ``rounds/round_NN`` (a relative link, swapped in atomically: a reader sees the old
    target or the new one): the policy ``train.rlhf.release`` chose, what `make serve` serves. Round 0 (every round
    flagged: SFT is released) removes the link."""
    link = os.path.join(run_dir, "released")
    if round_no < 1:
        if os.path.islink(link):
            os.remove(link)
        return
    tmp = f"{link}.tmp-{os.getpid()}"
    os.symlink(os.path.relpath(round_dir(run_dir, round_no), run_dir), tmp)
    os.replace(tmp, link)


def load_round(path: str, actor: Learner, critic: Learner | None = None, reward: Learner | None = None) -> None:
    """Restore the given Learners (models, and the actor's and critic's optimizers) from round checkpoint
    ``path``, saved on any number of ranks."""
    learners = {k: v for k, v in (("actor", actor), ("critic", critic), ("reward", reward)) if v is not None}
    state = {k: v.state_dict(optimizer=k != "reward") for k, v in learners.items()}
    read_state_dir(path, state)
    for k, learner in learners.items():
        learner.load_state_dict(state[k])


def load_state(path: str) -> OnlineState:
    with open(os.path.join(path, "state.json")) as f:
        return OnlineState(**json.load(f))


def _samples(gen: Generated) -> list[dict]:
    return [dataclasses.asdict(s) for s in gen.samples()]


class MetricsFile:
    """metrics.jsonl: one record per PPO iteration / evaluation / refresh. On resume, records after the round
    boundary being resumed are dropped, so the file reads as one uninterrupted run."""

    def __init__(self, path: str, keep_rounds_upto: int | None, enabled: bool = True):
        """``enabled``: False on every rank but the first (which alone writes)."""
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if keep_rounds_upto is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line).get("round", 0) <= keep_rounds_upto]
        with open(path, "w") as f:
            f.writelines(kept)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------------------------


def run_ppo(cfg: PPOStageConfig) -> PPOResult:
    stage = Stage(cfg)
    run_dir, main = cfg.run_dir, stage.is_main
    if main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "ppo_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    say = print if main else (lambda *args, **kwargs: None)
    resume_from = latest_round(run_dir) if cfg.resume else None
    if resume_from:
        state = load_state(resume_from)
        rm_dir = model_dir(cfg.models.reward)
        actor, reference, critic, reward_model = stage.load(model_dir(cfg.models.actor), rm_dir, rm_dir)
        reward = stage.reward_learner(reward_model)
        actor_l, critic_l = stage.learners(actor, critic)
        load_round(resume_from, actor_l, critic_l, reward)
        stage.ptx_stream.load_state_dict(state.ptx)
        log = MetricsFile(os.path.join(run_dir, "metrics.jsonl"), state.rounds_done, main)
        say(f"[ppo] resumed after round {state.rounds_done} from {resume_from}")
    else:
        state = OnlineState()
        log = MetricsFile(os.path.join(run_dir, "metrics.jsonl"), -1, main)
        sft_dir, rm_dir = model_dir(cfg.models.actor), model_dir(cfg.models.reward)
        actor, reference, critic, reward_model = stage.load(sft_dir, rm_dir, rm_dir)
        reward = stage.reward_learner(reward_model)
        if cfg.online.hackable_rm_prompts:
            prompts = stage.train_prompts.take(10**6, cfg.online.hackable_rm_prompts)
            pairs = mislabelled_pairs([stage.generate(actor, reward_model, prompts, ("hackable", k))
                                       for k in range(cfg.online.hackable_rm_samples)])
            if pairs:   # an SFT policy that samples no wrong reply leaves nothing to mislabel
                losses = stage.refresh(reward, pairs, seed_of(cfg, "hackable_rm"), cfg.online.hackable_rm_steps)
                log.write({"kind": "rm_refresh", "round": 0, "source": "hackable", "pairs": len(pairs),
                           "loss_first": losses[0], "loss_last": losses[-1]})
        critic.load_state_dict(reward.plain_model().state_dict())   # the critic starts as the (first) reward model
        actor_l, critic_l = stage.learners(actor, critic)
        sft = stage.generate(actor_l.plain_model(), reward_model, stage.comparison, ("compare", 0))
        state.sft_samples = _samples(sft)
        ev = stage.evaluate(actor_l, reference, reward_model, "sft", 0)
        ev["rm_accuracy"] = stage.rm_accuracy(reward_model)
        state.evals.append(ev)
        state.history.append([ev["reward"], ev["accuracy"], ev["reward"]])   # SFT's replies are its replies
        log.write({"kind": "eval", "round": 0, **ev})
        for w in range(cfg.online.critic_warmup_iterations):
            stats, _ = _iteration(stage, cfg, actor_l, reference, critic_l, reward_model,
                                  ("warmup", w), train_actor=False)
            log.write({"kind": "critic_warmup", "round": 0, "iteration": w, **stats})

    sft_samples = [Sample(**s) for s in state.sft_samples]
    finished = True
    for r in range(state.rounds_done, cfg.online.rounds):
        round_no = r + 1
        if state.episodes and state.episodes[-1]["findings"] and cfg.online.restart_after_hack == "last_clean":
            _restart_actor(stage, cfg, state, actor_l, reference, round_no)
            log.write({"kind": "restart", "round": round_no, **state.restarts[-1]})
            say(f"[ppo] round {round_no} starts from the policy of {state.restarts[-1]['from']} (the last round "
                  "the fast path did not flag)", flush=True)
        if state.evals and "rm_accuracy_after_refresh" in state.evals[-1]:
            # The values were fitted to the previous reward model: refit them to the refreshed one, actor frozen.
            for w in range(cfg.online.critic_rewarmup_iterations):
                index = cfg.online.critic_warmup_iterations + r * cfg.online.critic_rewarmup_iterations + w
                stats, _ = _iteration(stage, cfg, actor_l, reference, critic_l, reward_model,
                                      ("warmup", index), train_actor=False)
                log.write({"kind": "critic_warmup", "round": round_no, "iteration": index, **stats})
        early = None
        late_rollouts: list[Generated] = []       # the second half of the round's rollouts: more hacked replies
        for it in range(cfg.online.iterations_per_round):
            t0 = time.perf_counter()
            stats, gen = _iteration(stage, cfg, actor_l, reference, critic_l, reward_model,
                                    ("ppo", state.iterations_done))
            if 2 * it >= cfg.online.iterations_per_round - 1:
                late_rollouts.append(gen)
            state.iterations_done += 1
            log.write({"kind": "ppo", "round": round_no, "iteration": state.iterations_done,
                       "time_s": time.perf_counter() - t0, **stats})
            if cfg.metrics.progress:
                say(f"[ppo] round {round_no} iteration {it + 1}/{cfg.online.iterations_per_round}: "
                      f"score {stats['score']:+.3f} kl {stats['kl']:.3f} accuracy {stats['accuracy']:.2f} "
                      f"length {stats['response_length']:.1f}", flush=True)
            if it == 0:
                early = stage.generate(actor_l.plain_model(), reward_model, stage.comparison, ("compare", 2 * r + 1))
        late = stage.generate(actor_l.plain_model(), reward_model, stage.comparison, ("compare", 2 * r + 2))
        ev = stage.evaluate(actor_l, reference, reward_model, f"round {round_no}", round_no)
        ev["rm_accuracy"] = stage.rm_accuracy(reward_model)
        ev["sft_reward"] = stage.heldout_reward(reward_model, state.evals[0]["replies"])   # SFT's, same RM
        state.history.append([ev["reward"], ev["accuracy"], ev["sft_reward"]])
        late_samples = late.samples()
        # The rules compare the round's late replies (the comparison prompts and the late rollouts) with SFT's;
        # each offending reply becomes a rejected response, the prompt's shortest correct reply the chosen one.
        rollout_samples = [s for g in late_rollouts for s in g.samples()]
        pool = late_samples + rollout_samples
        references = {p.prompt_id: p.answer for g in [late, *late_rollouts] for p in g.prompts}
        findings = detect_hacking(pool, sft_samples, [tuple(h) for h in state.history], cfg.hacking) \
            if cfg.online.fast_path else []
        # Chosen replies come from before the hack: SFT's and the round's early replies (to the comparison prompts).
        fast = targeted_pairs(findings, pool, sft_samples + early.samples(), references, cfg.hacking)
        slow = []
        if cfg.online.slow_path:
            if cfg.online.label_with_checkers:
                slow += label_comparisons({"sft": sft_samples, "early_ppo": early.samples(), "late_ppo": late_samples})
                slow += answer_pairs(rollout_samples, references, "late_rollouts")
            if cfg.online.comparisons_file and r == 0:
                slow += load_comparisons(cfg.online.comparisons_file)
        state.episodes.append({"round": round_no, "findings": [dataclasses.asdict(f) for f in findings],
                               "fast_pairs": len(fast), "slow_pairs": len(slow),
                               "examples": [pool[i].response for f in findings for i in f.sample_indices[:2]]})
        if main:
            write_pairs(fast + slow, os.path.join(run_dir, f"online_pairs_round_{round_no}.jsonl"))
        if round_no < cfg.online.rounds and (fast or slow or state.online_pairs):
            state.online_pairs += fast + slow
            losses = stage.refresh(reward, state.online_pairs + stage.rm_replay,
                                   seed_of(cfg, "refresh", round_no))
            ev["rm_accuracy_after_refresh"] = stage.rm_accuracy(reward_model)
            # Does the refreshed RM still pay for this round's replies? Both rescored with it.
            ev["reward_under_refreshed_rm"] = {"this round": stage.heldout_reward(reward_model, ev["replies"]),
                                               "sft": stage.heldout_reward(reward_model, state.evals[0]["replies"])}
            log.write({"kind": "rm_refresh", "round": round_no, "pairs": len(state.online_pairs),
                       "fast_pairs": len(fast), "slow_pairs": len(slow), "loss_first": losses[0],
                       "loss_last": losses[-1]})
        state.evals.append(ev)
        log.write({"kind": "eval", "round": round_no, **ev})
        state.rounds_done = round_no
        state.ptx = stage.ptx_stream.state_dict()
        path = save_round(run_dir, state, actor_l, critic_l, reward, stage.tokenizer)
        say(f"[ppo] round {round_no}: accuracy {ev['accuracy']:.2f} reward {ev['reward']:+.3f} kl {ev['kl']:.3f}; "
              f"findings {[f.pattern for f in findings]}, {len(fast)} fast + {len(slow)} slow pairs; {path}",
              flush=True)
        if cfg.run.stop_after_round and round_no >= cfg.run.stop_after_round and round_no < cfg.online.rounds:
            finished = False
            break
    if finished and main:
        publish_released(run_dir, released_round(state.evals, state.episodes))
    return PPOResult(run_dir, state, actor, critic, reward_model, finished)


def _restart_actor(stage: Stage, cfg: PPOStageConfig, state: OnlineState, actor: Learner, reference,
                   round_no: int) -> None:
    """Load, in place, the policy of the last round the fast path did not flag (the SFT model, i.e. the reference,
    when every round so far was flagged) with the actor optimizer's state of that round (a fresh one from SFT).
    Recorded in ``state.restarts``."""
    clean = max((ep["round"] for ep in state.episodes if not ep["findings"]), default=0)
    if clean == 0:
        actor.load_weights(reference.state_dict())
        actor.reset_optimizer()
    else:
        load_round(round_dir(cfg.run_dir, clean), actor)
    state.restarts.append({"round": round_no, "from": f"round {clean}" if clean else "sft"})


def _iteration(stage: Stage, cfg: PPOStageConfig, actor: Learner, reference, critic: Learner, reward_model,
               key: tuple[str, int], train_actor: bool = True) -> tuple[dict, Generated]:
    """One rollout batch and one PPO iteration on it (``key`` names the batch: its prompts and seeds); returns the
    iteration's statistics and the batch (every rank's share).

    Each data-parallel rank samples its share of the batch's prompts (rank r: the r-th of dp equal slices) from the
    actor's plain copy, all of its share decoded together, each prompt from its own generator seeded from (run
    seed, batch, prompt index) (``Stage.generate``), so the replies are those one process samples; the PPO
    iteration gathers the experience over the ranks."""
    what, index = key
    n = cfg.rollout.prompts_per_iteration
    start = index * n if what == "ppo" else 10**7 + index * n      # warmup prompts come from their own range
    share = n // stage.dims.dp
    first = stage.dims.dp_rank * share                              # this rank's prompts: first .. first + share
    t0 = time.perf_counter()
    mine = stage.generate(actor.plain_model(), reward_model, stage.train_prompts.take(start + first, share), key,
                          first, share=True)
    t_generation = time.perf_counter() - t0
    ro = mine.rollout(stage.tokenizer.pad_id, stage.device, cfg.ppo.checker_weight)
    gen = stage.gather(mine, actor.parallel.dp_group)
    perm = torch.Generator().manual_seed(seed_of(cfg, f"{what}_minibatches", index))
    ptx = stage.next_ptx if cfg.ptx.rows and cfg.ppo.ptx_coef > 0 else None
    stats = ppo_iteration(actor, reference, critic, ro, cfg.ppo, perm, ptx, train_actor=train_actor)
    stats["accuracy"] = gen.accuracy()
    stats["rm_score"] = float(gen.scores.mean())    # the reward model's alone ("score": PPO's, + the checker's term)
    stats["time_generation_s"] = t_generation       # sampling and the reward model's scoring
    return stats, gen


def _report(cfg: PPOStageConfig, result: PPOResult) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if not result.finished:
        print(f"[ppo] stopped after round {result.state.rounds_done}; continue with --resume")
        return
    from train.eval.ppo_report import write_ppo_report

    path = write_ppo_report(result, cfg.metrics.plots)
    with open(path) as f:
        print(f.read())
    print(f"[ppo] report: {path}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, lambda args: parse_ppo_cli(args, default_config=DEFAULT_CONFIG), run_ppo, _report)


if __name__ == "__main__":
    sys.exit(main())
