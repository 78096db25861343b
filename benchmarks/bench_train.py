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
``flops_per_token``) against the card's dense bf16 peak.

CPU mode (what ``make demo`` trains): the ``tiny`` preset in float32, 8 documents × 256 and 4 × 1024 tokens per step
(packed with cu_seqlens for ours, a (documents, length) batch for the peer: the same attention work), forward + backward + grad-norm clip +
optimizer step (ours: FusedAdamW; the peer: torch's AdamW with ``fused=True`` and clip_grad_norm_), with 1 and with
2 torch threads. The goal: ours >= 1.3x the peer's tokens/s at each thread count, under the default ISA and as on an
AVX2-only CPU (``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``, the Makefile's
AVX2_ONLY: MKL and oneDNN ignore ATen's variable); extra_info records the CPU model, the ISA and the cpu GEMM choices, the ratio to the peer
in wall time (``vs_peer_wall``) and in process CPU time (``vs_peer_cpu``: on a loaded machine the wall time is
mostly waiting for a core; at one thread the CPU time is the step's work), and the 1-minute load average.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest
import torch

from benchmarks.common import OURS, device, record, time_interleaved
from models import InternLM2Config
from models.checkpoint import llama_config_dict
from train.build import batch_flops, build_model, model_config
from train.config import CheckpointConfig, MetricsConfig, ModelConfig, OptimConfig
from train.data.corpus import SyntheticCorpus
from train.data.packing import Batch, PackedStream, ShardedBatches
from train.data.tokenizer import ByteTokenizer
from train.metrics import peak_tflops
from train.parallel import Runtime
from train.stages.pretrain import causal_lm_loss
from train.trainer import Stage, Trainer

PEER = "transformers-llama-sdpa"
MIX = {"facts": 1.0, "arithmetic": 1.0, "copy": 0.4, "reverse": 0.4, "sort": 0.4, "passkey": 1.6}
# case: (preset, tokens per step, seq_len, passkey doc chars (min, max), checkpointing, GPU only)
CASES = {
    "1_8b-4k": ("1_8b", 8192, 4096, (256, 4096), False, True),
    "1_8b-32k": ("1_8b", 32768, 32768, (4096, 32768), "mlp", True),
}
# CPU cases: (preset, documents, tokens per document, torch threads)
CPU_CASES = {
    "tiny-cpu-8x256-1t": ("tiny", 8, 256, 1),
    "tiny-cpu-8x256-2t": ("tiny", 8, 256, 2),
    "tiny-cpu-4x1024-1t": ("tiny", 4, 1024, 1),
    "tiny-cpu-4x1024-2t": ("tiny", 4, 1024, 2),
}
CPU_REPS = 9     # alternating rounds per CPU case (seconds per step on a shared 2-core machine)
_ours_tokens_per_s: dict[str, float] = {}


def _vocab(preset: str) -> int:
    """InternLM2's vocabulary for the real sizes; the byte tokenizer's small one for the CPU cases."""
    return 272 if preset in ("micro", "tiny") else 92544


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


def _ours_cpu(preset, ids: torch.Tensor):
    """Trainer.step on the same micro-batch every step: ids (documents, length), one packed sequence per row."""
    rt = Runtime(torch.device("cpu"), torch.float32)
    config = model_config(ModelConfig(preset=preset), _vocab(preset))
    model = build_model(config, rt, seed=0)
    docs, length = ids.shape
    batch = Batch(ids.reshape(-1), ids.reshape(-1), torch.arange(0, (docs + 1) * length, length, dtype=torch.int32),
                  length, docs * (length - 1))
    trainer = Trainer(model, rt, optim=OptimConfig(warmup_steps=10), checkpoint=CheckpointConfig(),
                      metrics=MetricsConfig(progress=False), run_dir=tempfile.mkdtemp(prefix="bench_train_"),
                      total_steps=10**6)
    stage = Stage("bench", 10**6, _SameBatches([batch], ids.numel()), causal_lm_loss)
    return model, lambda: trainer.step(stage)


def _peer_cpu(config: InternLM2Config, ids: torch.Tensor):
    """transformers' LlamaForCausalLM (SDPA) on the (documents, length) batch: forward, backward, clip_grad_norm_,
    torch's fused AdamW."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_dict(llama_config_dict(config), attn_implementation="sdpa"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


_cpu_ms: dict[str, dict[str, tuple[float, float]]] = {}


@pytest.mark.parametrize("impl", [OURS, PEER])
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_trainer_step_cpu(benchmark, case, impl):
    """Both steps are built and timed in alternating rounds by the first test of a case (the development machine
    is shared: load from other processes then lands on both); each test records its own figure and runs its own
    step for pytest-benchmark's report."""
    preset, docs, length, threads = CPU_CASES[case]
    if device().type != "cpu":
        pytest.skip("CPU case (the demo's training step)")
    torch.manual_seed(0)
    ids = torch.randint(0, _vocab(preset), (docs, length))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        config = dataclasses.replace(InternLM2Config.preset(preset), vocab_size=_vocab(preset))
        steps = {OURS: _ours_cpu(preset, ids)[1], PEER: _peer_cpu(config, ids)[1]}
        if case not in _cpu_ms:
            _cpu_ms[case] = time_interleaved(steps, reps=CPU_REPS)
        (wall, cpu), (peer_wall, peer_cpu) = _cpu_ms[case][impl], _cpu_ms[case][PEER]
        record(benchmark, steps[impl], group=f"trainer step {preset} cpu, {threads} thread(s) ({docs} x {length} "
               "tokens)", impl=impl, metric="tokens/s", work=ids.numel(), unit_scale=1.0, ms=wall,
               threads=threads, note=f"{docs} documents of {length} tokens, fp32, timed alternating with the peer",
               cpu_ms=cpu, vs_peer_wall=peer_wall / wall, vs_peer_cpu=peer_cpu / cpu,
               load_average=os.getloadavg()[0])
    finally:
        torch.set_num_threads(before)


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
