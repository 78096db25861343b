"""One training step (forward + backward + AdamW) of InternLM2 on internlm_kernels beside transformers'
LlamaForCausalLM (eager + SDPA, the peer of ../shared/anchors/e2e_gpu.py) at the same shape, in the same run.

Shapes (GPU): the ``1_8b`` preset and a 4-layer ``7b``-shaped slice at 8192 tokens per step, bf16 weights. Ours packs
the tokens as documents (lengths below) with per-document attention, the real pretraining workload; the peer runs one
8192-token sequence attending across it, as in the anchor (more attention FLOPs, no packing mask). Both update bf16
weights with a fused AdamW holding bf16 state (ours: ik.FusedAdamW without master weights; the peer: torch AdamW
fused=True), so weights, gradients and optimizer state take the same bytes and the memory figures compare the
activations and the loss.

A third case runs ours with ``gradient_checkpointing="mlp"`` (the SwiGLU output recomputed in backward instead of
kept), the cheap memory saving. Recorded per case: tokens/s (the figure), MFU, peak memory, parameter count.
MFU counts each document's own attention: FLOPs = Σ_docs len · config.flops_per_token(len) (6·N + 6·layers·heads·head_dim·len per token), against
the card's dense bf16 peak (989 TFLOP/s on H100/H200). On CPU only a micro-sized case runs (plumbing check).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import internlm_kernels as ik
from benchmarks.common import OURS, device, record
from models import InternLM2Config, InternLM2ForCausalLM
from models.checkpoint import llama_config_dict

PEER = "transformers-llama-sdpa"
OURS_MLP_RECOMPUTE = "internlm_kernels+mlp-recompute"   # gradient_checkpointing="mlp": SwiGLU output recomputed
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
DOCS_8K = (4096, 2048, 1024, 512, 256, 128, 128)       # 7 documents, 8192 tokens (anchors' 128..4096 mix)

SHAPES = {
    # name: (preset, layer override, document lengths, dtype, GPU only)
    "1_8b-8k": ("1_8b", None, DOCS_8K, torch.bfloat16, True),
    "7b-4layers-8k": ("7b", 4, DOCS_8K, torch.bfloat16, True),
    "micro-cpu": ("micro", None, (40, 17, 71), torch.float32, False),
}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)


def build_ours(config: InternLM2Config, docs, dtype, dev, checkpointing):
    with torch.device(dev):
        model = InternLM2ForCausalLM(config).to(dtype)
    model.gradient_checkpointing = checkpointing
    opt = ik.FusedAdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, master_weights=False)
    ids = torch.randint(0, config.vocab_size, (sum(docs),), device=dev)
    cu = torch.tensor((0,) + tuple(torch.tensor(docs).cumsum(0).tolist()), dtype=torch.int32, device=dev)

    def step():
        loss = model(ids, cu_seqlens=cu, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = sum(n * config.flops_per_token(n) for n in docs)
    return model, step, flops


def build_peer(config: InternLM2Config, tokens: int, dtype, dev):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_cfg = LlamaConfig.from_dict(llama_config_dict(config), attn_implementation="sdpa")
    with torch.device(dev):
        model = LlamaForCausalLM(llama_cfg).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev.type == "cuda")
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=dev)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, tokens * config.flops_per_token(tokens)


@pytest.mark.parametrize("impl", [OURS, OURS_MLP_RECOMPUTE, PEER])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_train_step(benchmark, shape, impl):
    preset, layers, docs, dtype, gpu_only = SHAPES[shape]
    dev = device()
    if gpu_only and dev.type != "cuda":
        pytest.skip("GPU shape: runs in benchmarks/gpu_check.sh")
    if not gpu_only and dev.type == "cuda":
        pytest.skip("CPU plumbing case")
    config = InternLM2Config.preset(preset)
    if layers is not None:
        config = dataclasses.replace(config, num_hidden_layers=layers)
    tokens = sum(docs)
    torch.manual_seed(0)
    if impl in (OURS, OURS_MLP_RECOMPUTE):
        checkpointing = "mlp" if impl == OURS_MLP_RECOMPUTE else False
        model, step, flops = build_ours(config, docs, dtype, dev, checkpointing)
        note = f"{len(docs)} documents, per-document attention"
    else:
        model, step, flops = build_peer(config, tokens, dtype, dev)
        note = "one sequence, no document mask"
    step()                                                   # first step: kernel compilation, optimizer state
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tokens_per_s = record(benchmark, step, group=f"train step {shape} ({tokens} tokens)", impl=impl,
                          metric="tokens/s", work=tokens, unit_scale=1.0, note=note,
                          params=sum(p.numel() for p in model.parameters()))
    peak = peak_flops()
    if peak is not None:
        benchmark.extra_info["mfu"] = flops * tokens_per_s / tokens / peak
    if dev.type == "cuda":
        benchmark.extra_info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, step
    if dev.type == "cuda":
        torch.cuda.empty_cache()
