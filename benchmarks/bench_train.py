"""The trainer's optimizer step on the ``1_8b`` config, fed by the real data path, beside transformers eager.

What runs for ours is ``train.trainer.Trainer.step`` with the pretraining stage's loss: bf16 parameters with fp32
master weights in FusedAdamW,
global-batch token normalization, grad-norm clipping and the LR schedule, over packed rows from the embedded corpus
(per-document attention via cu_seqlens). Cases, as InternLM2's two pretraining stages:
    4k:   8192 tokens per step = 2 rows of 4096 (first stage; documents up to 4k tokens)
    32k:  32768 tokens per step = 1 row of 32768 (long-context stage; passkey documents up to 32k tokens),
          with the SwiGLU output recomputed in backward (gradient_checkpointing="mlp") to fit 80 GB
The peer is transformers' LlamaForCausalLM (eager + SDPA, torch fused AdamW on bf16 weights, no master copy) on one
sequence of the same number of tokens, as in ../shared/anchors/e2e_gpu.py (30,426 tokens/s on an H200 at 8192).
The goal at 8192 tokens: >= 1.35x the peer. The 32k case also records ``drop_vs_4k``: 1 - tokens/s(32k) /
tokens/s(4k) of ours (InternLM2 reports about 40%). MFU counts each document's own attention (the model's
``flops_per_token``) against the card's dense bf16 peak. On CPU only the micro preset runs (plumbing check).
"""
from __future__ import annotations

import dataclasses
import tempfile

import pytest
import torch

from benchmarks.common import OURS, device, record
from models import InternLM2Config
from models.checkpoint import llama_config_dict
from train.build import batch_flops, build_model, model_config
from train.config import CheckpointConfig, MetricsConfig, ModelConfig, OptimConfig
from train.corpus import SyntheticCorpus
from train.data import PackedStream, ShardedBatches
from train.metrics import peak_tflops
from train.parallel import Runtime
from train.pretrain import causal_lm_loss
from train.tokenizer import ByteTokenizer
from train.trainer import Stage, Trainer

PEER = "transformers-llama-sdpa"
MIX = {"facts": 1.0, "arithmetic": 1.0, "copy": 0.4, "reverse": 0.4, "sort": 0.4, "passkey": 1.6}
# case: (preset, tokens per step, seq_len, passkey doc chars (min, max), checkpointing, GPU only)
CASES = {
    "1_8b-4k": ("1_8b", 8192, 4096, (256, 4096), False, True),
    "1_8b-32k": ("1_8b", 32768, 32768, (4096, 32768), "mlp", True),
    "micro-cpu": ("micro", 256, 64, (32, 64), False, False),
}
_ours_tokens_per_s: dict[str, float] = {}


def _vocab(preset: str) -> int:
    """InternLM2's vocabulary for the real sizes; the byte tokenizer's small one for the CPU case."""
    return 272 if preset == "micro" else 92544


class _SameBatches:
    """The same micro-batches every step (a data source that costs nothing)."""

    def __init__(self, micro, tokens):
        self.micro, self.tokens_per_step = micro, tokens

    def next_step(self):
        return self.micro

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _ours(preset, tokens, seq_len, passkey_chars, checkpointing, dev):
    rt = Runtime(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    tok = ByteTokenizer(_vocab(preset))
    config = model_config(ModelConfig(preset=preset), tok.vocab_size)
    model = build_model(config, rt, seed=0, checkpointing=checkpointing)
    stream = PackedStream(SyntheticCorpus(mix=MIX, passkey_chars=passkey_chars), tok, seq_len)
    micro = ShardedBatches(stream, tokens // seq_len, tokens // seq_len).next_step()
    trainer = Trainer(model, rt, optim=OptimConfig(warmup_steps=10), checkpoint=CheckpointConfig(),
                      metrics=MetricsConfig(progress=False), run_dir=tempfile.mkdtemp(prefix="bench_train_"),
                      total_steps=10**6)
    stage = Stage("bench", 10**6, _SameBatches(micro, tokens), causal_lm_loss)

    def step():
        trainer.step(stage)

    note = f"{tokens // seq_len} row(s) of {seq_len}, {len(micro[0].cu_seqlens) - 1} documents, per-document attention"
    return model, step, batch_flops(config, micro), note, config


def _peer(config: InternLM2Config, tokens: int, dev):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_cfg = LlamaConfig.from_dict(llama_config_dict(config), attn_implementation="sdpa")
    with torch.device(dev):
        model = LlamaForCausalLM(llama_cfg).to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev.type == "cuda")
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=dev)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, tokens * config.flops_per_token(tokens), "one sequence, no document mask"


@pytest.mark.parametrize("impl", [OURS, PEER])
@pytest.mark.parametrize("case", list(CASES))
def test_trainer_step(benchmark, case, impl):
    preset, tokens, seq_len, passkey_chars, checkpointing, gpu_only = CASES[case]
    dev = device()
    if gpu_only != (dev.type == "cuda"):
        pytest.skip("GPU case: runs in benchmarks/gpu_check.sh" if gpu_only else "CPU plumbing case")
    torch.manual_seed(0)
    model = step = None
    try:
        if impl == OURS:
            model, step, flops, note, config = _ours(preset, tokens, seq_len, passkey_chars, checkpointing, dev)
        else:
            config = dataclasses.replace(InternLM2Config.preset(preset), vocab_size=_vocab(preset))
            model, step, flops, note = _peer(config, tokens, dev)
        step()  # first step: kernel compilation, optimizer state
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tokens_per_s = record(benchmark, step, group=f"trainer step {preset} ({tokens} tokens/step)", impl=impl,
                              metric="tokens/s", work=tokens, unit_scale=1.0, note=note,
                              checkpointing=str(checkpointing))
    except torch.OutOfMemoryError:
        pytest.skip(f"{impl} runs out of GPU memory at {tokens} tokens per step")
    finally:
        del model, step
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if dev.type == "cuda":
        benchmark.extra_info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = peak_tflops(torch.cuda.get_device_name())
        if peak:
            benchmark.extra_info["mfu"] = flops / tokens * tokens_per_s / (peak * 1e12)
    if impl == OURS:
        _ours_tokens_per_s[case] = tokens_per_s
        if case.endswith("32k") and case.replace("32k", "4k") in _ours_tokens_per_s:
            benchmark.extra_info["drop_vs_4k"] = 1.0 - tokens_per_s / _ours_tokens_per_s[case.replace("32k", "4k")]
