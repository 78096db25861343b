"""The RLHF end of ``make demo``: PPO in rounds (``configs/ppo_tiny.toml``) from the pipeline's SFT and reward-model
exports, and its report section (appended to the pipeline's report).

The PPO config is pointed at the SFT model (actor and reference) and the reward model (reward model and critic);
the run's output directory, device, threads, seed, tokenizer and ``--resume`` carry over, and the condition prompts
are the reward stage's own (read from its run's config.json), so the reward side conditions as the RM was trained.
"""
from __future__ import annotations

import json
import os
import time

from train.config import TrainConfig, repo_config
from train.eval.ppo_report import plot_ppo, ppo_summary, read_records, report_lines
from train.stages.ppo import PPOResult, run_ppo
from train.stages.ppo_config import load_ppo_config

PPO_CONFIG = repo_config("ppo_tiny.toml")


def reward_conditions(reward_run_dir: str) -> dict[str, str]:
    with open(os.path.join(reward_run_dir, "config.json")) as f:
        return dict(json.load(f)["reward"]["conditions"])


def run_rlhf(cfg: TrainConfig, sft_model: str, reward_model: str, reward_run_dir: str, report_path: str,
             start_time: float, config_path: str = PPO_CONFIG, overrides: dict | None = None) -> PPOResult | None:
    """PPO after the reward model; its section goes to the end of ``report_path``. None when stopped early.
    ``overrides`` (``{"section.key": value}``) apply last."""
    r = cfg.run
    carried = {"run.output_dir": r.output_dir, "run.device": r.device, "run.threads": r.threads,
                 "run.seed": r.seed, "models.actor": sft_model, "models.reward": reward_model,
                 "models.tokenizer": cfg.data.tokenizer, "models.byte_vocab_size": cfg.data.byte_vocab_size,
                 "conditions": reward_conditions(reward_run_dir), "resume": bool(cfg.checkpoint.resume)}
    ppo_cfg = load_ppo_config(config_path, {**carried, **(overrides or {})})
    result = run_ppo(ppo_cfg)
    if not result.finished:
        return None
    plots = plot_ppo(read_records(result.run_dir), result.run_dir) if ppo_cfg.metrics.plots else {}
    lines = report_lines(result, plots, os.path.dirname(report_path))
    lines.append(f"Wall time of the whole pipeline (pretraining, SFT, reward model, PPO, evaluations): "
                 f"{(time.time() - start_time) / 60:.1f} min.")
    with open(report_path, "a") as f:
        f.write("\n" + "\n".join(lines) + "\n")
    return result



def rlhf_summary(result: PPOResult) -> dict:
    """The ``ppo`` part of runs/summary.json (``train.eval.ppo_report.ppo_summary``)."""
    return {"ppo": ppo_summary(result.state)}
