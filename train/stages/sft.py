"""Supervised fine-tuning (InternLM2's SFT) as one stage on the Trainer.

    python -m train.stages.sft --config configs/sft_tiny.toml [--resume] [--section.key=value ...]
    torchrun --nproc_per_node 8 -m train.stages.sft --config configs/sft_7b.toml

Starts from a pretraining checkpoint (``sft.init_from``: an HF model directory or a pretraining run directory).
Data: conversations in InternLM2-chat's format (``train.data.chat``; OpenAI-style jsonl or the embedded synthetic set),
loss on assistant tokens only, each conversation one document in ``cu_seqlens``, micro-batches packed with whole
conversations up to ``stages.0.micro_batch_tokens`` (``train.data.items``; over-long conversations dropped or
truncated by ``sft.overlong`` and counted), a ``sft.long_context_mix`` share of pretraining documents. Schedule:
warmup + cosine (``[optim]``; InternLM2: AdamW at 4e-5, one epoch). Evaluation before and after: held-out
assistant-token loss, exact match on verifiable conversations, tool-call format validity (``train.eval.chat``).
The stage ends with a transformers-loadable export (``LlamaForCausalLM`` layout) under the checkpoint's ``model/``.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from train.build import batch_flops, build_model, model_config
from train.config import CHECKPOINTING, ConfigError, repo_config, to_dict
from train.data.chat import Conversation, SyntheticChats, read_conversations
from train.data.corpus import SyntheticCorpus
from train.data.items import ItemBatches, budget_groups, collate_items
from train.data.packing import FileCorpus
from train.data.sft_items import SFTItems
from train.data.tokenizer import Tokenizer, load_tokenizer, write_checkpoint_tokenizer
from train.eval.chat import chat_eval
from train.parallel import ParallelDims, barrier, init_runtime
from train.stages.align_config import SFTConfig, parse_sft_cli, resolve_init, stage_geometry
from train.stages.pretrain import causal_lm_loss
from train.trainer import Stage, Trainer

DEFAULT_CONFIG = repo_config("sft_tiny.toml")
LONG_CONTEXT_FILE_DOCS = 100_000   # data files: the long-context mix draws from (at most) this many documents, in memory


def conversations(cfg: SFTConfig) -> tuple[object, list[Conversation]]:
    """(training conversations: a random-access stream or a list, held-out conversations)."""
    s = cfg.sft
    if s.conversations == "synthetic":
        held = SyntheticChats(cfg.run.seed, "heldout", s.tasks, cfg.data.num_people)
        return (SyntheticChats(cfg.run.seed, "train", s.tasks, cfg.data.num_people),
                [held[i] for i in range(s.heldout)])
    convs = read_conversations(s.conversations)
    if len(convs) <= s.heldout:
        raise ValueError(f"sft.heldout ({s.heldout}) leaves no training conversations of {len(convs)} in "
                         f"{s.conversations}")
    return convs[s.heldout:], convs[:s.heldout]


def pretraining_documents(cfg: SFTConfig):
    """document(i) for the long-context mix: the synthetic corpus with the stage's mix, or the data files."""
    stage = cfg.stages[0]
    if cfg.data.source == "synthetic":
        corpus = SyntheticCorpus(seed=cfg.run.seed, mix=stage.mix or None, split="train",
                                 passkey_chars=(stage.passkey_min_chars, stage.passkey_max_chars),
                                 num_people=cfg.data.num_people)
        return corpus.__getitem__
    docs = list(FileCorpus(cfg.data.paths, cfg.data.text_field, cfg.data.txt_mode, skip=cfg.data.heldout_docs,
                           limit=LONG_CONTEXT_FILE_DOCS).iter_from(0))
    return lambda i: docs[i % len(docs)]


@torch.no_grad()
def heldout_assistant_loss(model, items, device, batch_tokens: int) -> float:
    """Assistant-token cross-entropy over the held-out conversations (nats per target token)."""
    model = getattr(model, "module", model)
    total, targets = 0.0, 0
    for group in budget_groups(items, batch_tokens):
        loss, n, _ = causal_lm_loss(model, collate_items(group).to(device))
        total += float(loss)
        targets += n
    return total / max(targets, 1)


def gathered_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` when it holds its parameters as plain tensors; else an unsharded copy built from its full state
    (tensor parallel or FSDP: DTensor parameters gathered; collective, every rank calls). Generation runs on it:
    a decoding step of a sharded model would be a collective forward whose shapes the sharding plan does not take
    (one token per sequence, a KV cache of all heads)."""
    from torch.distributed.tensor import DTensor

    from internlm_kernels.distributed.tensor_parallel import full_state_dict
    from models import InternLM2ForCausalLM

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model
    state = full_state_dict(model)
    with torch.device("meta"):     # the plain class: FSDP2 swaps the module's class for a wrapper subclass
        copy = InternLM2ForCausalLM(model.config)
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.eval()


def sft_evaluator(cfg: SFTConfig, tokenizer: Tokenizer, held: list[Conversation], device):
    """Runs on every rank. The held-out loss runs on the live model first (under tensor parallelism a collective
    forward; under ZeRO it also finishes the pending parameter all-gathers before the state is read), then the
    replies are generated by ``gathered_model``: every rank the same greedy replies, as with replicated models."""
    held_items = [SFTItems(held, tokenizer)(i) for i in range(len(held))]

    def evaluate(model) -> dict:
        loss = heldout_assistant_loss(model, held_items, device, cfg.eval.batch_tokens)
        r = chat_eval(gathered_model(model), tokenizer, held, cfg.sft.eval_max_new_tokens)
        out = {"heldout_loss": loss, "exact_match": r["exact_match"]}
        out.update({f"em_{task}": right / total for task, (right, total) in r["by_task"].items()})
        if r["tool_call_valid"] is not None:
            out["tool_call_valid"], out["tool_call_exact"] = r["tool_call_valid"], r["tool_call_exact"]
        evaluate.last = r
        return out
    evaluate.last = None
    return evaluate


def sft_batches(cfg: SFTConfig, items: SFTItems, dims: ParallelDims) -> ItemBatches:
    """This rank's steps of whole-conversation micro-batches: split over the data-parallel ranks (the tp ranks of
    one data-parallel group train on the same micro-batches)."""
    seq_len, micro, accumulation = stage_geometry(cfg, dims.dp, seqs_per_item=1)
    return ItemBatches(items, micro, seq_len, accumulation, cfg.sft.overlong, dims.dp_rank, dims.dp, where="sft")


@dataclass
class SFTResult:
    run_dir: str
    checkpoint: str | None
    model: torch.nn.Module
    tokenizer: Tokenizer
    finished: bool
    metrics_path: str
    init_from: str
    data: dict = field(default_factory=dict)            # the data stream's counters (items, dropped, truncated)
    eval: dict | None = None                            # chat_eval() after training (examples included)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def run_sft(cfg: SFTConfig) -> SFTResult:
    rt = init_runtime(cfg.run, cfg.parallel)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.byte_vocab_size)
    init_from = resolve_init(cfg.sft.init_from, "sft.init_from")
    stage_cfg = cfg.stages[0]
    model = build_model(model_config(cfg.model, tokenizer.vocab_size, stage_cfg.rope_theta or None), rt,
                        cfg.run.seed, init_from=init_from,
                        checkpointing=CHECKPOINTING[cfg.model.gradient_checkpointing])
    train_convs, held = conversations(cfg)
    documents = pretraining_documents(cfg) if cfg.sft.long_context_mix > 0 else None
    items = SFTItems(train_convs, tokenizer, cfg.sft.long_context_mix, documents, cfg.run.seed)
    batches = sft_batches(cfg, items, rt.dims)
    seq_len, micro, accumulation = batches.max_seq_len, batches.budget, batches.accumulation
    evaluator = sft_evaluator(cfg, tokenizer, held, rt.device)
    stage = Stage(stage_cfg.name, stage_cfg.steps, batches, causal_lm_loss, evaluator=evaluator,
                  flops=lambda micro_batches: batch_flops(model.config, micro_batches),
                  describe=f" (whole conversations up to {micro} tokens per micro-batch, {accumulation} micro-batches"
                           f" x {rt.dims.dp} data-parallel ranks, long-context mix {cfg.sft.long_context_mix:g}, from "
                           f"{init_from or 'random init'})")
    trainer = Trainer(model, rt, optim=cfg.optim, checkpoint=cfg.checkpoint, metrics=cfg.metrics,
                      run_dir=cfg.run_dir, total_steps=stage_cfg.steps,
                      signature=["sft", stage_cfg.name, stage_cfg.steps, seq_len], stop_at_step=cfg.run.stop_at_step,
                      extra_writer=lambda d: write_checkpoint_tokenizer(tokenizer, d),
                      export_layout="llama")
    if rt.is_main:
        _write_json(os.path.join(cfg.run_dir, "config.json"), to_dict(cfg))
    start_step = trainer.state.global_step        # > 0 when resumed
    finished = trainer.train(stage)
    trained = trainer.state.global_step > start_step
    trainer.close()
    counters = batches.state_dict()
    if rt.is_main and finished and trained:      # once per run (a resumed finished run trains nothing)
        trainer.log.write({"kind": "data", "step": trainer.state.global_step, "stage": stage_cfg.name, **counters})
    barrier(rt.dims)
    if finished and evaluator.last is None:       # a resumed finished run: evaluate for the report
        model.eval()
        evaluator(model)
    return SFTResult(cfg.run_dir, trainer.latest, model, tokenizer, finished, trainer.metrics_path, init_from,
                     counters, evaluator.last if finished else None)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_sft_cli(sys.argv[1:] if argv is None else argv, DEFAULT_CONFIG)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_sft(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    state = "finished" if result.finished else f"stopped at step {cfg.run.stop_at_step} (continue with --resume)"
    print(f"[sft] {state}; checkpoint {result.checkpoint}; data {result.data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
