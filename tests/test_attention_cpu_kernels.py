"""The extension's CPU attention kernels (csrc/cpu/attention_kernels.h, internlm_kernels/cpu/attention.py) against
reference.flash_attn_varlen in float64: many unequal documents (empty ones, one-token ones, lengths that end mid
register tile, mid 32-query block and mid 32-key panel), GQA ratios 1, 2, 4, causal and not, forward (out and lse)
and backward, each ISA build the CPU has. torch.empty is NaN-poisoned while a test runs, so an output element the
kernels forget to write fails. The kernels sum in float32 (with FMAs, in another order than the reference), so the
project's fp32 tolerance (1e-5) applies; observed errors are ~1e-6 relative at head dim 128.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from test_attention import _poison_empty  # noqa: F401  (autouse fixture)
from torch._inductor.compile_fx import compile_fx

import internlm_kernels as ik
from internlm_kernels import _ext, reference
from internlm_kernels.cpu import attention as ca

pytestmark = pytest.mark.skipif(_ext.why_unavailable("cpu") is not None, reason="the extension is not built")

LENS_Q = [1, 0, 17, 64, 65, 33, 130, 7, 3, 97]
LENS_K_CAUSAL = [1, 4, 17, 64, 70, 33, 131, 7, 50, 97]     # >= the queries: every query sees a key
LENS_K = [2, 0, 9, 64, 0, 40, 129, 1, 3, 100]              # non-causal: any, an empty one among them


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _isas():
    """The ISA codes whose builds this CPU runs (0 baseline, 1 AVX2, 2 AVX-512), each once."""
    return sorted({_ext.load().attention_isa_cpu(code) for code in (0, 1, 2)})


def _inputs(causal, hq, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    lens_k = LENS_K_CAUSAL if causal else LENS_K
    q = torch.randn(sum(LENS_Q), hq, d, generator=g)
    k = torch.randn(sum(lens_k), hkv, d, generator=g)
    v = torch.randn(sum(lens_k), hkv, d, generator=g)
    dout = torch.randn(sum(LENS_Q), hq, d, generator=g)
    return q, k, v, dout, _cu(LENS_Q), _cu(lens_k)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 32), (4, 2, 32), (8, 2, 32), (4, 2, 16), (4, 1, 64), (2, 2, 128)])
def test_kernels_match_reference_fwd_bwd(monkeypatch, isa, causal, hq, hkv, d):
    monkeypatch.setattr(ca, "isa", lambda: isa)
    q, k, v, dout, cu_q, cu_k = _inputs(causal, hq, hkv, d, seed=hq * 1000 + d + causal)
    scale = 0.7 * d ** -0.5
    out, lse = ca.forward(q, k, v, cu_q, cu_k, scale, causal)
    dq, dk, dv = ca.backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    expect, expect_lse = reference.flash_attn_varlen(q64, k64, v64, cu_q, cu_k, scale, causal)
    expect_grads = torch.autograd.grad(expect, (q64, k64, v64), dout.double())
    assert_close(out, expect)
    assert_close(lse, expect_lse)
    for name, got, want in zip("qkv", (dq, dk, dv), expect_grads):
        assert_close(got, want, msg=f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_backend_runs_the_kernels_through_autograd(causal):
    """flash_attn_varlen_func on the cpu backend takes the kernels for float32 (its grad_fn is theirs) and matches
    the reference in values and gradients, for q, k, v sliced from one packed tensor (non-contiguous)."""
    q, k, v, dout, cu_q, cu_k = _inputs(causal, 4, 2, 32, seed=7)
    lens_k_total = k.shape[0]
    qkv = torch.cat([q.flatten(1), torch.zeros(q.shape[0], 1)], 1).requires_grad_(True)
    qv = qkv[:, :-1].view_as(q)
    kl, vl = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
    with ik.use_backend(attention="cpu"):
        out = ik.flash_attn_varlen_func(qv, kl, vl, cu_q, cu_k, max(LENS_Q), lens_k_total, causal=causal)
    assert type(out.grad_fn).__name__ == "AttentionFunctionBackward"
    grads = torch.autograd.grad(out, (qkv, kl, vl), dout)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    expect, _ = reference.flash_attn_varlen(q64, k64, v64, cu_q, cu_k, causal=causal)
    expect_grads = torch.autograd.grad(expect, (q64, k64, v64), dout.double())
    assert_close(out, expect)
    assert_close(grads[0][:, :-1].view_as(q), expect_grads[0])
    assert bool((grads[0][:, -1] == 0).all())
    assert_close(grads[1], expect_grads[1])
    assert_close(grads[2], expect_grads[2])


def test_under_inference_mode():
    q, k, v, _, cu_q, cu_k = _inputs(True, 4, 2, 32, seed=3)
    with torch.inference_mode(), ik.use_backend(attention="cpu"):
        out = ik.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K_CAUSAL), causal=True)
    expect, _ = reference.flash_attn_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=True)
    assert_close(out, expect)


def test_other_dtypes_and_head_dims_keep_the_sdpa_path():
    q, k, v, _, cu_q, cu_k = _inputs(True, 4, 2, 32, seed=5)
    assert ca.runs(q, k, v)
    assert not ca.runs(q.double(), k.double(), v.double())
    assert not ca.runs(q[..., :24], k[..., :24], v[..., :24])
    with ik.use_backend(attention="cpu"):
        out = ik.flash_attn_varlen_func(q[..., :24], k[..., :24], v[..., :24], cu_q, cu_k, 130, 131, causal=True)
    expect, _ = reference.flash_attn_varlen(q[..., :24].double(), k[..., :24].double(), v[..., :24].double(), cu_q,
                                            cu_k, causal=True)
    assert_close(out, expect)


def test_nan_in_a_query_reaches_its_output_row():
    """A NaN query yields NaN in its own output row (never a finite value that would hide it), and only there."""
    q, k, v, _, cu_q, cu_k = _inputs(False, 2, 2, 32, seed=11)
    q[20, 1, 5] = float("nan")
    out, _ = ca.forward(q, k, v, cu_q, cu_k, 0.2, False)
    assert bool(out[20, 1].isnan().all())
    mask = torch.ones(out.shape[:2], dtype=torch.bool)
    mask[20, 1] = False
    assert not bool(out[mask].isnan().any())


def test_fullgraph_compile_is_one_op_per_call_and_matches_eager_and_reference():
    """Under torch.compile(fullgraph=True) each cpu-backend call is one ``cpu_attention_fwd`` node, with no graph
    break: causal and full varlen attention over unequal documents (an empty one, a one-token one, one whose keys are
    empty), GQA, and flash_attn_func's (B, S, H, D) form. The op runs the kernels as eager does, so values and
    gradients equal eager's bit for bit, and the float64 reference's within fp32 rounding. A second call under
    inference_mode (a recompile: grad mode is guarded) gives the same values with no autograd node."""
    q, k, v, dout, cu_q, cu_k = _inputs(True, 4, 2, 32, seed=13)
    _, k_full, v_full, _, _, cu_k_full = _inputs(False, 4, 2, 32, seed=14)
    g = torch.Generator().manual_seed(15)
    q4, k4, v4 = (torch.randn(2, 23, h, 32, generator=g) for h in (4, 2, 2))
    args = tuple(t.clone().requires_grad_(True) for t in (q, k, v, k_full, v_full, q4, k4, v4))

    def attn(q, k, v, k_full, v_full, q4, k4, v4):
        return (ik.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 130, 131, causal=True),
                ik.flash_attn_varlen_func(q, k_full, v_full, cu_q, cu_k_full, 130, 129),
                ik.flash_attn_func(q4, k4, v4, causal=True))

    seen = []

    def recording_inductor(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    with ik.use_backend(attention="cpu"):
        eager = attn(*args)
        compiled = torch.compile(attn, fullgraph=True, backend=recording_inductor)
        traced = compiled(*args)
        assert len([op for op in seen if "cpu_attention_fwd" in op]) == 3, seen
        assert not [op for op in seen if "scaled_dot_product" in op], seen
        with torch.inference_mode():
            inferred = compiled(*(t.detach() for t in args))
    douts = (dout, dout.flip(0), torch.randn(q4.shape, generator=g))
    eager_grads = torch.autograd.grad(eager, args, douts)
    traced_grads = torch.autograd.grad(traced, args, douts)
    args64 = tuple(t.detach().double().requires_grad_(True) for t in args)
    cu4 = _cu([23, 23])
    expect = (reference.flash_attn_varlen(*args64[:3], cu_q, cu_k, causal=True)[0],
              reference.flash_attn_varlen(args64[0], *args64[3:5], cu_q, cu_k_full)[0],
              reference.flash_attn_varlen(*(t.flatten(0, 1) for t in args64[5:]), cu4, cu4, causal=True)[0]
              .view(q4.shape))
    expect_grads = torch.autograd.grad(expect, args64, tuple(d.double() for d in douts))
    for got, same, inf, want in zip(traced, eager, inferred, expect):
        assert torch.equal(got, same)
        assert torch.equal(inf, same) and inf.grad_fn is None
        assert_close(got, want)
    names = ("q", "k", "v", "k_full", "v_full", "q4", "k4", "v4")
    for name, got, same, want in zip(names, traced_grads, eager_grads, expect_grads):
        assert torch.equal(got, same), name
        assert_close(got, want, msg=f"d{name}")


def test_threads_split_tasks_without_changing_a_bit():
    """With 2 threads the (document, KV head) tasks run in parallel; each output element has one writer and the
    same summation order, so the results are bitwise those of one thread."""
    lens = [300, 5, 129, 0, 257, 64]
    g = torch.Generator().manual_seed(17)
    q, k, v, dout = (torch.randn(sum(lens), h, 32, generator=g) for h in (4, 2, 2, 4))
    cu = _cu(lens)
    prior = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, lse = ca.forward(q, k, v, cu, cu, 0.2, True)
            results.append((out, lse, *ca.backward(dout, q, k, v, out, lse, cu, cu, 0.2, True)))
    finally:
        torch.set_num_threads(prior)
    for one, two in zip(*results):
        assert torch.equal(one, two)
