"""The alignment half of ``make demo``: SFT from the pretraining checkpoint, then the conditional reward model from
the SFT checkpoint, and their report sections (appended to the pretraining report by ``train.pipeline``).

The stage configs are ``configs/sft_tiny.toml`` and ``configs/reward_tiny.toml``; the pipeline points each at the
previous stage's export and carries over the run's output directory, device, dtype, threads, tokenizer and
``--resume``.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

from train.config import TrainConfig, repo_config
from train.data.chat import render
from train.eval.reward import histogram_table, plot_reward_training
from train.metrics import plot_training, read_jsonl
from train.stages.align_config import parse_reward_cli, parse_sft_cli
from train.stages.reward import RewardResult, run_reward
from train.stages.sft import SFTResult, run_sft

SFT_CONFIG = repo_config("sft_tiny.toml")
REWARD_CONFIG = repo_config("reward_tiny.toml")


def _carried(cfg: TrainConfig) -> list[str]:
    r, d = cfg.run, cfg.data
    args = [f"--run.output_dir={r.output_dir}", f"--run.device={r.device}", f"--run.dtype={r.dtype}",
            f"--run.threads={r.threads}", f"--run.seed={r.seed}", f"--data.tokenizer={d.tokenizer}",
            f"--data.byte_vocab_size={d.byte_vocab_size}", f"--model.preset={cfg.model.preset}"]
    if cfg.checkpoint.resume:
        args.append("--resume")
    return args


def _evals(records: list[dict]) -> tuple[dict, dict]:
    evals = [r for r in records if r["kind"] == "eval"]
    return evals[0], evals[-1]


def _loss_rows(records: list[dict]) -> str:
    train = [r for r in records if r["kind"] == "train"]
    if not train:
        return "(no training records)"
    tokens = sum(r["window_tokens"] for r in train)
    seconds = sum(r["window_time_s"] for r in train)
    k = max(1, len(train) // 10)
    first = sum(r["loss"] for r in train[:k]) / k
    last = sum(r["loss"] for r in train[-k:]) / k
    return (f"{len(train)} steps, {tokens:,} tokens, {tokens / seconds:,.0f} tokens/s; training loss "
            f"{first:.3f} (mean of the first {k} steps) -> {last:.3f} (last {k})")


def sft_section(result: SFTResult, plots: dict) -> list[str]:
    records = read_jsonl(result.metrics_path)
    before, after = _evals(records)
    tasks = sorted(k[3:] for k in after if k.startswith("em_"))
    data = next((r for r in reversed(records) if r["kind"] == "data"), result.data)   # logged at the stage end
    lines = ["## SFT", f"From the pretraining checkpoint `{result.init_from}`; checkpoint `{result.checkpoint}` (its "
             "`model/` loads with `transformers.LlamaForCausalLM`). " + _loss_rows(records) + ".",
             f"Loss curve: `{plots.get('loss', '-')}`.", "",
             f"Data: {data.get('items', 0)} items (conversations and long-context pretraining documents), "
             f"{data.get('dropped', 0)} over-long dropped, {data.get('truncated', 0)} truncated.", "",
             "Held-out, greedy decoding (exact match of the whole final reply; a tool call is valid when it is "
             "well-formed JSON naming a declared tool with its required parameters):", "",
             "| metric | before SFT | after SFT |", "|---|---|---|",
             f"| assistant-token loss | {before['heldout_loss']:.3f} | {after['heldout_loss']:.3f} |",
             f"| exact match, all | {before['exact_match']:.1%} | {after['exact_match']:.1%} |"]
    lines += [f"| exact match, {t} | {before.get('em_' + t, 0.0):.1%} | {after['em_' + t]:.1%} |" for t in tasks]
    if "tool_call_valid" in after:
        lines += [f"| tool-call format valid | {before['tool_call_valid']:.1%} | {after['tool_call_valid']:.1%} |",
                  f"| tool call exact | {before['tool_call_exact']:.1%} | {after['tool_call_exact']:.1%} |"]
    if after["exact_match"] == 0.0:
        lines += ["", "No final answer matched exactly: the answers need the base model's own skills (adding two "
                  "numbers, copying a name or a tool result from the context), which the tiny pretraining run does "
                  "not have (see its sample completions above); SFT taught the format (turns closed with "
                  "`<|im_end|>`, tool calls of the declared shape) but cannot add the skills."]
    examples = (result.eval or {}).get("examples") or []
    if examples:
        ex = examples[0]
        lines += ["", "An example with a tool call (held-out; the prompt as the model sees it, then its greedy reply):",
                  "```", render(ex["prompt"], add_generation_prompt=True) + ex["reply"], "```",
                  f"Reference reply: `{ex['reference']}`"]
    return lines + [""]


def reward_section(result: RewardResult, plots: dict, conditions: dict) -> list[str]:
    records = read_jsonl(result.metrics_path)
    before, after = _evals(records)
    lines = ["## Conditional reward model (COOL RLHF)",
             f"`InternLM2ForScore` from the SFT checkpoint `{result.init_from}` with a fresh head; checkpoint "
             f"`{result.checkpoint}`. " + _loss_rows(records) + f". Loss curve: `{plots.get('loss', '-')}`. "
             "(The loss can go below 0: the log-barrier term is negative inside the bound, at least "
             "-lambda * 2 log(bound) = -0.064 with the defaults.)", "",
             "The preference set flips between two domains (the same two replies, opposite preference), so only the "
             "condition system prompt can separate them; a model that ignores it gets at most 50%.", "",
             "| domain | condition prompt | held-out pair accuracy before | after |", "|---|---|---|---|"]
    for d in result.domains:
        lines.append(f"| {d} | {conditions.get(d, '(none)')} | {before.get('pair_acc_' + d, 0.0):.1%} | "
                     f"{after.get('pair_acc_' + d, 0.0):.1%} |")
    lines.append(f"| all | | {before['pair_acc']:.1%} | {after['pair_acc']:.1%} |")
    if result.scores is not None:
        lines += ["", f"Held-out scores: mean {after['score_mean']:.2f}, std {after['score_std']:.2f}, max |score| "
                  f"{after['score_abs_max']:.2f} (the log barrier keeps them inside (-5, 5)); histogram "
                  f"`{result.histogram}`:", "", histogram_table(result.scores, result.domains)]
    return lines + [""]


def run_alignment(cfg: TrainConfig, pretrain_checkpoint: str, report_path: str, start_time: float,
                  sft_args: Sequence[str] = (), reward_args: Sequence[str] = ()) -> tuple[SFTResult, RewardResult] | None:
    """SFT then the reward model after pretraining; their sections go to the end of ``report_path``. Returns both
    results for the PPO stage (None when a stage stopped early). ``sft_args`` / ``reward_args``: ``--key=value``
    overrides of each stage's config, applied last."""
    sft_cfg = parse_sft_cli(["--config", SFT_CONFIG, *_carried(cfg),
                             f"--sft.init_from={os.path.join(pretrain_checkpoint, 'model')}", *sft_args])
    sft = run_sft(sft_cfg)
    if not sft.finished:
        return None
    sft_plots = plot_training(read_jsonl(sft.metrics_path), sft.run_dir) if sft_cfg.metrics.plots else {}
    rm_cfg = parse_reward_cli(["--config", REWARD_CONFIG, *_carried(cfg),
                               f"--reward.init_from={os.path.join(sft.checkpoint, 'model')}", *reward_args])
    rm = run_reward(rm_cfg)
    if not rm.finished:
        return None
    rm_plots = plot_reward_training(read_jsonl(rm.metrics_path), rm.run_dir) if rm_cfg.metrics.plots else {}
    lines = sft_section(sft, sft_plots) + reward_section(rm, rm_plots, rm_cfg.reward.conditions)
    lines.append(f"Wall time of the whole pipeline (pretraining, SFT, reward model, evaluations): "
                 f"{(time.time() - start_time) / 60:.1f} min.")
    with open(report_path, "a") as f:
        f.write("\n" + "\n".join(lines) + "\n")
    return sft, rm
