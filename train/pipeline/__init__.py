"""The main job (``make demo``): pretrain the tiny preset on the embedded corpus, evaluate, and report.

    python -m train.pipeline                                   # configs/tiny_cpu.toml: about 5 minutes on 2 quiet CPU cores
    python -m train.pipeline --config configs/x.toml --resume  # any config; overrides as --section.key=value

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

from train.config import REPO_ROOT, ConfigError, TrainConfig, parse_cli, repo_config
from train.eval.pretrain import passkey_table
from train.metrics import plot_training, read_jsonl
from train.pipeline.align import run_alignment
from train.pipeline.ppo import run_rlhf
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


def write_report(cfg: TrainConfig, result: PretrainResult, plots: dict, check: dict, samples, wall_s: float,
                 device: str) -> str:
    records = read_jsonl(result.metrics_path)
    evals = [r for r in records if r["kind"] == "eval" and "heldout_ppl" in r]
    lines = [f"# Pretraining report: {cfg.run.name}", "",
             f"Device: {device}. Wall time of the pipeline: {wall_s / 60:.1f} min. "
             f"Config: `{os.path.join(result.run_dir, 'config.json')}`.", "",
             "## Loss", f"![loss]({os.path.abspath(plots['loss'])})" if plots else "(no training records)",
             f"Loss curve: `{plots.get('loss', '-')}`; throughput: `{plots.get('throughput', '-')}`.", "",
             "## Held-out perplexity", "| after | step | loss (nats/token) | perplexity |", "|---|---|---|---|"]
    for e in evals:
        lines.append(f"| {e['stage']} | {e['step']} | {e['heldout_loss']:.4f} | {e['heldout_ppl']:.3f} |")
    if len(evals) >= 2:
        lines += ["", f"Perplexity before training {evals[0]['heldout_ppl']:.2f} -> after {evals[-1]['heldout_ppl']:.3f}."]
    lines += ["", "## Throughput", *_stage_rows(records), ""]
    if result.passkey:
        lines += ["## Passkey retrieval (needle in a haystack)",
                  f"Greedy decoding after the last stage; {result.passkey['trials']} prompts per cell; chance is 0.001%.",
                  "", passkey_table(result.passkey), "", f"Heatmap: `{result.passkey_paths['heatmap']}`", ""]
        if not any(a for row in result.passkey["accuracy"] for a in row):
            lines += ["No key was retrieved at any length. Retrieval needs a copy-from-context (induction) circuit; "
                      "a model this small does not form one within the demo's few hundred steps (see "
                      "docs/training.md, \"What the demo shows\"). The probe is the same for longer or GPU runs.", ""]
    if samples:
        lines += ["## Sample completions (greedy)", "| prompt | completion |", "|---|---|"]
        lines += [f"| `{p}` | `{c}` |" for p, c in samples]
        lines.append("")
    lines += ["## Checkpoint", f"`{result.checkpoint}` (model in transformers' Llama layout under `model/`, plus "
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
    path = os.path.join(result.run_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    start = time.time()
    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv, default_config=DEFAULT_CONFIG)
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
    report = write_report(cfg, result, plots, check, samples, time.time() - start, device)
    aligned = run_alignment(cfg, result.checkpoint, report, start)
    if aligned is not None:
        sft, rm = aligned.sft, aligned.reward
        run_rlhf(cfg, os.path.join(sft.checkpoint, "model"), os.path.join(rm.checkpoint, "model"), rm.run_dir, report,
                 start)
    print()
    with open(report) as f:
        print(f.read())
    print(f"[pipeline] report: {report}")
    return 0

