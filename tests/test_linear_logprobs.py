"""Fused linear log-probs and entropy (Triton backend) against reference.linear_logprobs in float64.

Chunks and vocab blocks are shrunk (the ``small_tiles`` fixture of test_cross_entropy, whose chunk sizing this op
shares) so small shapes cross both boundaries; torch.empty is NaN-poisoned while a test runs.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from test_cross_entropy import _poison_empty, make_inputs  # noqa: F401  (autouse fixture)

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.triton import cross_entropy as ce_kernels
from internlm_kernels.triton import linear_logprobs as kernels

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"


@pytest.fixture
def small_tiles(monkeypatch):
    """Chunks of ``rows`` tokens and vocab blocks of ``block`` columns."""
    def set_tiles(rows: int, block: int, vocab: int, element_size: int):
        monkeypatch.setattr(ce_kernels, "LOGITS_CHUNK_BYTES", rows * vocab * element_size)
        monkeypatch.setattr(kernels, "MAX_BLOCK_V", block)
    return set_tiles


def check(hidden, weight, targets, temperature=1.0, with_entropy=True, entropy_grad=True, tol=1e-5):
    with ik.use_backend("triton"):
        out = ik.fused_linear_logprobs(hidden, weight, targets, temperature=temperature, return_entropy=with_entropy)
    logp, ent = out if with_entropy else (out, None)
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref_logp, ref_ent = reference.linear_logprobs(h64, w64, targets, temperature)
    g = torch.randn_like(logp)
    e = torch.randn_like(logp) if with_entropy and entropy_grad else None
    loss = (logp * g).sum() + ((ent * e).sum() if e is not None else 0.0)
    ref_loss = (ref_logp * g.double()).sum() + ((ref_ent * e.double()).sum() if e is not None else 0.0)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref_loss, (h64, w64))
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert_close(logp.double(), ref_logp, rtol=tol, atol=tol, msg="logprob")
    if with_entropy:
        assert_close(ent.double(), ref_ent, rtol=tol, atol=tol, msg="entropy")
    for name, got, want in zip(("dhidden", "dweight"), grads, ref_grads):
        assert got.dtype == hidden.dtype
        scale = want.abs().max().clamp(min=1e-30)
        assert_close(got.double() / scale, want / scale, rtol=tol, atol=tol, msg=name)
    return logp, ent


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(temperature, dtype, small_tiles):
    # 45 tokens in chunks of 16 (tail 13), vocab 211 in blocks of 64 (tail 19), ignored tokens in two chunks
    small_tiles(16, 64, 211, torch.tensor([], dtype=dtype).element_size())
    # bf16: the chunk's logits are bf16 (as in eager bf16 and the fused cross-entropy), so each is off by up to half
    # an ulp; logits of std 1 keep the entropy's resulting error inside the 16-bit tolerance.
    hidden, weight, targets, _ = make_inputs(45, 24, 211, dtype, ignored=(0, 17, 44),
                                             scale=3.0 if dtype == torch.float32 else 1.0)
    logp, ent = check(hidden, weight, targets, temperature, tol=1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(logp[[0, 17, 44]], torch.zeros(3)) and torch.equal(ent[[0, 17, 44]], torch.zeros(3))


def test_logprobs_only_and_unused_entropy(small_tiles):
    small_tiles(8, 32, 50, 4)
    hidden, weight, targets, _ = make_inputs(20, 16, 50, torch.float32, ignored=(5,))
    check(hidden, weight, targets, with_entropy=False)
    check(hidden, weight, targets, with_entropy=True, entropy_grad=False)


def test_every_token_ignored_gives_zero_and_zero_gradient():
    hidden, weight, targets, _ = make_inputs(6, 8, 30, torch.float32, ignored=range(6))
    with ik.use_backend("triton"):
        logp, ent = ik.fused_linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert torch.equal(logp, torch.zeros(6)) and torch.equal(ent, torch.zeros(6))
    dh, dw = torch.autograd.grad((logp + ent).sum(), (hidden, weight))
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


def test_logprobs_match_cross_entropy_and_leading_dims():
    """logprob = -cross-entropy (reduction none); (B, S, H) hidden with int32 targets keeps the (B, S) shape."""
    hidden, weight, targets, _ = make_inputs(12, 8, 40, torch.float32, ignored=(2,))
    with ik.use_backend("triton"):
        logp = ik.fused_linear_logprobs(hidden.reshape(3, 4, 8), weight, targets.reshape(3, 4).int())
        ce = ik.fused_linear_cross_entropy(hidden, weight, targets, reduction="none")
    assert logp.shape == (3, 4)
    assert_close(logp.reshape(-1), -ce)


def test_reference_backend_agrees_and_inference_mode():
    hidden, weight, targets, _ = make_inputs(10, 8, 40, torch.float32, ignored=(1,))
    with ik.use_backend("reference"):
        want = ik.fused_linear_logprobs(hidden, weight, targets, 0.8, return_entropy=True)
    with ik.use_backend("triton"), torch.inference_mode():
        got = ik.fused_linear_logprobs(hidden, weight, targets, 0.8, return_entropy=True)
    for g, w in zip(got, want):
        assert_close(g, w)


def test_opcheck_and_fullgraph_compile():
    hidden, weight, targets, _ = make_inputs(13, 8, 19, torch.float32, ignored=(1,))
    torch.library.opcheck(torch.ops.internlm_kernels.linear_logprobs_fwd.default,
                          (hidden, weight, targets, 0.7, -100))
    _, _, stats = torch.ops.internlm_kernels.linear_logprobs_fwd(hidden.detach(), weight.detach(), targets, 0.7, -100)
    torch.library.opcheck(torch.ops.internlm_kernels.linear_logprobs_bwd.default,
                          (hidden.detach(), weight.detach(), targets, stats, torch.randn(13), torch.randn(13), 0.7,
                           -100, True, True))

    def step(h, w, t):
        with ik.use_backend("triton"):
            logp, ent = ik.fused_linear_logprobs(h, w, t, temperature=0.7, return_entropy=True)
        return (logp * 2.0 + ent).sum()

    compiled, eager = torch.compile(step, fullgraph=True)(hidden, weight, targets), step(hidden, weight, targets)
    assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, (hidden, weight)), torch.autograd.grad(eager, (hidden, weight))):
        assert_close(got, want)


BAD_INPUTS = [
    ("hidden", lambda h, w, t: dict(hidden=h.double())),
    ("weight", lambda h, w, t: dict(weight=w.half())),
    ("weight", lambda h, w, t: dict(weight=w[:, :-1])),
    ("targets", lambda h, w, t: dict(targets=t.float())),
    ("targets", lambda h, w, t: dict(targets=t[:-1])),
    ("targets", lambda h, w, t: dict(targets=torch.where(t == 3, 50, t))),
    ("temperature", lambda h, w, t: dict(temperature=0.0)),
    ("return_entropy", lambda h, w, t: dict(return_entropy=1)),
    ("ignore_index", lambda h, w, t: dict(ignore_index=None)),
]


@pytest.mark.parametrize("name,change", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_value_error_naming_it(name, change):
    hidden, weight, targets, _ = make_inputs(10, 8, 50, torch.float32, device="cpu")
    targets[0] = 3
    kwargs = dict(hidden=hidden, weight=weight, targets=targets) | change(hidden, weight, targets)
    with pytest.raises(ValueError, match=name):
        ik.fused_linear_logprobs(**kwargs)


@pytest.mark.gpu
def test_gpu_vocab_92544_bf16_matches_reference():
    hidden, weight, targets, _ = make_inputs(1500, 256, 92544, torch.bfloat16, ignored=range(100, 300), scale=2.0)
    check(hidden, weight, targets, temperature=0.9, tol=1e-2)


@pytest.mark.gpu
def test_gpu_extra_peak_memory_at_16k_tokens_vocab_92544_under_1_gib():
    torch.use_deterministic_algorithms(False)  # measure without the poison fill
    hidden, weight, targets, _ = make_inputs(16384, 4096, 92544, torch.bfloat16, scale=2.0)

    def fwd_bwd():
        logp, ent = ik.fused_linear_logprobs(hidden, weight, targets, return_entropy=True)
        return torch.autograd.grad((logp + 0.01 * ent).sum(), (hidden, weight))

    fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = fwd_bwd()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del grads
    assert extra <= 2**30, f"extra peak {extra / 2**30:.2f} GiB (dW and dx included)"
