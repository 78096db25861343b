"""The main job (``make demo``): pretrain the tiny preset on the embedded corpus, evaluate, and report.

    python -m train.pipeline                                   # configs/tiny_cpu.toml: about 5 minutes on 2 quiet CPU cores
    python -m train.pipeline --config configs/x.toml --resume  # any config; overrides as --section.key=value
    python -m train.pipeline --sft:stages.0.steps=50            # a later stage's config key: --sft: --reward: --ppo:

Stages run by ``train.stages.pretrain`` (4k-style stage, then the long-context stage with the RoPE base raised); then
plots of loss and throughput, a check that the checkpoint loads in transformers and computes the same logits,
and ``runs/<name>/report.md`` (also printed): loss curve, held-out perplexity before/after, passkey accuracy by
length, tokens/s, the checkpoint, and how to load it. Then SFT from that checkpoint and the conditional reward
model from the SFT checkpoint (``train.pipeline.align``: configs/sft_tiny.toml, configs/reward_tiny.toml) add
their sections to the report; then PPO in rounds from both (``train.pipeline.ppo``: configs/ppo_tiny.toml).
"""
from __future__ import annotations

import os
import sys
import time

import torch

from train.config import REPO_ROOT, ConfigError, TrainConfig, parse_cli, parse_value, repo_config
from train.eval.pretrain import passkey_means, passkey_table
from train.metrics import plot_training, read_jsonl
from train.pipeline.align import run_alignment
from train.pipeline.ppo import rlhf_summary, run_rlhf
from train.pipeline.summary import (
    PASSKEY_BARS,
    PASSKEY_GAIN,
    PASSKEY_GAIN_LENGTH,
    SUMMARY_FILE,
    build_summary,
    pretrain_summary,
    write_summary,
)
from train.stages.pretrain import PretrainResult, heldout_texts, run_pretraining

DEFAULT_CONFIG = repo_config("tiny_cpu.toml")
SAMPLE_PROMPTS = ("23 + 45 =", "reverse: planet ->", "sort: 7 3 9 1 ->")


def transformers_check(result: PretrainResult, text: str) -> dict:
    """Load the checkpoint with transformers' LlamaForCausalLM and compare its logits with ours on ``text``."""
    from transformers import LlamaForCausalLM

    path = os.path.join(result.checkpoint, "model")
    ours = getattr(result.model, "module", result.model)
    param = next(ours.parameters())
    # Same device and dtype as ours, so the comparison measures the layout, not a precision change.
    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=param.dtype).to(param.device).eval()
    ids = torch.tensor(result.tokenizer.encode(text, add_bos=True)[:512], device=param.device)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
        got = ours(ids, return_logits=True).logits.float()
    # Greedy continuation by transformers' own generate, to show the exported model works on its own.
    prompt = torch.tensor([result.tokenizer.encode(SAMPLE_PROMPTS[0], add_bos=True)], device=param.device)
    out = hf.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=result.tokenizer.eos_id)
    return {"path": path, "max_abs_logit_diff": float((ref - got).abs().max()),
            "logit_scale": float(ref.abs().max()),
            "generated": result.tokenizer.decode(out[0, prompt.shape[1]:].tolist())}


def sample_completions(result: PretrainResult, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 12) -> list[tuple[str, str]]:
    model = getattr(result.model, "module", result.model)
    tok = result.tokenizer
    outs = model.generate([tok.encode(p, add_bos=True) for p in prompts], max_new_tokens=max_new_tokens,
                          temperature=0.0, stop_token_ids=(tok.eos_id,))
    return [(p, tok.decode(o).split("\n")[0]) for p, o in zip(prompts, outs)]


def _stage_rows(records: list[dict]) -> list[str]:
    rows = ["| stage | steps | tokens | tokens/s | MFU | last loss |", "|---|---|---|---|---|---|"]
    stages: dict[str, list[dict]] = {}
    for r in records:
        if r["kind"] == "train":
            stages.setdefault(r["stage"], []).append(r)
    for name, rs in stages.items():
        tokens = sum(r["window_tokens"] for r in rs)
        seconds = sum(r["window_time_s"] for r in rs)
        mfu = [r["mfu"] * r["window_time_s"] for r in rs if "mfu" in r]
        mfu_text = f"{sum(mfu) / seconds:.1%}" if mfu else "n/a (CPU)"
        rows.append(f"| {name} | {rs[-1]['step'] - rs[0]['step'] + 1 if len(rs) > 1 else 1} | {tokens:,} | "
                    f"{tokens / seconds:,.0f} | {mfu_text} | {rs[-1]['loss']:.3f} |")
    return rows


def _mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def link(report_path: str, path: str) -> str:
    """``path`` relative to the report's folder, so the report's links survive moving the output folder."""
    return os.path.relpath(path, os.path.dirname(os.path.abspath(report_path)))


def passkey_lines(report_path: str, result: PretrainResult) -> list[str]:
    """The pretraining section's lead: the long-context stage's effect on retrieval, against the bars."""
    if not (result.passkey and result.passkey_before_last):
        return ["(passkey probe off, or a single stage: no long-context effect to show)", ""]
    short, final = passkey_means(result.passkey_before_last), passkey_means(result.passkey)
    n = len(result.passkey["depths"]) * result.passkey["trials"]
    lines = ["**Effect:** greedy retrieval of a 5-digit pass key hidden at depths "
             + ", ".join(f"{d:.0%}" for d in result.passkey["depths"])
             + f" of a filler text ({n} prompt(s) per length; the probe's keys and filler sentences are held out of "
             "training, so a hit is retrieval from the context, not recall; chance 0.001%):", "",
             "| context (tokens) | after the short stage | after the long stage | bar (after the long stage) |",
             "|---|---|---|---|"]
    for length in sorted(final, key=int):
        bar = PASSKEY_BARS.get(length)
        text = "-"
        if bar is not None:
            text = f">= {bar:.0%}: {_mark(final[length] >= bar)}"
            if length == PASSKEY_GAIN_LENGTH:
                gain = final[length] - short.get(length, 0.0)
                text += (f"; gain over the short stage >= {PASSKEY_GAIN * 100:.0f} points: {gain * 100:+.0f}, "
                         f"{_mark(gain >= PASSKEY_GAIN)}")
        lines.append(f"| {length} | {short.get(length, 0.0):.0%} | {final[length]:.0%} | {text} |")
    lines += ["", "The curriculum: copy rows first (`<s> s s`, a random span and its repeat, loss on the repeat), "
              "their spans growing from stage to stage (4-24, then 4-64 characters), form the copy-from-context "
              "(induction) circuit and stretch its reach; the short stage mixes them with passkey documents at 256 "
              "tokens and the rest of the corpus; the long stage (rows of 1024, RoPE base raised) teaches the same "
              "retrieval over four times the distance. Rows never cut a document (`data.packing = \"fit\"`). "
              "See docs/training.md.", "",
              f"![passkey after the short stage]({link(report_path, result.passkey_before_last['paths']['heatmap'])}) "
              f"![passkey after the long stage]({link(report_path, result.passkey_paths['heatmap'])})", ""]
    return lines


def write_report(cfg: TrainConfig, result: PretrainResult, plots: dict, check: dict, samples, wall_s: float,
                 device: str) -> str:
    """``runs/<name>/report.md``: the pretraining section (its effect and bars first); the SFT, reward-model and
    PPO sections are appended after it by ``train.pipeline.align`` and ``train.pipeline.ppo``."""
    path = os.path.join(result.run_dir, "report.md")
    records = read_jsonl(result.metrics_path)
    evals = [r for r in records if r["kind"] == "eval" and "heldout_ppl" in r]
    lines = [f"# Report: {cfg.run.name} (seed {cfg.run.seed})", "",
             f"Device: {device}, {cfg.run.threads or torch.get_num_threads()} thread(s). Pretraining wall time "
             f"{wall_s / 60:.1f} min. Config: `{link(path, os.path.join(result.run_dir, 'config.json'))}`; figures "
             f"of every stage: `{link(path, os.path.join(cfg.run.output_dir, SUMMARY_FILE))}`.", "",
             "## Pretraining: retrieval from the long-context stage", *passkey_lines(path, result),
             "### Loss", f"![loss]({link(path, plots['loss'])})" if plots else "(no training records)",
             f"Throughput: `{link(path, plots['throughput'])}`." if plots else "", "",
             "### Held-out perplexity", "| after | step | loss (nats/token) | perplexity |", "|---|---|---|---|"]
    for e in evals:
        lines.append(f"| {e['stage']} | {e['step']} | {e['heldout_loss']:.4f} | {e['heldout_ppl']:.3f} |")
    if len(evals) >= 2:
        lines += ["", f"Perplexity before training {evals[0]['heldout_ppl']:.2f} -> after {evals[-1]['heldout_ppl']:.3f}."]
    lines += ["", "### Throughput", *_stage_rows(records), ""]
    if result.passkey:
        lines += ["### Passkey retrieval by depth, after the long stage", "", passkey_table(result.passkey), ""]
    if samples:
        lines += ["### Sample completions (greedy)", "| prompt | completion |", "|---|---|"]
        lines += [f"| `{p}` | `{c}` |" for p, c in samples]
        lines.append("")
    lines += ["### Checkpoint", f"`{result.checkpoint}` (model in transformers' Llama layout under `model/`, plus "
              "optimizer, scheduler, data position and RNG for `--resume`).", ""]
    if check:
        lines += [f"Loaded in transformers: max |logit difference| vs our model {check['max_abs_logit_diff']:.2e} "
                  f"(logits up to {check['logit_scale']:.1f}); transformers' greedy continuation of "
                  f"`{SAMPLE_PROMPTS[0]}`: `{check['generated']}`.", ""]
    lines += ["Load it in transformers (the tokenizer is this repo's byte-level one):", "```python",
              "import sys, torch", f"sys.path.insert(0, {REPO_ROOT!r})  # for train.data.tokenizer",
              "from transformers import LlamaForCausalLM", "from train.data.tokenizer import load_tokenizer", "",
              f"model = LlamaForCausalLM.from_pretrained({check.get('path', os.path.join(str(result.checkpoint), 'model'))!r})",
              f"tok = load_tokenizer({cfg.data.tokenizer!r}, {cfg.data.byte_vocab_size})",
              f"ids = torch.tensor([tok.encode({SAMPLE_PROMPTS[0]!r}, add_bos=True)])",
              "out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_id)",
              "print(tok.decode(out[0, ids.shape[1]:].tolist()))", "```",
              "Or with this repo's model: `models.InternLM2ForCausalLM.from_pretrained(path)`.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


STAGE_PREFIXES = ("sft", "reward", "ppo")


def split_stage_args(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(the pretraining config's arguments, {stage: its overrides}): ``--sft:stages.0.steps=50`` overrides
    ``stages.0.steps`` of the SFT config (likewise ``--reward:``, ``--ppo:``); only the ``--key=value`` form."""
    own: list[str] = []
    stages: dict[str, list[str]] = {name: [] for name in STAGE_PREFIXES}
    for arg in argv:
        prefix, colon, rest = arg[2:].partition(":") if arg.startswith("--") else ("", "", "")
        if not colon:
            own.append(arg)
            continue
        if prefix not in stages or "=" not in rest:
            raise ConfigError(f"{arg!r}: stage overrides look like --sft:section.key=value (stages: "
                              f"{', '.join(STAGE_PREFIXES)})")
        stages[prefix].append("--" + rest)
    return own, stages


def main(argv: list[str] | None = None) -> int:
    start = time.time()
    try:
        own, stage_args = split_stage_args(sys.argv[1:] if argv is None else argv)
        cfg = parse_cli(own, default_config=DEFAULT_CONFIG)
        ppo_overrides = {k: parse_value(v) for k, _, v in (a[2:].partition("=") for a in stage_args["ppo"])}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_pretraining(cfg)
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    if not result.finished:
        print(f"[pipeline] stopped at run.stop_at_step={cfg.run.stop_at_step}; checkpoint {result.checkpoint}. "
              "Continue with --resume.")
        return 0
    plots = plot_training(read_jsonl(result.metrics_path), result.run_dir) if cfg.metrics.plots else {}
    texts = heldout_texts(cfg) or ["The pass key is 12345."]
    check = transformers_check(result, texts[0])
    samples = sample_completions(result) if cfg.data.tokenizer == "byte" else []
    device = str(next(result.model.parameters()).device)
    if device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    wall = {"pretrain": time.time() - start}
    report = write_report(cfg, result, plots, check, samples, wall["pretrain"], device)
    figures = {"sft": None, "reward": None, "ppo": None}
    t0 = time.time()
    aligned = run_alignment(cfg, result.checkpoint, report, start, stage_args["sft"], stage_args["reward"])
    if aligned is not None:
        sft, rm = aligned.sft, aligned.reward
        wall["sft_reward"] = time.time() - t0
        figures.update(aligned.summary)
        t0 = time.time()
        ppo = run_rlhf(cfg, os.path.join(sft.checkpoint, "model"), os.path.join(rm.checkpoint, "model"), rm.run_dir,
                       report, start, overrides=ppo_overrides)
        if ppo is not None:
            wall["ppo"] = time.time() - t0
            figures.update(rlhf_summary(ppo))
    wall["total"] = time.time() - start
    summary_path = None
    if None not in figures.values() and result.passkey and result.passkey_before_last:
        summary = build_summary(cfg.run.seed, pretrain_summary(result.passkey_before_last, result.passkey),
                                figures["sft"], figures["reward"], figures["ppo"], wall,
                                cfg.run.threads or torch.get_num_threads())
        summary_path = write_summary(os.path.join(cfg.run.output_dir, SUMMARY_FILE), summary)
    print()
    with open(report) as f:
        print(f.read())
    print(f"[pipeline] report: {report}")
    print(f"[pipeline] summary: {summary_path}" if summary_path else
          "[pipeline] no summary.json: it needs every stage and the passkey probe after the last two pretraining "
          "stages")
    return 0
