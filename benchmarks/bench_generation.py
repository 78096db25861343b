"""Generation throughput: the continuous-batching generator (models.serving) beside transformers' generate and
today's models.generation.generate, same model weights, same run.

GPU: the ``1_8b`` shape (random weights, bf16), 64 prompts of 512 tokens, 512 new tokens each, greedy, no stop
token (every sequence runs to the end, so all three do the same work) — the goal is >= 3× transformers' tokens/s.
CPU: the ``tiny`` preset in float32, 16 prompts of 64 tokens, 32 new tokens. The figure is new tokens per second
of one whole call (prefill included), after one warm-up call.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
from common import OURS, card_name, device

from models import InternLM2Config, InternLM2ForCausalLM
from models.checkpoint import llama_config_dict, to_llama_state_dict
from models.serving import ContinuousBatchingGenerator

ON_GPU = torch.cuda.is_available()
PRESET, DTYPE, N_PROMPTS, PROMPT_LEN, NEW = (("1_8b", torch.bfloat16, 64, 512, 512) if ON_GPU
                                             else ("tiny", torch.float32, 16, 64, 32))
IMPLS = [OURS, "generation.generate", "transformers-generate"]


def _timed(fn, reps: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    samples = []
    for _ in range(reps):
        if ON_GPU:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if ON_GPU:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@pytest.mark.parametrize("impl", IMPLS)
def test_generation_tokens_per_s(benchmark, impl):
    dev = device()
    config = InternLM2Config.preset(PRESET)
    torch.manual_seed(0)
    with torch.device(dev):
        model = InternLM2ForCausalLM(config).to(DTYPE).eval()
    prompts = torch.randint(3, config.vocab_size, (N_PROMPTS, PROMPT_LEN)).tolist()
    if impl == OURS:
        gen = ContinuousBatchingGenerator(model, max_batch=N_PROMPTS, page_size=64 if ON_GPU else 16,
                                          max_seq_len=PROMPT_LEN + NEW)
        fn = lambda: gen.generate(prompts, NEW, stop_token_ids=())  # noqa: E731
    elif impl == "generation.generate":
        fn = lambda: model.generate(prompts, max_new_tokens=NEW, stop_token_ids=())  # noqa: E731
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device(dev):
            llama = LlamaForCausalLM(LlamaConfig.from_dict(llama_config_dict(config), attn_implementation="sdpa"))
        llama.load_state_dict(to_llama_state_dict(model.state_dict(), config))
        llama = llama.to(DTYPE).eval()
        ids = torch.tensor(prompts, device=dev)
        mask = torch.ones_like(ids)

        def fn():
            with torch.no_grad():
                return llama.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
    seconds = _timed(fn, reps=1 if ON_GPU else 3)
    benchmark.pedantic(fn, rounds=1, iterations=1)
    tokens = N_PROMPTS * NEW
    benchmark.extra_info.update(group=f"generation {PRESET} {N_PROMPTS}x{PROMPT_LEN}+{NEW} {DTYPE}", impl=impl,
                                metric="tokens/s", value=tokens / seconds, ms=seconds * 1e3, card=card_name())
