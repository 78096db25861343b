"""Configs of the alignment stages: the pretraining ``TrainConfig`` plus an ``[sft]`` or ``[reward]`` section.

The shared sections keep their meaning: ``[[stages]]`` is the one stage (steps; ``seq_len`` = the longest
sequence, InternLM2's reward model: 8192; ``micro_batch_tokens`` = the token budget of one micro-batch, whole
conversations or pairs, never cut; ``global_batch_tokens`` = micro x accumulation x ranks, InternLM2's reward
model: 16,384; ``rope_theta``; ``mix``: the synthetic task mix of the long-context pretraining documents),
``[optim]`` (InternLM2: SFT lr 4e-5; reward model cosine 1e-5 -> 5e-6, weight decay 0.01), ``[data]`` (tokenizer,
and the pretraining documents of ``long_context_mix``), ``[checkpoint]``, ``[metrics]``, ``[parallel]``,
``[eval] batch_tokens``. Every key is checked at load (``ConfigError`` naming it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from train.config import ConfigError, TrainConfig, parse_cli
from train.data.chat import SYNTHETIC_CHAT_TASKS
from train.data.items import OVERLONG_RULES
from train.data.preference import DEFAULT_CONDITIONS
from train.rlhf.reward_losses import RANKING_LOSSES


@dataclass
class SFTSection:
    init_from: str = ""                # pretraining checkpoint: an HF model directory, or a run directory (its
                                       # newest checkpoint with a model export); "" = random init (tests only)
    conversations: str = "synthetic"   # synthetic | path of an OpenAI-style jsonl ({"messages": [...], "tools"?})
    tasks: list[str] = field(default_factory=lambda: list(SYNTHETIC_CHAT_TASKS))   # synthetic: which tasks
    heldout: int = 64                  # held-out conversations (synthetic: another split; jsonl: the first N)
    overlong: str = "drop"             # a conversation longer than stages[0].seq_len: drop | truncate (counted)
    long_context_mix: float = 0.1      # share of pretraining documents among the items
    eval_max_new_tokens: int = 48      # generation budget per reply in the evaluation


@dataclass
class RewardSection:
    init_from: str = ""                # the SFT checkpoint (HF directory or run directory); "" = random init
    pairs: str = "synthetic"           # synthetic | path of a preference jsonl ({"domain", "prompt", "chosen", "rejected"})
    heldout: int = 128                 # held-out pairs (synthetic: another split; jsonl: the first N)
    loss: str = "focal"                # focal | bradley_terry
    gamma: float = 2.0                 # focal exponent
    penalty: float = 0.02              # lambda of the log-barrier penalty; 0 disables it
    bound: float = 5.0                 # the barrier keeps scores in (-bound, bound)
    conditions: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_CONDITIONS))   # domain -> system
                                       # prompt on the reward side; {} = an unconditional reward model
    task_pairs_share: float = 0.0      # synthetic: share of correct-vs-wrong pairs on the chat tasks below
    task_pairs_tasks: list[str] = field(default_factory=lambda: ["arithmetic"])   # train.chat tasks of those pairs
    task_pairs_domain: str = "concise" # their condition (the PPO prompts' domain)
    task_pairs_heldout: int = 64       # held-out correct-vs-wrong pairs (the correct>wrong evaluation group)
    task_pairs_policy_prompts: int = 0 # > 0: the wrong replies are the init model's own samples on this many prompts
                                       # (train.rlhf.policy_pairs; held-out ones too); 0: made-up near misses
    task_pairs_policy_samples: int = 4 # replies sampled per prompt, at the PPO rollout's settings below
    task_pairs_temperature: float = 1.0
    task_pairs_top_p: float = 0.9
    task_pairs_max_new_tokens: int = 32


@dataclass
class SFTConfig(TrainConfig):
    sft: SFTSection = field(default_factory=SFTSection)


@dataclass
class RewardConfig(TrainConfig):
    reward: RewardSection = field(default_factory=RewardSection)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_source(value: str, key: str) -> None:
    _check(value == "synthetic" or os.path.isfile(value), f"{key}: 'synthetic' or an existing jsonl file, got {value!r}")


def _check_stage(c: TrainConfig, seqs_per_item: int) -> None:
    _check(len(c.stages) == 1, f"stages: an alignment run has exactly one [[stages]] table, got {len(c.stages)}")
    s = c.stages[0]
    micro = s.micro_batch_tokens or s.seq_len
    _check(micro >= seqs_per_item * s.seq_len,
           f"stages.0.micro_batch_tokens ({micro}) must hold {seqs_per_item} x seq_len ({s.seq_len})")


def check_sft(c: SFTConfig) -> None:
    s = c.sft
    _check_stage(c, 1)
    _check_source(s.conversations, "sft.conversations")
    for t in s.tasks:
        _check(t in SYNTHETIC_CHAT_TASKS, f"sft.tasks: unknown task {t!r} ({', '.join(SYNTHETIC_CHAT_TASKS)})")
    _check(bool(s.tasks), "sft.tasks: at least one task")
    _check(s.heldout >= 1, f"sft.heldout must be >= 1, got {s.heldout}")
    _check(s.overlong in OVERLONG_RULES, f"sft.overlong must be one of {', '.join(OVERLONG_RULES)}, got {s.overlong!r}")
    _check(0 <= s.long_context_mix < 1, f"sft.long_context_mix must be in [0, 1), got {s.long_context_mix}")
    _check(s.eval_max_new_tokens >= 1, f"sft.eval_max_new_tokens must be >= 1, got {s.eval_max_new_tokens}")


def check_reward(c: RewardConfig) -> None:
    r = c.reward
    _check_stage(c, 2)
    _check_source(r.pairs, "reward.pairs")
    _check(r.heldout >= 1, f"reward.heldout must be >= 1, got {r.heldout}")
    _check(r.loss in RANKING_LOSSES, f"reward.loss must be one of {', '.join(RANKING_LOSSES)}, got {r.loss!r}")
    _check(r.gamma >= 0, f"reward.gamma must be >= 0, got {r.gamma}")
    _check(r.penalty >= 0, f"reward.penalty must be >= 0, got {r.penalty}")
    _check(r.bound > 0, f"reward.bound must be > 0, got {r.bound}")
    _check(0 <= r.task_pairs_share <= 1, f"reward.task_pairs_share must be in [0, 1], got {r.task_pairs_share}")
    for t in r.task_pairs_tasks:
        _check(t in SYNTHETIC_CHAT_TASKS, f"reward.task_pairs_tasks: unknown task {t!r} ({', '.join(SYNTHETIC_CHAT_TASKS)})")
    _check(r.task_pairs_share == 0 or (bool(r.task_pairs_tasks) and r.task_pairs_heldout >= 1),
           "reward.task_pairs_tasks and reward.task_pairs_heldout >= 1 are needed when reward.task_pairs_share > 0")
    _check(r.task_pairs_policy_prompts >= 0 and r.task_pairs_policy_samples >= 1,
           f"reward.task_pairs_policy_prompts must be >= 0 and task_pairs_policy_samples >= 1, got "
           f"{r.task_pairs_policy_prompts} and {r.task_pairs_policy_samples}")
    _check(r.task_pairs_temperature > 0 and 0 < r.task_pairs_top_p <= 1 and r.task_pairs_max_new_tokens >= 1,
           "reward.task_pairs_temperature must be > 0, task_pairs_top_p in (0, 1], task_pairs_max_new_tokens >= 1")
    _check(r.task_pairs_policy_prompts == 0 or bool(r.init_from),
           "reward.task_pairs_policy_prompts > 0 samples the policy: it needs reward.init_from (the SFT model)")
    _check(r.task_pairs_share == 0 or not r.conditions or r.task_pairs_domain in r.conditions,
           f"reward.task_pairs_domain {r.task_pairs_domain!r} has no condition in reward.conditions")
    for domain, prompt in r.conditions.items():
        _check(isinstance(prompt, str) and bool(prompt), f"reward.conditions.{domain} must be a non-empty string")


def stage_geometry(cfg: TrainConfig, dp: int, seqs_per_item: int) -> tuple[int, int, int]:
    """(seq_len, micro_batch_tokens, accumulation) of the config's one stage on ``dp`` data-parallel ranks (the
    tensor-parallel ranks of one data-parallel group share their micro-batches)."""
    s = cfg.stages[0]
    micro = s.micro_batch_tokens or s.seq_len * seqs_per_item
    global_tokens = s.global_batch_tokens or micro * dp
    if global_tokens % (micro * dp):
        raise ValueError(f"stages.0.global_batch_tokens ({global_tokens}) must be a multiple of "
                         f"micro_batch_tokens x data-parallel ranks ({micro} x {dp})")
    return s.seq_len, micro, global_tokens // (micro * dp)


def parse_sft_cli(argv: list[str], default_config: str | None = None) -> SFTConfig:
    cfg = parse_cli(argv, default_config, SFTConfig)
    check_sft(cfg)
    return cfg


def parse_reward_cli(argv: list[str], default_config: str | None = None) -> RewardConfig:
    cfg = parse_cli(argv, default_config, RewardConfig)
    check_reward(cfg)
    return cfg


def resolve_init(path: str, key: str) -> str:
    """An HF model directory: ``path`` itself, or the newest model export of the run directory ``path``."""
    from train.checkpoint import list_checkpoints

    if not path:
        return ""
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "checkpoints")):
        return path
    for ckpt in reversed(list_checkpoints(path)):
        model = os.path.join(ckpt, "model")
        if os.path.isfile(os.path.join(model, "config.json")):
            return model
    raise ConfigError(f"{key}: {path!r} is neither a model directory nor a run directory with an exported "
                      "checkpoint (run the previous stage first, e.g. `make demo` or python -m train.stages.pretrain)")
