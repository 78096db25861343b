"""Continuous-batching generation (models.serving): greedy output equals model.generate (a 1-call generator), the uncached
forward and transformers' generate token for token; slots are refilled; log-probs are the model's; sampling is seeded."""
import dataclasses

import pytest
import torch
from test_generation import PROMPTS, uncached_greedy

import internlm_kernels as ik
from models import InternLM2Config, InternLM2ForCausalLM
from models.serving import ContinuousBatchingGenerator, sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = dataclasses.replace(InternLM2Config.preset("micro"), rope_scaling={"type": "linear", "factor": 2.0})
    return InternLM2ForCausalLM(cfg).eval()


def tokens(completions):
    return [c.tokens for c in completions]


def test_greedy_equals_generate_and_the_uncached_forward(model):
    # 2 slots for 4 prompts: two refills; prompt + 12 new tokens crosses 16-token pages.
    gen = ContinuousBatchingGenerator(model, max_batch=2, page_size=16)
    free = len(gen.pool.free)
    got = gen.generate(PROMPTS, 12, stop_token_ids=())
    assert tokens(got) == model.generate(PROMPTS, max_new_tokens=12, stop_token_ids=())
    assert tokens(got) == [uncached_greedy(model, p, 12, ()) for p in PROMPTS]
    assert all(c.finish_reason == "length" for c in got)
    assert len(gen.pool.free) == free, "every page returns to the pool"


def test_triton_kernels_match_the_reference_backend(model):
    # Every kernel of the model runs under the interpreter here: kept short (2 prompts, 3 tokens, pages of 8).
    # The backend is read when the generator is built (under auto/cpu a float32 CPU model gets the fused decode step).
    with ik.use_backend("reference"):
        want = ContinuousBatchingGenerator(model, max_batch=2, page_size=8).generate([PROMPTS[0], PROMPTS[2]], 3,
                                                                                     stop_token_ids=())
    with ik.use_backend("triton"):
        got = ContinuousBatchingGenerator(model, max_batch=2, page_size=8).generate([PROMPTS[0], PROMPTS[2]], 3,
                                                                                    stop_token_ids=())
    assert tokens(got) == tokens(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=1e-4, atol=1e-4)


def test_greedy_equals_transformers_generate(model, tmp_path):
    from transformers import LlamaForCausalLM

    plain = InternLM2ForCausalLM(InternLM2Config.preset("micro")).eval()   # transformers' Llama: no rope scaling
    plain.save_pretrained(tmp_path / "llama", layout="llama")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    got = ContinuousBatchingGenerator(plain, max_batch=3, page_size=16).generate(PROMPTS, 10, stop_token_ids=())
    for prompt, completion in zip(PROMPTS, got):
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert completion.tokens == out[0, len(prompt):].tolist()


def test_logprobs_are_the_models_and_match_fused_linear_logprobs(model):
    """Each returned log-prob equals log softmax(logits / T) of the full forward over prompt + sampled tokens, which
    is what ik.fused_linear_logprobs computes for the PPO update."""
    g = torch.Generator().manual_seed(1)
    got = ContinuousBatchingGenerator(model, max_batch=4).generate(PROMPTS[:3], 6, temperature=0.7, top_k=20,
                                                                   stop_token_ids=(), generator=g)
    for prompt, c in zip(PROMPTS, got):
        seq = torch.tensor(prompt + c.tokens)
        with torch.no_grad():
            hidden = model.model(seq, _packed_ctx(model, seq))
            want = ik.fused_linear_logprobs(hidden[len(prompt) - 1:-1], model.output.weight, seq[len(prompt):],
                                            temperature=0.7)
        torch.testing.assert_close(torch.tensor(c.logprobs), want, rtol=1e-4, atol=1e-4)


def _packed_ctx(model, seq):
    from models.context import PackedContext
    from models.packing import PackedInputs

    cu = torch.tensor([0, seq.numel()], dtype=torch.int32)
    return PackedContext(PackedInputs(seq, cu, seq.numel(), None, None, None), model.model.rotary)


def test_stop_tokens_budgets_and_a_small_pool(model):
    free = ContinuousBatchingGenerator(model, max_batch=4).generate(PROMPTS, 10, stop_token_ids=())
    stop = free[1].tokens[2]
    # Per-prompt budgets; a pool of 3 pages (+ scratch) for 4 prompts: admission waits for pages to return.
    gen = ContinuousBatchingGenerator(model, max_batch=4, page_size=16, num_pages=4)
    got = gen.generate(PROMPTS, [10, 10, 4, 0], stop_token_ids=(stop,))
    for c, f, budget in zip(got, free, [10, 10, 4, 0]):
        cut = f.tokens[:budget]
        if stop in cut:
            cut = cut[:cut.index(stop) + 1]
        assert c.tokens == cut
        assert c.finish_reason == ("stop" if cut and cut[-1] == stop else "length")
        assert len(c.logprobs) == len(c.tokens)
    assert got[1].finish_reason == "stop" and got[3].tokens == []
    assert len(gen.pool.free) == 3


def test_sampling_is_seeded_and_degenerate_samplers_are_greedy(model):
    gen = ContinuousBatchingGenerator(model, max_batch=4)

    def run(seed, **kw):
        return tokens(gen.generate(PROMPTS, 8, stop_token_ids=(), generator=torch.Generator().manual_seed(seed),
                                   **kw))

    assert run(3, temperature=1.0, top_p=0.9) == run(3, temperature=1.0, top_p=0.9)
    assert run(3, temperature=1.0) != run(4, temperature=1.0)
    greedy = tokens(gen.generate(PROMPTS, 8, stop_token_ids=()))
    assert run(5, temperature=1.0, top_k=1) == greedy
    assert run(5, temperature=1.0, top_p=1e-6) == greedy


def test_top_k_and_top_p_distribution():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    draws, logp = sample(logits, 1.0, 1.0, 2, g)
    counts = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert counts[2] == 0 and counts[3] == 0 and abs(counts[0] - 4 / 7) < 0.03
    torch.testing.assert_close(logp, torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))[draws])
    draws, _ = sample(logits, 1.0, 0.65, 3, g)       # top-3 renormalized: 4/9, 3/9, 2/9 -> nucleus 0.65 = {0, 1}
    assert set(draws.tolist()) == {0, 1}


def test_sample_with_a_generator_per_row_draws_each_row_as_it_would_alone():
    """Rows with their own generator get the token they get alone; rows that share one draw from it in row order,
    as one call on those rows does."""
    torch.manual_seed(0)
    logits = torch.randn(5, 50)

    def g(seed):
        return torch.Generator().manual_seed(seed)

    shared = g(9)
    tokens, logp = sample(logits, 0.8, 0.9, 20, [g(1), shared, g(2), shared, g(3)])
    for row, seed in ((0, 1), (2, 2), (4, 3)):
        alone, alone_logp = sample(logits[row:row + 1], 0.8, 0.9, 20, g(seed))
        assert tokens[row] == alone[0]
        torch.testing.assert_close(logp[row], alone_logp[0], rtol=1e-6, atol=1e-6)   # a row alone or in a batch
    assert torch.equal(tokens[[1, 3]], sample(logits[[1, 3]], 0.8, 0.9, 20, g(9))[0])


def _multinomial_sample(logits, temperature, top_p, generators):
    """The draw without top-k as torch.multinomial makes it: softmax(logits / T) (sorted and cut to the top-p
    nucleus), one multinomial call per generator over its rows in row order."""
    probs = torch.log_softmax(logits / temperature, dim=-1).exp()
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    choice = torch.empty(logits.shape[0], 1, dtype=torch.long)
    rows_of = {}
    for row, g in enumerate(generators):
        rows_of.setdefault(id(g), []).append(row)
    for rows in rows_of.values():
        choice[rows] = torch.multinomial(probs[rows], 1, generator=generators[rows[0]])
    return (choice if order is None else order.gather(-1, choice)).squeeze(-1)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sample_without_top_k_draws_multinomials_tokens(top_p):
    """Without top-k the exponential race draws the tokens torch.multinomial draws from the same generators (its
    own algorithm for one sample), and leaves each generator where multinomial leaves it: a seed's stream is the one
    it was with multinomial, per row generators, shared ones and one for the batch alike."""
    torch.manual_seed(0)
    for trial in range(20):
        logits = torch.randn(6, 272) * 3

        def gens(seed):
            shared = torch.Generator().manual_seed(seed)
            return [torch.Generator().manual_seed(seed + 1), shared, torch.Generator().manual_seed(seed + 2), shared,
                    shared, torch.Generator().manual_seed(seed + 3)]

        ours, theirs = gens(trial * 10), gens(trial * 10)
        assert torch.equal(sample(logits, 0.9, top_p, 0, ours)[0], _multinomial_sample(logits, 0.9, top_p, theirs))
        assert all(torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b)) for a, b in zip(ours, theirs))
        one = torch.Generator().manual_seed(trial)
        assert torch.equal(sample(logits, 1.0, top_p, 0, one)[0],
                           _multinomial_sample(logits, 1.0, top_p, [torch.Generator().manual_seed(trial)] * 6))


def test_top_k_draw_frequencies():
    """The top-k draw (over the k candidates only) samples each of them with its renormalized probability: counts of
    40000 draws within 5 binomial standard deviations (a false failure has probability ~1e-6 per token), and never
    a token outside the top k."""
    p = torch.tensor([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
    logits = torch.log(p).expand(40000, 6)
    draws, _ = sample(logits, 1.0, 1.0, 3, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).double()
    want = torch.tensor([0, 0.3, 0, 0.25, 0.2, 0]).double() / 0.75 * 40000
    sigma = (want * (1 - want / 40000)).sqrt()
    assert bool(((counts - want).abs() <= 5 * sigma).all()), (counts, want)


def test_bad_arguments(model):
    gen = ContinuousBatchingGenerator(model, max_batch=2)
    with pytest.raises(ValueError, match="prompts"):
        gen.generate([], 4)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        gen.generate([[1, 101]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate([[1], [2]], [4])
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate([[1] * 60], 10)
    with pytest.raises(ValueError, match="top_k"):
        gen.generate([[1]], 4, temperature=1.0, top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate([[1]], 4, top_p=0.9)
    with pytest.raises(ValueError, match="num_pages"):
        ContinuousBatchingGenerator(model, max_batch=2, page_size=16, num_pages=2).generate([[1] * 20], 4)
    dynamic = InternLM2ForCausalLM(dataclasses.replace(model.config, rope_scaling={"type": "dynamic", "factor": 2.0}))
    with pytest.raises(NotImplementedError, match="dynamic"):
        ContinuousBatchingGenerator(dynamic, max_seq_len=128)


def _run(gen, requests) -> dict[int, list[int]]:
    """Submit (prompt, max_new, kwargs) requests, step until idle; the tokens of each, in submission order."""
    ids = [gen.submit(p, n, stop_token_ids=(), **kw) for p, n, kw in requests]
    got = {i: [] for i in ids}
    while gen.busy:
        for o in gen.step():
            got[o.request_id] += o.tokens
    return [got[i] for i in ids]


def test_submit_step_cancel_equal_generate_and_cancel_frees_pages(model):
    gen = ContinuousBatchingGenerator(model, max_batch=2, page_size=4)
    want = tokens(gen.generate(PROMPTS, 8, stop_token_ids=()))
    free = len(gen.pool.free)
    running = gen.submit(PROMPTS[0], 40, stop_token_ids=())
    ids = [gen.submit(p, 8, stop_token_ids=()) for p in PROMPTS]
    queued = gen.submit(PROMPTS[1], 8, stop_token_ids=())
    first = gen.step()                                    # two slots: `running` and ids[0] are admitted
    assert sorted(o.request_id for o in first) == [running, ids[0]]
    assert all(len(o.tokens) == 2 and o.finish_reason is None for o in first)   # prefill + one decode token
    assert gen.cancel(running) and gen.cancel(queued)
    assert not gen.cancel(running) and not gen.cancel(12345)
    assert len(gen.pool.free) == free - 3, "only ids[0]'s 3 pages (3 + 8 tokens in pages of 4) are held"
    got = {i: [] for i in ids}
    for o in first:
        got.get(o.request_id, []).extend(o.tokens)
    reasons = {}
    while gen.busy:
        for o in gen.step():
            assert o.request_id not in (running, queued), "a cancelled request reports nothing more"
            got[o.request_id] += o.tokens
            if o.finish_reason:
                reasons[o.request_id] = o.finish_reason
    assert [got[i] for i in ids] == want
    assert reasons == {i: "length" for i in ids}
    assert len(gen.pool.free) == free and gen.num_running == gen.num_queued == 0


def test_a_requests_tokens_do_not_depend_on_its_batch(model):
    """Greedy rows and rows with their own seeded generator give the same tokens alone and among neighbours that
    sample at other settings (the server runs every request through one generator)."""
    gen = ContinuousBatchingGenerator(model, max_batch=4)

    def seeded(seed):
        return dict(temperature=0.9, top_k=30, generator=torch.Generator().manual_seed(seed))

    greedy = (PROMPTS[1], 10, {})
    sampled = (PROMPTS[2], 10, seeded(7))
    alone = _run(gen, [greedy])[0], _run(gen, [sampled])[0]
    shared = torch.Generator().manual_seed(3)
    neighbours = [(PROMPTS[0], 14, dict(temperature=1.2, top_p=0.8, generator=shared)),
                  (PROMPTS[3], 6, dict(temperature=0.5, generator=shared)), (PROMPTS[2], 12, {})]
    sampled = (PROMPTS[2], 10, seeded(7))
    together = _run(gen, [neighbours[0], greedy, neighbours[1], sampled, neighbours[2]])
    assert (together[1], together[3]) == alone
    assert together[4][:10] == _run(gen, [(PROMPTS[2], 10, {})])[0]


def test_submit_checks_its_arguments(model):
    gen = ContinuousBatchingGenerator(model, max_batch=2, page_size=16, num_pages=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.submit([1] * 60, 10)
    with pytest.raises(ValueError, match="num_pages"):
        gen.submit([1] * 30, 10)
    with pytest.raises(ValueError, match="top_p"):
        gen.submit([1], 4, top_p=0.5)
    assert not gen.busy


@pytest.mark.gpu
def test_gpu_cuda_graph_decode_equals_eager(model):
    # float32: greedy tokens of different attention kernels agree only while rounding cannot flip an argmax.
    cuda_model = InternLM2ForCausalLM(InternLM2Config.preset("micro")).cuda().eval()
    prompts = PROMPTS * 3
    eager = ContinuousBatchingGenerator(cuda_model, max_batch=8, cuda_graphs=False).generate(prompts, 12,
                                                                                              stop_token_ids=())
    graphs = ContinuousBatchingGenerator(cuda_model, max_batch=8, cuda_graphs=True).generate(prompts, 12,
                                                                                              stop_token_ids=())
    assert tokens(graphs) == tokens(eager)
    assert tokens(eager) == cuda_model.generate(prompts, max_new_tokens=12, stop_token_ids=())
