"""``model.generate`` (one call of models.serving's generator): cached decoding equals recomputing the whole prefix,
stop tokens, sampling (one generator for the batch or one per prompt), the cache sized for the call, bad arguments."""
import dataclasses

import pytest
import torch

import internlm_kernels as ik
from models import InternLM2Config, InternLM2ForCausalLM
from models.serving import sample

PROMPTS = [[5, 17, 3], [9], [4, 4, 8, 15, 16, 23, 42, 7, 1, 60, 33], [2, 99, 100, 0, 50]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = dataclasses.replace(InternLM2Config.preset("micro"), rope_scaling={"type": "linear", "factor": 2.0})
    return InternLM2ForCausalLM(cfg).eval()


def uncached_greedy(model, prompt, max_new_tokens, stop):
    """The oracle: run the full prefix through the ordinary forward for every new token."""
    seq, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor(seq)).logits[-1].argmax())
            new.append(token)
            seq.append(token)
            if token in stop:
                break
    return new


def test_cached_greedy_equals_uncached(model):
    got = model.generate(PROMPTS, max_new_tokens=12, stop_token_ids=())
    assert [len(g) for g in got] == [12] * len(PROMPTS)
    assert got == [uncached_greedy(model, p, 12, ()) for p in PROMPTS]


def test_generation_through_the_kernels_matches_reference(model):
    """Prefill through the varlen kernel and packed rotary, decode through rotary with per-sequence offsets."""
    prompts = [PROMPTS[0], PROMPTS[3]]
    with ik.use_backend("reference"):
        want = model.generate(prompts, max_new_tokens=4, stop_token_ids=())
    with ik.use_backend("triton"):
        assert model.generate(prompts, max_new_tokens=4, stop_token_ids=()) == want


def test_stop_tokens_end_each_sequence(model):
    free = model.generate(PROMPTS, max_new_tokens=10, stop_token_ids=())
    # Stop on a token that the second prompt produces early: it ends there (stop token kept), others run on.
    stop = free[1][2]
    got = model.generate(PROMPTS, max_new_tokens=10, stop_token_ids=(stop,))
    for g, f in zip(got, free):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert g == f[:cut]
    assert got == [uncached_greedy(model, p, 10, (stop,)) for p in PROMPTS]
    assert model.generate(PROMPTS, max_new_tokens=0) == [[], [], [], []]


def test_sampling_is_reproducible_and_stays_in_the_nucleus(model):
    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return model.generate(PROMPTS, max_new_tokens=8, stop_token_ids=(), generator=g, **kw)

    assert run(3, temperature=1.0, top_p=0.9) == run(3, temperature=1.0, top_p=0.9)
    assert run(3, temperature=1.0) != run(4, temperature=1.0)
    # A tiny nucleus keeps only the most likely token: sampling becomes greedy.
    assert run(5, temperature=1.0, top_p=1e-6) == model.generate(PROMPTS, max_new_tokens=8, stop_token_ids=())


def test_top_p_sampling_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, 0.75, 0, g)[0] for _ in range(3000)]).flatten()
    counts = torch.bincount(draws, minlength=4).float() / draws.numel()
    # Nucleus at 0.75 = {0, 1} (0.5 + 0.3 >= 0.75), renormalized to 0.625 / 0.375.
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] - 0.625) < 0.03 and abs(counts[1] - 0.375) < 0.03
    # Temperature sharpens: at T = 0.5 the probabilities are p^2 normalized.
    draws = torch.stack([sample(logits, 0.5, 1.0, 0, g)[0] for _ in range(3000)]).flatten()
    counts = torch.bincount(draws, minlength=4).float() / draws.numel()
    want = torch.tensor([0.25, 0.09, 0.0225, 0.0025]) / 0.365
    assert (counts - want).abs().max() < 0.03
    assert torch.equal(sample(logits, 0.0, 1.0)[0], torch.tensor([0]))


def test_per_prompt_generators_make_each_reply_independent_of_its_batch(model):
    """One generator per prompt: a prompt's reply is the one it gets alone with that generator, whatever shares the
    batch (what PPO's data-parallel ranks, each sampling a share of the prompts, rely on)."""
    def seeded(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, stop_token_ids=())
    together = model.generate(PROMPTS, generator=seeded([11, 12, 13, 14]), **kw)
    alone = [model.generate([p], generator=seeded([s]), **kw)[0] for p, s in zip(PROMPTS, [11, 12, 13, 14])]
    assert together == alone
    assert model.generate(PROMPTS[2:], generator=seeded([13, 14]), **kw) == together[2:]
    assert len({tuple(r) for r in model.generate([PROMPTS[0]] * 3, generator=seeded([1, 2, 3]), **kw)}) > 1
    with pytest.raises(ValueError, match="generator"):
        model.generate(PROMPTS, generator=seeded([1, 2]), **kw)


def test_cache_is_allocated_once_at_the_calls_size(model, monkeypatch):
    import models.serving as serving

    sizes = []
    real = serving.CpuDecodeStep.__init__

    def record(self, *args, **kwargs):
        real(self, *args, **kwargs)
        sizes.append(tuple(self.k.shape))

    monkeypatch.setattr(serving.CpuDecodeStep, "__init__", record)
    model.generate(PROMPTS, max_new_tokens=6, stop_token_ids=())
    # (layers, batch, kv heads, longest prompt + max_new_tokens in whole pages of 16, head dim)
    assert sizes == [(2, 4, 2, 32, 32)]


def test_dynamic_ntk_within_max_positions_equals_the_uncached_forward():
    """A call whose pages (16 positions) pass max_position_embeddings (60) while its sequences do not: the RoPE
    table keeps the plain base (dynamic NTK re-bases only tables longer than max_position_embeddings)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(InternLM2Config.preset("micro"), max_position_embeddings=60,
                              rope_scaling={"type": "dynamic", "factor": 2.0})
    m = InternLM2ForCausalLM(cfg).eval()
    prompt = PROMPTS[2] * 4                               # 44 tokens + 14 new = 58 <= 60 < 64 (4 pages)
    assert m.generate([prompt], max_new_tokens=14, stop_token_ids=()) == [uncached_greedy(m, prompt, 14, ())]
    with pytest.raises(NotImplementedError, match="dynamic"):
        m.generate([prompt], max_new_tokens=17)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="prompts"):
        model.generate([], 4)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        model.generate([[1], []], 4)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        model.generate([[1, 101]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([[1]], -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1]], 4, temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1]], 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1]], 4, top_p=0.9)                 # greedy ignores top_p: refuse rather than ignore
    with pytest.raises(ValueError, match="stop_token_ids"):
        model.generate([[1]], 4, stop_token_ids=(2.5,))
