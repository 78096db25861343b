"""The extension's CPU decode attention (csrc/cpu/decode_attention_kernels.h, internlm_kernels/cpu/decode_attention.py)
against reference.flash_attn_with_kvcache in float64, on each ISA build the CPU has: rows of unequal lengths (none,
one key, lengths ending mid vector and mid reduction tile, the longest at the cache's capacity), GQA ratios 1, 2, 4,
head dims 16, 32, 64, 128, q as the decode step passes it (a strided view of the rotated q|k block) and contiguous.
Cache positions a row must not read (past its length, and slots past the batch) hold NaN, and the output buffer
starts as NaN (torch.empty is NaN-poisoned too), so a read past a row's keys or an unwritten element fails. The
kernel sums in float32 with FMAs in another order than the reference: the project's fp32 tolerance (1e-5) applies.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from test_attention import _poison_empty  # noqa: F401  (autouse fixture)

from internlm_kernels import _ext, reference
from internlm_kernels.cpu import decode_attention as da

pytestmark = pytest.mark.skipif(_ext.why_unavailable("cpu") is not None, reason="the extension is not built")

S_MAX = 70
LENGTHS = [1, 0, 17, 70, 33, 5, 64, 16, 2, 49]          # none, one, odd, VW multiples and not, the capacity


def _isas():
    """The ISA codes whose builds this CPU runs (0 baseline, 1 AVX2, 2 AVX-512), each once."""
    return sorted({_ext.load().attention_isa_cpu(code) for code in (0, 1, 2)})


def _inputs(hkv, g, d, seed, lengths=LENGTHS, s_max=S_MAX, spare_slots=2):
    """q (B, Hkv, g, D) as a view of a (B, Hkv, g + 1, D) block, caches (B + spare, Hkv, S, D) with NaN wherever a
    row must not read, lengths int64."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    q = torch.randn(B, hkv, g + 1, d, generator=gen)[:, :, :g]
    k = torch.randn(B + spare_slots, hkv, s_max, d, generator=gen)
    v = torch.randn(B + spare_slots, hkv, s_max, d, generator=gen)
    for b, n in enumerate(lengths):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    k[B:] = v[B:] = float("nan")
    return q, k, v, torch.tensor(lengths, dtype=torch.int64)


def _expected(q, k, v, lengths, scale):
    """reference.flash_attn_with_kvcache in float64 on the caches' (B, S, Hkv, D) view -> (B, Hkv·g·D)."""
    B, hkv, g, d = q.shape
    out, _ = reference.flash_attn_with_kvcache(
        q.double().reshape(B, 1, hkv * g, d), k[:B].double().transpose(1, 2), v[:B].double().transpose(1, 2),
        cache_seqlens=lengths.int(), softmax_scale=scale)
    return out.reshape(B, hkv * g * d)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("hkv,g,d", [(2, 1, 32), (2, 2, 32), (1, 4, 32), (2, 2, 16), (3, 2, 64), (1, 4, 128),
                                     (2, 4, 64)])
def test_kernel_matches_reference(monkeypatch, isa, hkv, g, d):
    monkeypatch.setattr(da, "isa", lambda: isa)
    q, k, v, lengths = _inputs(hkv, g, d, seed=100 * g + d + hkv)
    scale = 0.7 * d ** -0.5
    out = torch.full((q.shape[0], hkv * g * d), float("nan"))
    got = da.decode_attention(q, k, v, lengths, scale, out)
    assert got is out
    assert_close(got, _expected(q, k, v, lengths, scale))
    assert bool((got.view(len(LENGTHS), -1)[1] == 0).all())             # the row with no key: 0
    assert_close(da.decode_attention(q.contiguous(), k, v, lengths, scale), got, rtol=0, atol=0)


def test_large_scores_and_two_threads(monkeypatch):
    """Scores far from 0 (softmax of a scale-20 dot product: the max subtraction matters) and a launch on two OpenMP
    threads, which gives the one-thread result exactly (each (row, KV head) is one task with one writer)."""
    q, k, v, lengths = _inputs(2, 2, 32, seed=5, lengths=[256, 3, 200, 129, 1, 77, 256, 64], s_max=256)
    scale = 20 * 32 ** -0.5
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = da.decode_attention(q, k, v, lengths, scale)
        torch.set_num_threads(2)
        two = da.decode_attention(q, k, v, lengths, scale)
    finally:
        torch.set_num_threads(before)
    assert_close(one, _expected(q, k, v, lengths, scale))
    assert torch.equal(one, two)


def test_under_inference_mode():
    q, k, v, lengths = _inputs(2, 2, 32, seed=3)
    with torch.inference_mode():
        got = da.decode_attention(q, k, v, lengths, 0.2)
    assert_close(got, _expected(q, k, v, lengths, 0.2))


def test_nan_in_a_query_reaches_its_output_only():
    q, k, v, lengths = _inputs(2, 2, 32, seed=11)
    q[4, 1, 0, 7] = float("nan")
    out = da.decode_attention(q, k, v, lengths, 0.2).view(len(LENGTHS), 2, 2, 32)
    assert bool(out[4, 1, 0].isnan().all())
    mask = torch.ones(out.shape[:3], dtype=torch.bool)
    mask[4, 1, 0] = False
    assert not bool(out[mask].isnan().any())


def test_bad_input_names_the_argument():
    q, k, v, lengths = _inputs(2, 2, 32, seed=1)
    cases = {
        "q": dict(q=q.double()),
        "k_cache": dict(k=k[:, :1]),
        "v_cache": dict(v=v[..., :16]),
        "seqlens_k": dict(lengths=lengths.int()),
        "out": dict(out=torch.empty(3, 5)),
    }
    for name, change in cases.items():
        args = dict(q=q, k=k, v=v, lengths=lengths, out=None) | change
        with pytest.raises(ValueError, match=f"^{name} must"):
            da.decode_attention(args["q"], args["k"], args["v"], args["lengths"], 0.2, args["out"])
    for bad in (S_MAX + 1, -1):                  # checked in the extension before any key is read
        too_long = lengths.clone()
        too_long[3] = bad
        with pytest.raises(ValueError, match=r"seqlens_k\[3\]"):
            da.decode_attention(q, k, v, too_long, 0.2)
    assert not da.runs(24)                       # no kernel for this head dim: the decode step keeps its bmm form
    q24, k24, v24, _ = _inputs(2, 2, 24, seed=2)
    with pytest.raises(ValueError, match="head dim 24"):
        da.decode_attention(q24, k24, v24, lengths, 0.2)
