"""Pretraining: the stages of a config run one after another on one model, optimizer and LR schedule.

InternLM2's recipe, scaled by the config: a first stage of packed documents at a short context (4k in the paper,
with the RoPE base at 50,000), then a long-context stage with longer packed rows and the base raised to 1,000,000.
A stage whose ``rope_theta`` differs from the model's rebuilds the model around the same weights (the base is
part of the model config saved with checkpoints); optimizer state and the schedule carry over.

Around the stages: held-out perplexity before training and after each stage, checkpoints (every N steps, at each
stage end, and at ``run.stop_at_step``), and the passkey probe after the last stage. ``--resume`` continues from
the newest checkpoint of the run directory with the same losses as an uninterrupted run.

    python -m train.pretrain --config configs/tiny_cpu.toml [--resume] [--section.key=value ...]
    torchrun --nproc_per_node 8 -m train.pretrain --config configs/internlm2_1_8b.toml
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .checkpoint import (
    checkpoint_root,
    latest_checkpoint,
    load_optimizer_state,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import CHECKPOINTING, TrainConfig, parse_cli, to_dict
from .corpus import SyntheticCorpus
from .data import FileCorpus, PackedStream, ShardedBatches
from .eval import check_passkey_lengths, heldout_loss, heldout_rows, passkey_probe, write_passkey
from .loop import Runtime, batch_flops, build_model, build_optimizer, init_runtime, model_config, train_step, wrap_ddp
from .metrics import MetricsLog, Progress, peak_tflops
from .schedule import WarmupCosine
from .tokenizer import Tokenizer, describe, load_tokenizer


@dataclass
class PretrainResult:
    run_dir: str
    checkpoint: str | None                 # newest checkpoint directory
    model: torch.nn.Module                 # the trained model (unwrapped from DDP)
    tokenizer: Tokenizer
    finished: bool                         # False when run.stop_at_step ended the run early
    passkey: dict | None = None            # passkey_probe() result
    passkey_paths: dict = field(default_factory=dict)
    metrics_path: str = ""


def stage_corpus(cfg: TrainConfig, stage):
    if cfg.data.source == "synthetic":
        return SyntheticCorpus(seed=cfg.run.seed, mix=stage.mix or None, split="train",
                               passkey_chars=(stage.passkey_min_chars, stage.passkey_max_chars),
                               num_people=cfg.data.num_people)
    return FileCorpus(cfg.data.paths, cfg.data.text_field, cfg.data.txt_mode, skip=cfg.data.heldout_docs)


def heldout_texts(cfg: TrainConfig) -> list[str]:
    n = cfg.data.heldout_docs
    if n == 0:
        return []
    if cfg.data.source == "synthetic":
        first = cfg.stages[0]
        corpus = SyntheticCorpus(seed=cfg.run.seed, mix=first.mix or None, split="heldout",
                                 passkey_chars=(first.passkey_min_chars, first.passkey_max_chars),
                                 num_people=cfg.data.num_people)
        return [corpus[i] for i in range(n)]
    return list(FileCorpus(cfg.data.paths, cfg.data.text_field, cfg.data.txt_mode, limit=n).iter_from(0))


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def _stage_batches(cfg: TrainConfig, si: int, rt: Runtime, tokenizer: Tokenizer) -> tuple[ShardedBatches, int]:
    stage = cfg.stages[si]
    micro = stage.micro_batch_tokens or stage.seq_len
    global_tokens = stage.global_batch_tokens or micro * rt.world
    if global_tokens % (micro * rt.world):
        raise ValueError(f"stages.{si}.global_batch_tokens ({global_tokens}) must be a multiple of "
                         f"micro_batch_tokens x world size ({micro} x {rt.world})")
    stream = PackedStream(stage_corpus(cfg, stage), tokenizer, stage.seq_len)
    batches = ShardedBatches(stream, global_tokens // stage.seq_len, micro // stage.seq_len, rt.rank, rt.world,
                             cfg.data.document_boundaries)
    return batches, global_tokens


def run_pretraining(cfg: TrainConfig) -> PretrainResult:
    rt = init_runtime(cfg.run)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.byte_vocab_size)
    if cfg.eval.passkey:
        check_passkey_lengths(tokenizer, cfg.eval.passkey_lengths)  # fail before training, not after
    run_dir = cfg.run_dir
    resume_from = latest_checkpoint(run_dir) if cfg.checkpoint.resume else None
    if rt.is_main:
        os.makedirs(run_dir, exist_ok=True)
        if not cfg.checkpoint.resume and os.path.isdir(checkpoint_root(run_dir)):
            print(f"[train] starting run {cfg.run.name!r} over: removing its earlier checkpoints", flush=True)
            shutil.rmtree(checkpoint_root(run_dir))
        if cfg.checkpoint.resume and resume_from is None:
            print(f"[train] --resume: no checkpoint in {run_dir}, starting from scratch", flush=True)
        _write_json(os.path.join(run_dir, "config.json"), to_dict(cfg))
    _barrier(rt)

    state = load_trainer_state(resume_from) if resume_from else None
    signature = [[s.name, s.steps, s.seq_len] for s in cfg.stages]
    if state is not None and state["stages"] != signature:
        raise ValueError(f"--resume: checkpoint {resume_from} was written by a run with stages {state['stages']}, "
                         f"this config has {signature} (use another run.name to start a new run)")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    log = MetricsLog(metrics_path, resume_step=state["global_step"] if state else None, enabled=rt.is_main)
    schedule = WarmupCosine(None, cfg.optim.lr, cfg.optim.warmup_steps, cfg.total_steps, cfg.optim.min_lr_ratio)
    peak = cfg.metrics.peak_tflops or (peak_tflops(torch.cuda.get_device_name(rt.device))
                                       if rt.device.type == "cuda" else None)
    eval_rows = heldout_rows(heldout_texts(cfg), tokenizer, cfg.eval.heldout_seq_len or cfg.stages[0].seq_len)
    ckpt_every, keep = cfg.checkpoint.every, cfg.checkpoint.keep_last

    global_step = state["global_step"] if state else 0
    tokens_seen = state["tokens_seen"] if state else 0
    first_stage = state["stage_index"] if state else 0
    carry = state["data"] if state else None
    model = ddp_model = optimizer = None
    progress = Progress(cfg.total_steps, global_step, cfg.metrics.progress and rt.is_main)
    latest = resume_from

    def evaluate_heldout(stage_name: str) -> None:
        if not (cfg.eval.heldout and eval_rows and rt.is_main):
            return
        r = heldout_loss(model, eval_rows, rt.device, cfg.eval.batch_tokens)
        log.write({"kind": "eval", "step": global_step, "stage": stage_name, "heldout_loss": r["loss"],
                   "heldout_ppl": r["ppl"], "heldout_tokens": r["tokens"]})
        progress.write(f"[eval] step {global_step} ({stage_name}): held-out loss {r['loss']:.4f}, ppl {r['ppl']:.3f}")

    def save(si: int, stage_step: int, batches: ShardedBatches, loss: float) -> None:
        nonlocal latest
        if rt.is_main:
            trainer_state = {"global_step": global_step, "stage_index": si, "stage_name": cfg.stages[si].name,
                             "stage_step": stage_step, "tokens_seen": tokens_seen, "loss": loss,
                             "schedule": schedule.state_dict(), "data": batches.state_dict(), "rng": rng_state(),
                             "stages": signature}
            latest = save_checkpoint(run_dir, global_step, model, optimizer, trainer_state, keep,
                                     extra_writer=lambda d: _write_json(os.path.join(d, "tokenizer.json"),
                                                                         describe(tokenizer)))
        _barrier(rt)

    for si in range(first_stage, len(cfg.stages)):
        stage = cfg.stages[si]
        resuming_here = state is not None and si == state["stage_index"]
        if resuming_here and state["stage_step"] >= stage.steps:
            continue  # the checkpoint was written at this stage's end: go on with the next stage
        config = model_config(cfg.model, tokenizer.vocab_size, stage.rope_theta or None)
        if model is None:
            if resume_from:
                model = build_model(config, rt, cfg.run.seed, init_from=os.path.join(resume_from, "model"),
                                    checkpointing=CHECKPOINTING[cfg.model.gradient_checkpointing])
            else:
                model = build_model(config, rt, cfg.run.seed, init_from=cfg.model.init_from,
                                    checkpointing=CHECKPOINTING[cfg.model.gradient_checkpointing])
            optimizer = build_optimizer(model, cfg.optim, rt)
            if resume_from:
                load_optimizer_state(optimizer, resume_from)
            ddp_model = wrap_ddp(model, rt)
        elif model.config.rope_theta != config.rope_theta:
            # New RoPE base: same weights and optimizer state in a model built with the stage's config.
            opt_state = optimizer.state_dict()
            model = build_model(config, rt, cfg.run.seed, state_dict=model.state_dict(),
                                checkpointing=CHECKPOINTING[cfg.model.gradient_checkpointing])
            optimizer = build_optimizer(model, cfg.optim, rt)
            optimizer.load_state_dict(opt_state)
            ddp_model = wrap_ddp(model, rt)
        if global_step == 0:
            evaluate_heldout("init")

        batches, global_tokens = _stage_batches(cfg, si, rt, tokenizer)
        start = 0
        if resuming_here:
            batches.load_state_dict(state["data"])
            start = state["stage_step"]
        elif carry is not None:
            batches.stream.continue_after(carry)
        if state is not None and global_step == state["global_step"]:
            schedule.load_state_dict(state["schedule"])
            set_rng_state(state["rng"])
        if rt.is_main:
            progress.write(f"[train] stage {stage.name!r}: {stage.steps} steps of {global_tokens} tokens "
                           f"(rows of {stage.seq_len}, {batches.accumulation_steps} micro-batches x {rt.world} ranks), "
                           f"RoPE base {model.config.rope_theta:g}")

        window = {"tokens": 0, "time": 0.0, "flops": 0.0, "loss": 0.0, "steps": 0}
        loss = float("nan")
        for k in range(start, stage.steps):
            t0 = time.perf_counter()
            micro = batches.next_step()
            flops = batch_flops(model.config, micro) * rt.world  # ranks hold statistically equal shares
            stats = train_step(ddp_model, optimizer, schedule, micro, cfg.optim.grad_clip, rt)
            dt = time.perf_counter() - t0
            global_step += 1
            tokens_seen += global_tokens
            loss = stats.loss
            for key, value in (("tokens", global_tokens), ("time", dt), ("flops", flops), ("loss", loss), ("steps", 1)):
                window[key] += value
            tps = global_tokens / dt
            progress.update(loss, stats.lr, tps, stage.name)
            last = k + 1 == stage.steps
            if global_step % cfg.metrics.log_every == 0 or last:
                record = {"kind": "train", "step": global_step, "stage": stage.name, "loss": window["loss"] / window["steps"],
                          "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens_seen": tokens_seen,
                          "window_tokens": window["tokens"], "window_time_s": window["time"],
                          "tokens_per_s": window["tokens"] / window["time"]}
                if peak:
                    record["mfu"] = window["flops"] / window["time"] / (peak * 1e12 * rt.world)
                log.write(record)
                window = dict.fromkeys(window, 0)
            if last:
                break
            if cfg.run.stop_at_step and global_step == cfg.run.stop_at_step:
                save(si, k + 1, batches, loss)
                progress.close()
                return PretrainResult(run_dir, latest, model, tokenizer, finished=False, metrics_path=metrics_path)
            if ckpt_every and global_step % ckpt_every == 0:
                save(si, k + 1, batches, loss)
        evaluate_heldout(stage.name)
        save(si, stage.steps, batches, loss)
        carry = batches.state_dict()
        if cfg.run.stop_at_step and global_step == cfg.run.stop_at_step and si + 1 < len(cfg.stages):
            progress.close()
            return PretrainResult(run_dir, latest, model, tokenizer, finished=False, metrics_path=metrics_path)
    progress.close()

    if model is None:  # resumed from a checkpoint written at the very end: load it for the final evaluation
        config = model_config(cfg.model, tokenizer.vocab_size, cfg.stages[-1].rope_theta or None)
        model = build_model(config, rt, cfg.run.seed, init_from=os.path.join(latest, "model"))
    result = PretrainResult(run_dir, latest, model, tokenizer, finished=True, metrics_path=metrics_path)
    if cfg.eval.passkey and rt.is_main:
        result.passkey = passkey_probe(model, tokenizer, cfg.eval.passkey_lengths, cfg.eval.passkey_depths,
                                       cfg.eval.passkey_trials, cfg.run.seed, cfg.eval.batch_tokens)
        result.passkey_paths = write_passkey(result.passkey, os.path.join(run_dir, "eval"))
        means = {str(n): sum(a) / len(a) for n, a in zip(result.passkey["lengths"], result.passkey["accuracy"])}
        log.write({"kind": "eval", "step": global_step, "stage": cfg.stages[-1].name, "passkey_accuracy": means})
    _barrier(rt)
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(sys.argv[1:] if argv is None else argv)
    result = run_pretraining(cfg)
    if result.checkpoint and int(os.environ.get("RANK", "0")) == 0:
        print(f"[train] checkpoint: {result.checkpoint}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
