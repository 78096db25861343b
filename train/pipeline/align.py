"""The alignment half of ``make demo``: SFT from the pretraining checkpoint, then the conditional reward model from
the SFT checkpoint, and their report sections (appended to the pretraining report by ``train.pipeline``).

The stage configs are ``configs/sft_tiny.toml`` and ``configs/reward_tiny.toml``; the pipeline points each at the
previous stage's export and carries over the run's output directory, device, dtype, threads, tokenizer and
``--resume``.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from train.config import TrainConfig, repo_config
from train.data.chat import render
from train.data.preference import CORRECT_OVER_WRONG, SYNTHETIC_DOMAINS
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


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def sft_section(result: SFTResult, plots: dict, summary: dict, root: str = "") -> list[str]:
    records = read_jsonl(result.metrics_path)
    before, after = _evals(records)
    tasks = sorted(k[3:] for k in after if k.startswith("em_"))
    data = next((r for r in reversed(records) if r["kind"] == "data"), result.data)   # logged at the stage end
    s = summary["sft"]
    lines = ["## SFT: the model answers the tasks and calls tools with the right arguments",
             f"**Effect:** held-out exact match {s['exact_match_before']:.1%} before SFT -> "
             f"{s['exact_match_after']:.1%} after (bars: <= 5% before, {_mark(s['exact_match_before'] <= 0.05)}; "
             f">= 60% after, {_mark(s['exact_match_after'] >= 0.6)}); tool call exactly right (name and arguments) "
             f"{s['tool_call_exact_after']:.1%} after (bar >= 70%, {_mark(s['tool_call_exact_after'] >= 0.7)}). "
             "Every held-out conversation has new names, words and numbers, so a reply is right only when the model "
             "copies them from the user message, the facts given or the tool result (the copy circuit pretraining "
             "formed), and it is wrong before SFT because the base model does not know the chat format.", "",
             f"From the pretraining checkpoint `{result.init_from}`; checkpoint `{result.checkpoint}` (its "
             "`model/` loads with `transformers.LlamaForCausalLM`). " + _loss_rows(records) + ".",
             f"Loss curve: `{_rel(plots.get('loss', '-'), root)}`.", "",
             f"Data: {data.get('items', 0)} items (conversations and long-context pretraining documents), "
             f"{data.get('dropped', 0)} over-long dropped, {data.get('truncated', 0)} truncated.", "",
             "Held-out, greedy decoding (exact match of the whole final reply; a tool call is valid when it is "
             "well-formed JSON naming a declared tool with its required parameters, exact when it equals the "
             "reference call):", "",
             "| metric | before SFT | after SFT |", "|---|---|---|",
             f"| assistant-token loss | {before['heldout_loss']:.3f} | {after['heldout_loss']:.3f} |",
             f"| exact match, all | {before['exact_match']:.1%} | {after['exact_match']:.1%} |"]
    lines += [f"| exact match, {t} | {before.get('em_' + t, 0.0):.1%} | {after['em_' + t]:.1%} |" for t in tasks]
    if "tool_call_valid" in after:
        lines += [f"| tool-call format valid | {before['tool_call_valid']:.1%} | {after['tool_call_valid']:.1%} |",
                  f"| tool call exact | {before['tool_call_exact']:.1%} | {after['tool_call_exact']:.1%} |"]
    examples = (result.eval or {}).get("examples") or []
    if examples:
        ex = examples[0]
        lines += ["", "An example with a tool call (held-out; the prompt as the model sees it, then its greedy reply):",
                  "```", render(ex["prompt"], add_generation_prompt=True) + ex["reply"], "```",
                  f"Reference reply: `{ex['reference']}`"]
    return lines + [""]


def reward_section(result: RewardResult, plots: dict, conditions: dict, unconditional: RewardResult,
                   summary: dict, root: str = "") -> list[str]:
    records = read_jsonl(result.metrics_path)
    before, after = _evals(records)
    r = summary["reward"]
    acc = r["pair_accuracy"]
    lines = ["## Conditional reward model (COOL RLHF): the condition carries the preference, and right beats wrong",
             "**Effect:** held-out pair accuracy on the domain-flipped pairs "
             + ", ".join(f"{d} {a:.1%}" for d, a in acc.items())
             + f" (bar >= 90% each, {_mark(min(acc.values()) >= 0.9)}); the same recipe trained on the same pairs "
             f"without condition prompts: {r['unconditional_pair_accuracy']:.1%} (bar <= 65%, "
             f"{_mark(r['unconditional_pair_accuracy'] <= 0.65)}): the flipped pairs hold the same two replies with "
             "opposite preferences, so only the condition prompt can separate them. Correct over wrong answers to "
             f"the PPO tasks (held-out prompts, a near-miss wrong reply): {r['correct_over_wrong']:.1%} (bar >= 85%, "
             f"{_mark(r['correct_over_wrong'] >= 0.85)}): the reward PPO optimizes points at task accuracy.", "",
             f"`InternLM2ForScore` from the SFT checkpoint `{result.init_from}` with a fresh head; checkpoint "
             f"`{result.checkpoint}`. " + _loss_rows(records) + f". Loss curve: `{_rel(plots.get('loss', '-'), root)}`. "
             "(The loss can go below 0: the log-barrier term is negative inside the bound, at least "
             "-lambda * 2 log(bound) = -0.064 with the defaults.) The unconditional control: "
             + _loss_rows(read_jsonl(unconditional.metrics_path)) + ".", "",
             "| group | condition prompt | held-out pair accuracy before | after | unconditional control |",
             "|---|---|---|---|---|"]
    uncond = unconditional.eval or {}
    for d in result.domains:
        cond = conditions.get(d, "(none)") if d != CORRECT_OVER_WRONG else conditions.get("concise", "(none)")
        lines.append(f"| {d} | {cond} | {before.get('pair_acc_' + d, 0.0):.1%} | "
                     f"{after.get('pair_acc_' + d, 0.0):.1%} | {uncond.get('pair_acc_' + d, 0.0):.1%} |")
    if result.scores is not None:
        lines += ["", f"Held-out scores: mean {after['score_mean']:.2f}, std {after['score_std']:.2f}, max |score| "
                  f"{after['score_abs_max']:.2f} (the log barrier keeps them inside (-5, 5)); histogram "
                  f"`{_rel(result.histogram, root)}`:", "", histogram_table(result.scores, result.domains)]
    return lines + [""]


def _rel(path: str, root: str) -> str:
    """A path as the report links it: relative to the report's folder, so the links survive moving the folder."""
    return path if path in ("", "-") or not root else os.path.relpath(path, root)


@dataclass
class Alignment:
    """The alignment half's results: the SFT run, the conditional reward model, the unconditional control (the
    same recipe and pairs without condition prompts), their ``summary.json`` part and each run's wall time."""
    sft: SFTResult
    reward: RewardResult
    unconditional: RewardResult
    summary: dict          # {"sft": {...}, "reward": {...}} (alignment_summary)
    wall_s: dict           # {"sft": s, "reward": s, "reward_unconditional": s (both reward models, to the later end)}


def flipped_accuracy(result: RewardResult) -> float:
    """Held-out pair accuracy over the domain-flipped pairs (every domain, not the correct>wrong group)."""
    s = result.scores
    keep = [k for k, d in enumerate(result.domains) if d != CORRECT_OVER_WRONG]
    sel = torch.zeros_like(s["group"], dtype=torch.bool)
    for k in keep:
        sel |= s["group"] == k
    return float((s["chosen"][sel] > s["rejected"][sel]).float().mean())


def alignment_summary(sft: SFTResult, rm: RewardResult, unconditional: RewardResult) -> dict:
    """The ``sft`` and ``reward`` parts of runs/summary.json (held-out, fractions in [0, 1])."""
    before, after = _evals(read_jsonl(sft.metrics_path))
    return {"sft": {"exact_match_before": before["exact_match"], "exact_match_after": after["exact_match"],
                    "tool_call_exact_after": after.get("tool_call_exact", 0.0)},
            "reward": {"pair_accuracy": {d: rm.eval[f"pair_acc_{d}"] for d in SYNTHETIC_DOMAINS},
                       "unconditional_pair_accuracy": flipped_accuracy(unconditional),
                       "correct_over_wrong": rm.eval.get(f"pair_acc_{CORRECT_OVER_WRONG}", 0.0)}}


def _control(cfg: TrainConfig) -> RewardResult:
    """The unconditional control's run, without its model (what the report needs crosses a process boundary)."""
    result = run_reward(cfg)
    result.model = None
    return result


def run_alignment(cfg: TrainConfig, pretrain_checkpoint: str, report_path: str, start_time: float,
                  sft_args: Sequence[str] = (), reward_args: Sequence[str] = ()) -> Alignment | None:
    """SFT, then the conditional reward model and its unconditional control after pretraining; their sections go
    to the end of ``report_path``. None when a stage stopped early. ``sft_args`` / ``reward_args``: ``--key=value``
    overrides of each stage's config, applied last (the control takes the reward model's)."""
    t0 = time.time()
    sft_cfg = parse_sft_cli(["--config", SFT_CONFIG, *_carried(cfg),
                             f"--sft.init_from={os.path.join(pretrain_checkpoint, 'model')}", *sft_args])
    sft = run_sft(sft_cfg)
    if not sft.finished:
        return None
    sft_plots = plot_training(read_jsonl(sft.metrics_path), sft.run_dir) if sft_cfg.metrics.plots else {}
    wall = {"sft": time.time() - t0}
    rm_args = ["--config", REWARD_CONFIG, *_carried(cfg), f"--reward.init_from={os.path.join(sft.checkpoint, 'model')}",
               *reward_args]
    rm_cfg = parse_reward_cli(rm_args)
    # The control: the same recipe on the same pairs with no condition prompt. The flipped pairs then contradict
    # each other, so it must stay near 50% on them: the conditions, not the replies, carry the preference. It
    # needs nothing from the conditional model, so it trains in a second process beside it when the machine has
    # the cores for both (half the alignment half's wall time on 2 cores at one thread each).
    uncond_cfg = parse_reward_cli(rm_args + [f"--run.name={rm_cfg.run.name}_unconditional", "--reward.conditions={}",
                                             "--metrics.plots=false"])
    threads = cfg.run.threads or torch.get_num_threads()
    on_cpu = rm_cfg.run.device == "cpu" or (rm_cfg.run.device == "auto" and not torch.cuda.is_available())
    beside = on_cpu and (os.cpu_count() or 1) >= 2 * threads
    t0 = time.time()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) if beside else nullcontext() as pool:
        control = pool.submit(_control, uncond_cfg) if pool else None
        rm = run_reward(rm_cfg)
        wall["reward"] = time.time() - t0
        if control is None and not rm.finished:    # stopped early: the control is not needed yet
            return None
        uncond = control.result() if control else _control(uncond_cfg)
    wall["reward_unconditional"] = time.time() - t0
    if not (rm.finished and uncond.finished):
        return None
    rm_plots = plot_reward_training(read_jsonl(rm.metrics_path), rm.run_dir) if rm_cfg.metrics.plots else {}
    summary = alignment_summary(sft, rm, uncond)
    root = os.path.dirname(report_path)
    lines = (sft_section(sft, sft_plots, summary, root)
             + reward_section(rm, rm_plots, rm_cfg.reward.conditions, uncond, summary, root))
    lines.append(f"Wall time of the whole pipeline (pretraining, SFT, reward models, evaluations): "
                 f"{(time.time() - start_time) / 60:.1f} min; SFT {wall['sft']:.0f} s, reward model "
                 f"{wall['reward']:.0f} s, the reward model and its unconditional control "
                 f"{wall['reward_unconditional']:.0f} s ({'side by side' if beside else 'one after the other'}).")
    with open(report_path, "a") as f:
        f.write("\n" + "\n".join(lines) + "\n")
    return Alignment(sft, rm, uncond, summary, wall)
