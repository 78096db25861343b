"""Generation throughput: the continuous-batching generator (models.serving) beside transformers' generate, same
model weights, same run.

GPU: the ``1_8b`` shape (random weights, bf16), 64 prompts of 512 tokens, 512 new tokens each, greedy, no stop
token (every sequence runs to the end, so all do the same work) — the goal is >= 3× transformers' tokens/s.

CPU: the ``tiny`` preset in float32, one torch thread, a sweep over the issue's range (1-64 prompts, prompt lengths
16-512, 8-128 new tokens), greedy and sampled (temperature 0.8, top-k 50: transformers' default top-k, so both
sample from the same distribution), and ragged prompt lengths (transformers gets them left-padded with an attention
mask; ours packs them). The goal is >= 1.5× transformers. Each case's two implementations are timed in alternating
rounds inside one test (the machine is shared: load from other processes falls on both); the figure is new tokens
per second of one whole call (prefill included), the median of ``ROUNDS`` calls after a warm-up call, by wall time
(``value``, ``ms``) and by the process's CPU time (``cpu_value``, ``cpu_ms``: on a loaded machine the wall time also
counts waiting for a core). extra_info records the CPU model, the ISA (``ATEN_CPU_CAPABILITY``) and the cpu GEMM
choices.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import pytest
import torch
from common import OURS, card_name, cpu_info, device, time_interleaved, time_ms_interleaved

from models import InternLM2Config, InternLM2ForCausalLM
from models.checkpoint import llama_config_dict, to_llama_state_dict
from models.serving import ContinuousBatchingGenerator

ON_GPU = torch.cuda.is_available()
PEER = "transformers-generate"
# CPU cases: name -> (prompts, prompt length (lo, hi): equal when lo == hi, new tokens, sampled)
CPU_CASES = {
    "1x16+8": (1, (16, 16), 8, False),
    "1x512+128": (1, (512, 512), 128, False),
    "4x200+24": (4, (200, 200), 24, False),
    "24x48+40": (24, (48, 48), 40, False),
    "24x48+40-sampled": (24, (48, 48), 40, True),
    "16x16..256+32-ragged": (16, (16, 256), 32, False),
    "64x16+8": (64, (16, 16), 8, False),
    "64x64+64": (64, (64, 64), 64, False),
    "8x512+128": (8, (512, 512), 128, False),
}
ROUNDS = 5
_cpu_ms: dict[str, dict[str, tuple[float, float]]] = {}


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def _llama(model, config, dev, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(dev):
        llama = LlamaForCausalLM(LlamaConfig.from_dict(llama_config_dict(config), attn_implementation="sdpa"))
    llama.load_state_dict(to_llama_state_dict(model.state_dict(), config))
    return llama.to(dtype).eval()


def _cpu_pair(case: str) -> dict[str, object]:
    """Ours and transformers' generate on the case's prompts, as zero-argument callables."""
    n, (lo, hi), new, sampled = CPU_CASES[case]
    config = InternLM2Config.preset("tiny")
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(config).eval()
    lengths = torch.randint(lo, hi + 1, (n,)).tolist()
    prompts = [torch.randint(3, config.vocab_size, (n_tok,)).tolist() for n_tok in lengths]
    kw = dict(temperature=0.8, top_k=50) if sampled else {}
    gen = ContinuousBatchingGenerator(model, max_batch=n, page_size=16, max_seq_len=hi + new,
                                      prefill_tokens=sum(lengths))
    llama = _llama(model, config, "cpu", torch.float32)
    ids = torch.zeros(n, hi, dtype=torch.long)                      # left-padded
    mask = torch.zeros(n, hi, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, hi - len(p):] = torch.tensor(p)
        mask[i, hi - len(p):] = 1

    def ours():
        return gen.generate(prompts, new, stop_token_ids=(), generator=torch.Generator().manual_seed(0), **kw)

    def peer():
        with torch.no_grad():
            return llama.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=sampled, eos_token_id=None, pad_token_id=0,
                                  **(dict(temperature=0.8, top_k=50, top_p=1.0) if sampled else {}))
    return {OURS: ours, PEER: peer}


@pytest.mark.parametrize("impl", [OURS, PEER])
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_generation_cpu(benchmark, case, impl):
    if ON_GPU:
        pytest.skip("CPU sweep")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fns = _cpu_pair(case)
        if case not in _cpu_ms:
            _cpu_ms[case] = time_interleaved(fns, warmup=1, reps=ROUNDS)
        benchmark.pedantic(fns[impl], rounds=1, iterations=1)
    finally:
        torch.set_num_threads(before)
    n, _, new, sampled = CPU_CASES[case]
    ms, cpu_ms = _cpu_ms[case][impl]
    benchmark.extra_info.update(group=f"generation tiny cpu 1 thread {case}", impl=impl, metric="tokens/s",
                                value=n * new / (ms * 1e-3), ms=ms, cpu_value=n * new / (cpu_ms * 1e-3),
                                cpu_ms=cpu_ms, card=card_name(), threads=1,
                                sampled=sampled, **cpu_info())


# PPO's rollout sampling (configs/ppo_tiny.toml: 24 prompts, 32 new tokens, temperature 1, top-p 0.9, the byte
# vocabulary of 272) on the tiny preset, CPU, 1 thread. Ours: one generator per prompt, all prompts in one batched
# call (what the PPO stage does). Peers in the same run: one generator for the batch in one call (the draw batched
# too: what per-prompt draws cost), and one call per prompt (what per-prompt sampling cost before the engine took a
# generator per request).
PER_PROMPT = {"n": 24, "prompt": (40, 90), "new": 32}
PER_PROMPT_IMPLS = (OURS, "one-generator-one-batch", "per-prompt-one-call-each")
_per_prompt_ms: dict[str, float] = {}


def _per_prompt_fns() -> dict[str, object]:
    config = dataclasses.replace(InternLM2Config.preset("tiny"), vocab_size=272)
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(config).eval()
    n, (lo, hi), new = PER_PROMPT["n"], PER_PROMPT["prompt"], PER_PROMPT["new"]
    prompts = [torch.randint(3, 272, (int(k),)).tolist() for k in torch.randint(lo, hi + 1, (n,))]
    gen = ContinuousBatchingGenerator(model, max_batch=n, max_seq_len=hi + new)
    kw = dict(temperature=1.0, top_p=0.9, stop_token_ids=())

    def seeded():
        return [torch.Generator().manual_seed(i) for i in range(n)]

    return {OURS: lambda: gen.generate(prompts, new, generator=seeded(), **kw),
            "one-generator-one-batch": lambda: gen.generate(prompts, new, generator=torch.Generator().manual_seed(0),
                                                            **kw),
            "per-prompt-one-call-each": lambda: [gen.generate([p], new, generator=[g], **kw)
                                                 for p, g in zip(prompts, seeded())]}


@pytest.mark.parametrize("impl", PER_PROMPT_IMPLS)
def test_per_prompt_sampling_cpu(benchmark, impl):
    if ON_GPU:
        pytest.skip("CPU case")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fns = _per_prompt_fns()
        if not _per_prompt_ms:
            _per_prompt_ms.update(time_ms_interleaved(fns, warmup=1, reps=ROUNDS))
        benchmark.pedantic(fns[impl], rounds=1, iterations=1)
    finally:
        torch.set_num_threads(before)
    ms = _per_prompt_ms[impl]
    benchmark.extra_info.update(group="ppo rollout sampling tiny cpu 1 thread 24x40..90+32", impl=impl,
                                metric="tokens/s", value=PER_PROMPT["n"] * PER_PROMPT["new"] / (ms * 1e-3), ms=ms,
                                card=card_name(), threads=1, **cpu_info())


@pytest.mark.parametrize("impl", [OURS, PEER])
def test_generation_tokens_per_s(benchmark, impl):
    if not ON_GPU:
        pytest.skip("GPU case: benchmarks/gpu_check.sh (the CPU sweep is test_generation_cpu)")
    dev, dtype, n, prompt_len, new = device(), torch.bfloat16, 64, 512, 512
    config = InternLM2Config.preset("1_8b")
    torch.manual_seed(0)
    with torch.device(dev):
        model = InternLM2ForCausalLM(config).to(dtype).eval()
    prompts = torch.randint(3, config.vocab_size, (n, prompt_len)).tolist()
    if impl == OURS:
        gen = ContinuousBatchingGenerator(model, max_batch=n, page_size=64, max_seq_len=prompt_len + new,
                                          prefill_tokens=n * prompt_len)

        def fn(new=new):
            return gen.generate(prompts, new, stop_token_ids=())
    else:
        llama = _llama(model, config, dev, dtype)
        ids = torch.tensor(prompts, device=dev)
        mask = torch.ones_like(ids)

        def fn(new=new):
            with torch.no_grad():
                return llama.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
    fn(4)
    samples = []

    def timed():
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - t0)

    benchmark.pedantic(timed, rounds=1, iterations=1)
    seconds = statistics.median(samples)
    benchmark.extra_info.update(group=f"generation 1_8b {n}x{prompt_len}+{new} {dtype}", impl=impl,
                                metric="tokens/s", value=n * new / seconds, ms=seconds * 1e3, card=card_name())
