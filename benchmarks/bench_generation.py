"""Generation throughput: the continuous-batching generator (models.serving) beside transformers' generate and
today's models.generation.generate, same model weights, same run.

GPU: the ``1_8b`` shape (random weights, bf16), 64 prompts of 512 tokens, 512 new tokens each, greedy, no stop
token (every sequence runs to the end, so all three do the same work) — the goal is >= 3× transformers' tokens/s.
CPU: the ``tiny`` preset in float32, 16 prompts of 64 tokens, 32 new tokens. The figure is new tokens per second
of one whole call (prefill included), after a short warm-up call (4 new tokens: kernels compiled, CUDA graphs of
the decode batch captured); the median of 3 calls on CPU, one call on GPU (the peers take tens of seconds).
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


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


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
                                          max_seq_len=PROMPT_LEN + NEW, prefill_tokens=N_PROMPTS * PROMPT_LEN)

        def fn(new=NEW):
            return gen.generate(prompts, new, stop_token_ids=())
    elif impl == "generation.generate":
        def fn(new=NEW):
            return model.generate(prompts, max_new_tokens=new, stop_token_ids=())
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device(dev):
            llama = LlamaForCausalLM(LlamaConfig.from_dict(llama_config_dict(config), attn_implementation="sdpa"))
        llama.load_state_dict(to_llama_state_dict(model.state_dict(), config))
        llama = llama.to(DTYPE).eval()
        ids = torch.tensor(prompts, device=dev)
        mask = torch.ones_like(ids)

        def fn(new=NEW):
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

    benchmark.pedantic(timed, rounds=1 if ON_GPU else 3, iterations=1)
    seconds = statistics.median(samples)
    tokens = N_PROMPTS * NEW
    benchmark.extra_info.update(group=f"generation {PRESET} {N_PROMPTS}x{PROMPT_LEN}+{NEW} {DTYPE}", impl=impl,
                                metric="tokens/s", value=tokens / seconds, ms=seconds * 1e3, card=card_name())
