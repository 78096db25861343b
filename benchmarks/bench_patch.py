"""A transformers Llama training step (forward + backward) patched with ours, beside Liger's patch and the
unpatched model, in the same run: tokens/s and peak memory.

GPU: a ~0.4B Llama in bf16 (hidden 2048, 8 layers, GQA 16/8, vocab 92544, 2 × 4096 tokens). ``unpatched`` is
transformers with sdpa attention (logits materialized, fp32 upcast in its loss); ``internlm_kernels`` is
``ik.integrations.transformers.patch(model)`` (norms with fused residual, RoPE, SwiGLU, fused linear CE, our
varlen attention); ``liger`` is ``apply_liger_kernel_to_llama(model=model)`` (norms, RoPE, SwiGLU, fused linear CE;
sdpa attention, as Liger brings none). Peak memory is torch.cuda.max_memory_allocated over one step.

CPU: a small Llama in fp32 (hidden 64, 2 layers, vocab 32000, 1024 tokens), unpatched vs patched with only the loss on our Triton
kernel (interpreted; every other op takes the auto backend, i.e. the same plain-torch math as the unpatched model),
so the difference is the logits never being materialized. Peak memory is read from the profiler's memory records
(torch.profiler with profile_memory: the largest net allocation since the step began). No tokens/s figure on CPU:
the interpreter is a test harness, not a speed.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # The CPU memory figure runs the loss kernel under Triton's interpreter, with the test setup's patches for the
    # interpreter's own defects (tests/conftest.py: triton-lang/triton#9171, #11584).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import conftest  # noqa: E402, F401
from common import OURS, card_name, peer_available, record  # noqa: E402

import internlm_kernels as ik  # noqa: E402

transformers = pytest.importorskip("transformers")
from internlm_kernels.integrations import transformers as ik_hf  # noqa: E402

ON_GPU = torch.cuda.is_available()
# Order matters: Liger's patch changes transformers' Llama module for the rest of the process, so it runs last.
IMPLS = ["unpatched", OURS, "liger"]
if ON_GPU:
    CONFIG = dict(vocab_size=92544, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096)
    BATCH, SEQ, DTYPE = 2, 4096, torch.bfloat16
else:
    CONFIG = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    BATCH, SEQ, DTYPE = 1, 1024, torch.float32
GROUP = f"llama {CONFIG['hidden_size']}x{CONFIG['num_hidden_layers']} vocab {CONFIG['vocab_size']} " \
        f"{BATCH}x{SEQ} {str(DTYPE).replace('torch.', '')} train step"


def build(impl: str):
    dev = "cuda" if ON_GPU else "cpu"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=DTYPE).to(dev)
    if impl == OURS:
        ik_hf.patch(model)
    elif impl == "liger":
        if not (ON_GPU and peer_available("liger_kernel")):
            pytest.skip("Liger's Triton kernels run only on CUDA (the wheel is installed on GPU machines)")
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), device=dev)

    def train_step(tokens=SEQ):
        model(input_ids=ids[:, :tokens], labels=ids[:, :tokens]).loss.backward()
    return model, train_step


def cpu_peak_bytes(fn) -> int:
    """Peak memory fn() adds, from the profiler's memory records (profile_memory=True): every CPU allocation (+) and
    free (-) in time order; the peak is the largest running sum since fn() began. (The memory-timeline view,
    ``_memory_profile()``, needs with_stack=True, whose Python tracer records every call of Triton's interpreter
    and runs out of memory here.)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    peak = total = 0
    for _, nbytes in records:
        total += nbytes
        peak = max(peak, total)
    return peak


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark, impl):
    model, train_step = build(impl)
    try:
        if ON_GPU:
            train_step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            train_step()
            torch.cuda.synchronize()
            peak_gib = torch.cuda.max_memory_allocated() / 2**30
            record(benchmark, train_step, group=GROUP, impl=impl, metric="tokens/s", work=BATCH * SEQ,
                   unit_scale=1.0, peak_memory_gib=round(peak_gib, 3))
        else:
            if impl == "liger":
                pytest.skip("Liger's Triton kernels run only on CUDA")
            backend = {"linear_cross_entropy": "triton"} if impl == OURS else {}
            with ik.use_backend(**backend):
                train_step(16)  # warm-up on a few tokens: lazy initializations, the interpreter's setup
                model.zero_grad(set_to_none=True)
                peak = cpu_peak_bytes(train_step)
            benchmark.pedantic(lambda: None, rounds=1, iterations=1)
            benchmark.extra_info.update(group=GROUP + " (CPU, profiler memory records)", impl=impl,
                                        metric="peak MiB", value=peak / 2**20, card=card_name())
    finally:
        ik_hf.unpatch()
