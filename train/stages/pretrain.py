"""Pretraining: the stages of a config run one after another on one model, optimizer and LR schedule.

InternLM2's recipe, scaled by the config: a first stage of packed documents at a short context (4k in the paper,
with the RoPE base at 50,000), then a long-context stage with longer packed rows and the base raised to 1,000,000.
Each stage is a ``train.trainer.Stage`` on one ``Trainer``: packed documents, the causal-LM loss, held-out
perplexity; a stage whose ``rope_theta`` differs from the model's sets the new base on the same weights before its
first step (``set_rope_theta``), so optimizer state and the schedule carry over.

Around the stages: held-out perplexity before training and after each stage, checkpoints (every N steps, at each
stage end, and at ``run.stop_at_step``), and the passkey probe after the last stage. ``--resume`` continues from
the newest checkpoint of the run directory with the same losses as an uninterrupted run.

    python -m train.stages.pretrain --config configs/tiny_cpu.toml [--resume] [--section.key=value ...]
    torchrun --nproc_per_node 8 -m train.stages.pretrain --config configs/internlm2_1_8b.toml
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch

from train.build import batch_flops, build_model, model_config
from train.config import CHECKPOINTING, TrainConfig, parse_cli
from train.data.corpus import SyntheticCorpus
from train.data.packing import Batch, FileCorpus, PackedStream, ShardedBatches
from train.data.tokenizer import Tokenizer, load_tokenizer
from train.eval.pretrain import (
    check_passkey_lengths,
    heldout_loss,
    heldout_rows,
    passkey_means,
    passkey_probe,
    write_passkey,
)
from train.parallel import Runtime, barrier, init_runtime
from train.stages.runner import stage_main, stage_trainer
from train.trainer import Stage


@dataclass
class PretrainResult:
    run_dir: str
    checkpoint: str | None                 # newest checkpoint directory
    model: torch.nn.Module                 # the trained model (unwrapped from DDP)
    tokenizer: Tokenizer
    finished: bool                         # False when run.stop_at_step ended the run early
    passkey: dict | None = None            # passkey_probe() result after the last stage
    passkey_before_last: dict | None = None  # the same probe after the stage before the last (the short-context model)
    passkey_paths: dict = field(default_factory=dict)
    metrics_path: str = ""


def stage_corpus(cfg: TrainConfig, stage, tokenizer: Tokenizer | None = None):
    if cfg.data.source == "synthetic":
        return SyntheticCorpus(seed=cfg.run.seed, mix=stage.mix or None, split="train",
                               passkey_chars=(stage.passkey_min_chars, stage.passkey_max_chars),
                               num_people=cfg.data.num_people, tokenizer=tokenizer,
                               induction_chars=(stage.induction_min_chars, stage.induction_max_chars))
    return FileCorpus(cfg.data.paths, cfg.data.text_field, cfg.data.txt_mode, skip=cfg.data.heldout_docs)


def heldout_texts(cfg: TrainConfig) -> list[str]:
    n = cfg.data.heldout_docs
    if n == 0:
        return []
    if cfg.data.source == "synthetic":
        # Every stage's tasks (a curriculum's first stage may train a single task); passkey documents of the
        # first stage's lengths, as the held-out rows are packed at its seq_len.
        first = cfg.stages[0]
        mix: dict[str, float] = {}
        for stage in cfg.stages:
            for task, weight in stage.mix.items():
                mix[task] = mix.get(task, 0.0) + weight
        corpus = SyntheticCorpus(seed=cfg.run.seed, mix=mix or None, split="heldout",
                                 passkey_chars=(first.passkey_min_chars, first.passkey_max_chars),
                                 num_people=cfg.data.num_people)
        return [corpus[i] for i in range(n)]
    return list(FileCorpus(cfg.data.paths, cfg.data.text_field, cfg.data.txt_mode, limit=n).iter_from(0))


def causal_lm_loss(model: torch.nn.Module, batch: Batch):
    """Summed next-token cross-entropy over the batch's labels (-100: no loss), its target count (known on the
    host), no extra metrics."""
    out = model(batch.input_ids, batch.cu_seqlens, max_seqlen=batch.max_seqlen, labels=batch.labels,
                loss_reduction="sum")
    return out.loss, batch.num_targets, {}


def stage_batches(cfg: TrainConfig, si: int, rt: Runtime, tokenizer: Tokenizer) -> ShardedBatches:
    stage = cfg.stages[si]
    micro = stage.micro_batch_tokens or stage.seq_len
    dp = rt.dims.dp    # data-parallel ranks: the tp ranks of a group train on the same micro-batches
    global_tokens = stage.global_batch_tokens or micro * dp
    if global_tokens % (micro * dp):
        raise ValueError(f"stages.{si}.global_batch_tokens ({global_tokens}) must be a multiple of "
                         f"micro_batch_tokens x data-parallel ranks ({micro} x {dp})")
    stream = PackedStream(stage_corpus(cfg, stage, tokenizer), tokenizer, stage.seq_len, packing=cfg.data.packing)
    return ShardedBatches(stream, global_tokens // stage.seq_len, micro // stage.seq_len, rt.dims.dp_rank, dp,
                          cfg.data.document_boundaries)


def pretraining_stages(cfg: TrainConfig, rt: Runtime, tokenizer: Tokenizer, model: torch.nn.Module) -> list[Stage]:
    """The config's stages as Trainer stages: packed documents, the causal-LM loss, held-out perplexity, and
    each stage's RoPE base set before its first step."""
    eval_rows = heldout_rows(heldout_texts(cfg), tokenizer, cfg.eval.heldout_seq_len or cfg.stages[0].seq_len)

    def heldout(model) -> dict:
        r = heldout_loss(model, eval_rows, rt.device, cfg.eval.batch_tokens)
        return {"heldout_loss": r["loss"], "heldout_ppl": r["ppl"], "heldout_tokens": r["tokens"]}

    stages = []
    for si, s in enumerate(cfg.stages):
        batches = stage_batches(cfg, si, rt, tokenizer)
        theta = s.rope_theta or None

        def prepare(model, theta=theta):
            if theta and model.config.rope_theta != theta:
                model.set_rope_theta(theta)

        stages.append(Stage(s.name, s.steps, batches, causal_lm_loss,
                            evaluator=heldout if cfg.eval.heldout and eval_rows else None, prepare=prepare,
                            flops=lambda micro: batch_flops(model.config, micro),
                            describe=f" (rows of {s.seq_len}, {batches.accumulation_steps} micro-batches x "
                                     f"{rt.dims.dp} data-parallel ranks), RoPE base {theta or 'of the model'}"))
    return stages


def run_pretraining(cfg: TrainConfig) -> PretrainResult:
    rt = init_runtime(cfg.run, cfg.parallel)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.byte_vocab_size)
    if cfg.eval.passkey:
        check_passkey_lengths(tokenizer, cfg.eval.passkey_lengths)  # fail before training, not after
    config = model_config(cfg.model, tokenizer.vocab_size, cfg.stages[0].rope_theta or None)
    model = build_model(config, rt, cfg.run.seed, init_from=cfg.model.init_from,
                        checkpointing=CHECKPOINTING[cfg.model.gradient_checkpointing], compile=cfg.model.compile)
    stages = pretraining_stages(cfg, rt, tokenizer, model)
    trainer = stage_trainer(cfg, rt, model, tokenizer, total_steps=cfg.total_steps,
                            signature=[[s.name, s.steps, s.seq_len] for s in cfg.stages])

    def probe(stage_name: str, out_dir: str) -> dict | None:
        """The passkey probe on the model as it is now, logged as an eval line of the stage: rank 0 alone
        generates, on the plain model (a gathered copy when the model is sharded: every rank gathers)."""
        if not cfg.eval.passkey:
            return None
        net = trainer.parallel.plain_model()
        if not rt.is_main:
            return None
        out = passkey_probe(net, tokenizer, cfg.eval.passkey_lengths, cfg.eval.passkey_depths,
                            cfg.eval.passkey_trials, cfg.run.seed, cfg.eval.batch_tokens)
        out["paths"] = write_passkey(out, out_dir)
        trainer.log.write({"kind": "eval", "step": trainer.state.global_step, "stage": stage_name,
                           "passkey_accuracy": passkey_means(out)})
        return out

    before_last = None
    for i, stage in enumerate(stages):
        if not trainer.train(stage) or (trainer.stopped and i + 1 < len(stages)):
            trainer.close()
            return PretrainResult(cfg.run_dir, trainer.latest, model, tokenizer, finished=False,
                                  metrics_path=trainer.metrics_path)
        if i == len(stages) - 2:
            # The short-context model, before the long stage raises the RoPE base: the long stage's effect is
            # the difference of the two probes.
            before_last = probe(stage.name, os.path.join(cfg.run_dir, "eval", stage.name))
            barrier(rt.dims)
    trainer.close()
    result = PretrainResult(cfg.run_dir, trainer.latest, model, tokenizer, finished=True,
                            metrics_path=trainer.metrics_path, passkey_before_last=before_last)
    result.passkey = probe(cfg.stages[-1].name, os.path.join(cfg.run_dir, "eval"))
    if result.passkey is not None:
        result.passkey_paths = result.passkey.pop("paths")
    barrier(rt.dims)
    return result


def _report(cfg: TrainConfig, result: PretrainResult) -> None:
    if result.checkpoint and int(os.environ.get("RANK", "0")) == 0:
        print(f"[train] checkpoint: {result.checkpoint}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, parse_cli, run_pretraining, _report)


if __name__ == "__main__":
    sys.exit(main())
