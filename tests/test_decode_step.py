"""The CPU decode step (models/decode_step.py: keys/values per slot, one function of ATen calls for the layer stack)
against the generic paged path (the reference kvcache backend over the paged pool): same tokens and log-probs on
ragged prompts with unequal budgets (slots free at different steps, so the decode runs a trimmed batch with free
rows between live ones), greedy and sampled; greedy equal to the uncached forward, also under inference_mode; the
prefill's logits and cache equal to the model's forward; the decode weights (norms, softmax scale and rotation folded
into the products) rebuilt at each prefill, so a weight change reaches the next call however it was written."""
import dataclasses

import pytest
import torch
from test_generation import uncached_greedy

import internlm_kernels as ik
from models import InternLM2Config, InternLM2ForCausalLM
from models.serving import ContinuousBatchingGenerator

PROMPTS = [[5, 17, 3], [9], [4, 4, 8, 15, 16, 23, 42, 7, 1, 60, 33], [2, 99, 100, 0, 50], [7] * 20, [11, 12]]
BUDGETS = [9, 3, 14, 6, 11, 5]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return InternLM2ForCausalLM(InternLM2Config.preset("micro")).eval()


def run(model, fused: bool, **kw):
    # kvcache=reference builds the generic path (paged pool, ik.flash_attn_with_kvcache per layer).
    with ik.use_backend() if fused else ik.use_backend(kvcache="reference"):
        gen = ContinuousBatchingGenerator(model, max_batch=4, page_size=8, max_seq_len=40)
    assert (gen._cpu_step is not None) == fused
    return gen.generate(PROMPTS, BUDGETS, stop_token_ids=(), **kw)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 50}])
def test_fused_decode_step_equals_the_paged_path(model, sampling):
    got = run(model, True, generator=torch.Generator().manual_seed(1), **sampling)
    want = run(model, False, generator=torch.Generator().manual_seed(1), **sampling)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert [len(c.tokens) for c in got] == BUDGETS
    for g, w in zip(got, want):
        # float32 log-softmax over the vocabulary of logits that differ in summation order only: ~1e-6 absolute.
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=1e-5, atol=1e-5)


def test_fused_decode_step_greedy_equals_the_uncached_forward(model):
    got = run(model, True)
    assert [c.tokens for c in got] == [uncached_greedy(model, p, n, ()) for p, n in zip(PROMPTS, BUDGETS)]


def test_greedy_under_inference_mode_equals_the_uncached_forward(model):
    with torch.inference_mode():
        got = run(model, True)
    assert [c.tokens for c in got] == [uncached_greedy(model, p, n, ()) for p, n in zip(PROMPTS, BUDGETS)]


def test_prefill_logits_and_cache_equal_the_models_forward(model):
    # Ragged prompts with two of equal length (one SDPA call for their group), into slots out of order.
    prompts = [[5, 17, 3, 8], [9, 1, 2], [4, 4, 8, 15, 16, 23, 42], [2, 99, 100, 0]]
    slots = [3, 0, 2, 1]
    gen = ContinuousBatchingGenerator(model, max_batch=4, page_size=8, max_seq_len=16)
    step = gen._cpu_step
    step.k.fill_(float("nan"))                       # poison: the prefill must write every position it owns
    step.v.fill_(float("nan"))
    ids = torch.tensor([t for p in prompts for t in p])
    with torch.no_grad():
        got = step.prefill(ids, slots, [len(p) for p in prompts])
        want = torch.stack([model(torch.tensor(p)).logits[-1] for p in prompts]).float()
    # float32 products of the same weights in another summation order (norm weights folded into the columns):
    # ~1e-6 relative on logits of size ~1.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The cached keys and values equal the ones the paged reference path writes (rotated, unscaled).
    with ik.use_backend(kvcache="reference"):
        ref = ContinuousBatchingGenerator(model, max_batch=4, page_size=8, max_seq_len=16)
    for p in prompts:
        ref.submit(p, 1)
    ref._prefill(ref._admit())                          # prompt i in slot i
    for i, (slot, p) in enumerate(zip(slots, prompts)):
        pages = [int(x) for x in ref.block_table[i][: -(-len(p) // 8)]]
        for cache, pool in ((step.k, ref.pool.k), (step.v, ref.pool.v)):
            want = torch.cat([pool[:, page] for page in pages], dim=1)[:, : len(p)]          # (layers, L, Hkv, D)
            torch.testing.assert_close(cache[:, slot, :, : len(p)], want.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("write", ["in_place", "through_data"])
def test_weight_changes_between_calls_are_seen(model, write):
    # In place bumps the parameter's version counter; through .data does not (as a kernel writing through a raw
    # pointer, e.g. FusedAdamW's): the decode weights are rebuilt at each prefill either way.
    torch.manual_seed(2)
    m = InternLM2ForCausalLM(InternLM2Config.preset("micro")).eval()
    gen = ContinuousBatchingGenerator(m, max_batch=4, page_size=8, max_seq_len=40)
    before = [c.tokens for c in gen.generate(PROMPTS[:3], 6, stop_token_ids=())]
    with torch.no_grad():
        for name in ("attention.wqkv", "feed_forward.w1", "attention_norm"):
            w = m.model.layers[0].get_submodule(name).weight
            (w.data if write == "through_data" else w).mul_(torch.rand_like(w) * 4)
    after = [c.tokens for c in gen.generate(PROMPTS[:3], 6, stop_token_ids=())]
    assert after == [uncached_greedy(m, p, 6, ()) for p in PROMPTS[:3]]
    assert after != before                          # the change mattered, so the check above can fail


def test_gqa_groups_and_weight_updates_are_seen():
    # 4 query heads per KV head (micro has another ratio), and a weight change between calls reaches the next call.
    cfg = dataclasses.replace(InternLM2Config.preset("micro"), num_attention_heads=8, num_key_value_heads=2)
    torch.manual_seed(1)
    m = InternLM2ForCausalLM(cfg).eval()
    gen = ContinuousBatchingGenerator(m, max_batch=4, page_size=8, max_seq_len=40)
    assert [c.tokens for c in gen.generate(PROMPTS[:3], 6, stop_token_ids=())] == \
        [uncached_greedy(m, p, 6, ()) for p in PROMPTS[:3]]
    with torch.no_grad():
        m.model.layers[0].feed_forward.w2.weight.mul_(3.0)
    assert [c.tokens for c in gen.generate(PROMPTS[:3], 6, stop_token_ids=())] == \
        [uncached_greedy(m, p, 6, ()) for p in PROMPTS[:3]]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 50}])
def test_bmm_attention_without_the_kernel_equals_the_kernel(model, sampling):
    """The step's attention through the extension's decode attention kernel (where it has one: micro's head dim 32)
    and through its ATen form (bmm / masked softmax / bmm, what runs without the extension) give the same tokens
    on ragged prompts, and log-probs equal up to float32 summation order."""
    results = []
    for kernel in (True, False):
        gen = ContinuousBatchingGenerator(model, max_batch=4, page_size=8, max_seq_len=40)
        assert gen._cpu_step.attention_kernel
        gen._cpu_step.attention_kernel = kernel
        results.append(gen.generate(PROMPTS, BUDGETS, stop_token_ids=(), generator=torch.Generator().manual_seed(3),
                                    **sampling))
    got, want = results
    assert [c.tokens for c in got] == [c.tokens for c in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=1e-5, atol=1e-5)
