"""The PPO stage's configuration (``configs/ppo_*.toml``): dataclasses loaded with the trainer's TOML machinery
(unknown keys and wrong types raise ``ConfigError`` naming the key), ``--section.key=value`` overrides."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from train.checkpoint import latest_checkpoint
from train.config import ConfigError, ParallelConfig, _build, apply_override, check_parallel, parse_args, read_toml
from train.data.chat import SYNTHETIC_CHAT_TASKS
from train.rlhf.hacking import HackingConfig
from train.rlhf.iteration import PPOConfig
from train.rlhf.reward_refresh import RewardRefreshConfig


@dataclass
class PPORunConfig:
    name: str = "ppo"
    output_dir: str = "runs"           # the run writes to output_dir/name
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    threads: int = 0                   # torch CPU threads; 0 = torch's default
    stop_after_round: int = 0          # end after this round (its checkpoint written); --resume continues


@dataclass
class PPOModelsConfig:
    actor: str = ""                    # the SFT model: actor and reference start from it
    reward: str = ""                   # the reward model: reward model and critic
    # Each: an HF-layout model directory, or a stage's run directory (its newest checkpoint's model/ export).
    tokenizer: str = "byte"            # byte | path to a SentencePiece tokenizer.model
    byte_vocab_size: int = 272


@dataclass
class RolloutConfig:
    """The prompts and their sampling. Every prompt samples from its own generator, seeded from (run seed, batch,
    prompt index), all prompts of a call decoded together (``Stage.generate``): a reply does not depend on its batch
    or on the number of data-parallel ranks."""
    prompts_per_iteration: int = 16
    max_new_tokens: int = 64
    top_p: float = 0.9                 # InternLM2's PPO sampling (the temperature is ppo.temperature)
    tasks: list[str] = field(default_factory=lambda: list(SYNTHETIC_CHAT_TASKS))   # train.data.chat synthetic tasks
    domain: str = "helpful"            # the reward model's condition for the PPO prompts
    heldout_prompts: int = 32          # evaluation prompts (greedy accuracy, mean reward, KL)
    validation_prompts: int = 0        # another split, greedy accuracy per round: the released round is the best
                                       # unflagged one on it (train.rlhf.release); 0: the last round is released
    comparison_prompts: int = 16       # prompts answered by SFT / early / late PPO (slow path, hacking baseline)


@dataclass
class PtxConfig:
    rows: int = 1                      # packed pretraining rows per actor mini-batch (the 0.5-weighted LM loss)
    seq_len: int = 256


@dataclass
class OnlineConfig:
    rounds: int = 3
    iterations_per_round: int = 10
    critic_warmup_iterations: int = 50  # before round 1, actor frozen (InternLM2: 50)
    fast_path: bool = True
    slow_path: bool = True
    comparisons_file: str = ""         # slow path: labelled comparisons (jsonl), added at the first refresh
    label_with_checkers: bool = True   # slow path: compare SFT / early / late PPO replies with the task checkers
    hackable_rm_prompts: int = 0       # demo: sample the SFT policy on this many train prompts and fine-tune the
                                       # first RM to prefer its wrong replies over the answer (mislabelled pairs)
    hackable_rm_samples: int = 4       # ... replies sampled per prompt (the rollout's temperature and top-p)
    hackable_rm_steps: int = 0         # ... fine-tuned for this many steps (0: reward_refresh.steps)
    critic_rewarmup_iterations: int = 0   # after each RM refresh: critic-only iterations against the refreshed RM
    restart_after_hack: str = "continue"  # the round after a flagged one starts from: continue (the flagged
                                          # round's policy) | last_clean (the last unflagged round's; SFT if none)
    rm_heldout_pairs: int = 32         # per held-out pair set for the RM's per-domain accuracy


@dataclass
class PPOMetricsConfig:
    plots: bool = True
    progress: bool = True


@dataclass
class PPOStageConfig:
    run: PPORunConfig = field(default_factory=PPORunConfig)
    models: PPOModelsConfig = field(default_factory=PPOModelsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ptx: PtxConfig = field(default_factory=PtxConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    hacking: HackingConfig = field(default_factory=HackingConfig)
    reward_refresh: RewardRefreshConfig = field(default_factory=RewardRefreshConfig)
    conditions: dict[str, str] = field(default_factory=dict)   # domain -> condition prompt (reward side only)
    metrics: PPOMetricsConfig = field(default_factory=PPOMetricsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)   # actor, critic, reference, reward model
    resume: bool = False

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.output_dir, self.run.name)


def model_dir(path: str) -> str | None:
    """``path`` itself when it holds a model (config.json), else the model/ export of the newest checkpoint of the
    run directory ``path``; None when neither."""
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "checkpoints")):
        return path
    newest = latest_checkpoint(path)
    if newest and os.path.isfile(os.path.join(newest, "model", "config.json")):
        return os.path.join(newest, "model")
    return None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_tp_splits(c: PPOStageConfig) -> None:
    """``parallel.tp`` splits the actor's and the reward model's heads, FFN and vocabulary (read from their
    config.json) into whole slices: a ConfigError naming the key and the model before any model loads."""
    from models.checkpoint import read_config
    from models.tensor_parallel import check_tp

    for key in ("actor", "reward"):
        config, _ = read_config(model_dir(getattr(c.models, key)))
        try:
            check_tp(config, c.parallel.tp, key="parallel.tp")
        except ValueError as e:
            raise ConfigError(f"{e} (models.{key})") from None


def validate(c: PPOStageConfig, check_paths: bool = True) -> None:
    _check(bool(c.run.name) and "/" not in c.run.name, f"run.name must be a name without '/', got {c.run.name!r}")
    _check(c.run.device in ("auto", "cpu", "cuda"), f"run.device must be auto, cpu or cuda, got {c.run.device!r}")
    _check(c.run.threads >= 0 and c.run.stop_after_round >= 0, "run.threads and run.stop_after_round must be >= 0")
    if check_paths:
        for key in ("actor", "reward"):
            path = getattr(c.models, key)
            _check(bool(path) and os.path.isdir(path), f"models.{key}: directory {path!r} does not exist")
            _check(model_dir(path) is not None, f"models.{key}: {path!r} is neither a model directory (config.json) "
                   "nor a run directory with a checkpoint")
        if c.parallel.tp > 1:
            _check_tp_splits(c)
        if c.online.comparisons_file:
            _check(os.path.isfile(c.online.comparisons_file),
                   f"online.comparisons_file: {c.online.comparisons_file!r} does not exist")
    r = c.rollout
    _check(r.prompts_per_iteration >= 1, f"rollout.prompts_per_iteration must be >= 1, got {r.prompts_per_iteration}")
    _check(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}")
    _check(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    _check(bool(r.tasks) and all(t in SYNTHETIC_CHAT_TASKS for t in r.tasks),
           f"rollout.tasks must be among {', '.join(SYNTHETIC_CHAT_TASKS)}, got {r.tasks}")
    _check(r.heldout_prompts >= 1 and r.comparison_prompts >= 1,
           "rollout.heldout_prompts and rollout.comparison_prompts must be >= 1")
    _check(r.validation_prompts >= 0, f"rollout.validation_prompts must be >= 0, got {r.validation_prompts}")
    if c.conditions:
        _check(r.domain in c.conditions, f"rollout.domain {r.domain!r} has no entry in [conditions]")
    p = c.ppo
    _check(p.kl_coef >= 0, f"ppo.kl_coef must be >= 0, got {p.kl_coef}")
    _check(p.checker_weight >= 0, f"ppo.checker_weight must be >= 0, got {p.checker_weight}")
    _check(0 <= p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]")
    _check(p.clip_eps > 0, f"ppo.clip_eps must be > 0, got {p.clip_eps}")
    _check(p.value_clip_eps >= 0, f"ppo.value_clip_eps must be >= 0, got {p.value_clip_eps}")
    _check(p.ptx_coef >= 0, f"ppo.ptx_coef must be >= 0, got {p.ptx_coef}")
    _check(p.ppo_epochs >= 1, f"ppo.ppo_epochs must be >= 1, got {p.ppo_epochs}")
    _check(1 <= p.mini_batches <= r.prompts_per_iteration,
           f"ppo.mini_batches must be in [1, rollout.prompts_per_iteration], got {p.mini_batches}")
    _check(p.actor_lr > 0 and p.critic_lr > 0, "ppo.actor_lr and ppo.critic_lr must be > 0")
    _check(len(p.betas) == 2 and all(0 <= b < 1 for b in p.betas), "ppo.betas must be two numbers in [0, 1)")
    _check(p.temperature > 0, f"ppo.temperature must be > 0 (PPO samples at it), got {p.temperature}")
    _check(c.ptx.rows >= 0 and c.ptx.seq_len >= 2, "ptx.rows must be >= 0 and ptx.seq_len >= 2")
    o = c.online
    _check(o.rounds >= 1 and o.iterations_per_round >= 1, "online.rounds and online.iterations_per_round must be >= 1")
    _check(o.critic_warmup_iterations >= 0 and o.hackable_rm_prompts >= 0 and o.rm_heldout_pairs >= 1,
           "online.critic_warmup_iterations and online.hackable_rm_prompts must be >= 0, online.rm_heldout_pairs >= 1")
    _check(o.hackable_rm_samples >= 1, f"online.hackable_rm_samples must be >= 1, got {o.hackable_rm_samples}")
    _check(o.hackable_rm_steps >= 0, f"online.hackable_rm_steps must be >= 0, got {o.hackable_rm_steps}")
    _check(o.critic_rewarmup_iterations >= 0,
           f"online.critic_rewarmup_iterations must be >= 0, got {o.critic_rewarmup_iterations}")
    _check(o.restart_after_hack in ("continue", "last_clean"),
           f"online.restart_after_hack must be continue or last_clean, got {o.restart_after_hack!r}")
    h = c.hacking
    _check(h.length_ratio > 1 and h.ngram >= 1 and h.repeat_margin > 0,
           "hacking.length_ratio must be > 1, hacking.ngram >= 1, hacking.repeat_margin > 0")
    _check(1 <= h.min_pairs <= h.max_pairs, "hacking: need 1 <= min_pairs <= max_pairs")
    check_parallel(c.parallel)
    f = c.reward_refresh
    _check(f.steps >= 1 and f.pairs_per_step >= 1 and f.lr > 0,
           "reward_refresh.steps and pairs_per_step must be >= 1, reward_refresh.lr > 0")
    _check(f.replay_pairs >= 0 and f.replay_task_pairs >= 0,
           f"reward_refresh.replay_pairs and replay_task_pairs must be >= 0, got {f.replay_pairs}, {f.replay_task_pairs}")
    _check(f.loss in ("focal", "bradley_terry"), f"reward_refresh.loss must be focal or bradley_terry, got {f.loss!r}")


def load_ppo_config(path: str | None = None, overrides: dict[str, Any] | None = None,
                    check_paths: bool = True) -> PPOStageConfig:
    data = read_toml(path) if path else {}
    where = path or "config"
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    try:
        if isinstance(data.get("rollout"), dict) and "seed_per_prompt" in data["rollout"]:
            raise ConfigError("rollout.seed_per_prompt was removed: every prompt now samples from its own generator "
                              "seeded from (run seed, batch, prompt index), all prompts decoded together, on any "
                              "number of ranks; delete the key")
        config = _build(PPOStageConfig, data, "")
        validate(config, check_paths)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return config


def parse_ppo_cli(argv: list[str], default_config: str | None = None) -> PPOStageConfig:
    """``train.config.parse_args`` (``--resume``: the top-level ``resume``) then ``load_ppo_config``."""
    path, overrides = parse_args(argv, default_config, "resume")
    return load_ppo_config(path, overrides)
