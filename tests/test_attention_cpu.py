"""The cpu attention backend (torch SDPA per document) against the reference, and its limits."""
import contextlib

import pytest
import torch
from conftest import assert_close

import internlm_kernels as ik
from internlm_kernels import reference


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_cpu_backend_matches_reference_fwd_bwd(causal, hq, hkv):
    lens_q = [1, 17, 64, 0, 33]
    lens_k = [3, 17, 64, 5, 40] if causal else [2, 9, 64, 0, 31]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    D = 32
    q = torch.randn(sum(lens_q), hq, D, requires_grad=True)
    k = torch.randn(sum(lens_k), hkv, D, requires_grad=True)
    v = torch.randn(sum(lens_k), hkv, D, requires_grad=True)
    dout = torch.randn(sum(lens_q), hq, D)
    with ik.use_backend(attention="cpu"):
        out = ik.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # The oracle runs in float64 on copies of the same values.
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    expect, _ = reference.flash_attn_varlen(q64, k64, v64, cu_q, cu_k, causal=causal)
    expect_grads = torch.autograd.grad(expect, (q64, k64, v64), dout.double())
    assert_close(out, expect)
    for g, e in zip(grads, expect_grads):
        assert_close(g, e)


def test_auto_on_cpu_uses_sdpa_path_and_reference_for_the_rest():
    assert ik.backend.choose("attention", "cpu") == "cpu"
    cu = _cu([5, 7])
    q, k, v = torch.randn(12, 2, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    out = ik.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True, softcap=3.0)
    assert_close(out, reference.flash_attn_varlen(q, k, v, cu, cu, causal=True, softcap=3.0)[0])


@pytest.mark.parametrize("kwargs", [dict(softcap=2.0), dict(window_size=(3, 0)), dict(return_attn_probs=True)])
def test_forced_cpu_backend_refuses_what_it_lacks(kwargs):
    cu = _cu([5, 7])
    q = torch.randn(12, 2, 16)
    with ik.use_backend(attention="cpu"), pytest.raises(NotImplementedError, match="cpu attention backend"):
        ik.flash_attn_varlen_func(q, q, q, cu, cu, 7, 7, **kwargs)


def test_forced_cpu_backend_refuses_causal_rows_without_keys():
    q, k = torch.randn(6, 2, 16), torch.randn(2, 2, 16)
    with ik.use_backend(attention="cpu"), pytest.raises(NotImplementedError, match="more queries than keys"):
        ik.flash_attn_varlen_func(q, k, k, _cu([6]), _cu([2]), 6, 2, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_backend_equal_length_documents_one_batched_call(causal):
    """Equal-length documents go through one 4-D SDPA call over views; same values as the reference."""
    cu = _cu([23, 23, 23])
    q = torch.randn(69, 6, 16, requires_grad=True)
    k = torch.randn(69, 3, 16, requires_grad=True)
    v = torch.randn(69, 3, 16, requires_grad=True)
    dout = torch.randn(69, 6, 16)
    with ik.use_backend(attention="cpu"):
        out = ik.flash_attn_varlen_func(q, k, v, cu, cu, 23, 23, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    expect, _ = reference.flash_attn_varlen(q64, k64, v64, cu, cu, causal=causal)
    assert_close(out, expect)
    for g, e in zip(grads, torch.autograd.grad(expect, (q64, k64, v64), dout.double())):
        assert_close(g, e)


def _op_inputs(lens_q, lens_k, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), 4, d, generator=g).requires_grad_(True)
    k = torch.randn(sum(lens_k), 2, d, generator=g).requires_grad_(True)
    v = torch.randn(sum(lens_k), 2, d, generator=g).requires_grad_(True)
    return q, k, v, torch.randn(sum(lens_q), 4, d, generator=g), _cu(lens_q), _cu(lens_k)


@pytest.mark.parametrize("path,d,lens_k", [
    ("kernels", 32, [3, 17, 64, 5, 40]),
    ("sdpa", 32, [3, 17, 64, 5, 40]),          # pinned
    ("sdpa", 24, [3, 17, 64, 5, 40]),          # a head dim the kernels lack
    ("reference", 32, [3, 17, 30, 5, 40]),     # causal rows that see no key (64 queries, 30 keys)
])
def test_cpu_attention_op_each_path_matches_reference(path, d, lens_k, monkeypatch):
    """The op a compiled graph calls (ops/attention_cpu.py), through the dispatcher with its registered backward, on
    each path it takes inside: values and gradients equal the float64 reference's, and ``path`` says which ran.
    Causal, GQA, unequal documents with an empty and a one-token one."""
    from internlm_kernels import _ext
    from internlm_kernels.ops import attention_cpu

    if path == "kernels" and _ext.why_unavailable("cpu") is not None:
        pytest.skip("the extension is not built")
    monkeypatch.setenv("INTERNLM_KERNELS_CPU_ATTENTION", "sdpa" if path == "sdpa" else "kernels")
    lens_q = [1, 17, 64, 0, 33]
    q, k, v, dout, cu_q, cu_k = _op_inputs(lens_q, lens_k, d)
    out, lse, ran = torch.ops.internlm_kernels.cpu_attention_fwd(q, k, v, cu_q, cu_k, 0.2, True, True, False)
    assert int(ran) == {"kernels": attention_cpu.KERNELS, "sdpa": attention_cpu.SDPA,
                        "reference": attention_cpu.REFERENCE}[path]
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    expect, expect_lse = reference.flash_attn_varlen(q64, k64, v64, cu_q, cu_k, 0.2, True)
    assert_close(out, expect)
    if path != "sdpa":     # SDPA returns no lse (the op's is zeros then, read by nothing)
        assert_close(lse, expect_lse)
    for name, g, e in zip("qkv", grads, torch.autograd.grad(expect, (q64, k64, v64), dout.double())):
        assert_close(g, e, msg=f"d{name}")
    with torch.inference_mode():
        again = torch.ops.internlm_kernels.cpu_attention_fwd(q, k, v, cu_q, cu_k, 0.2, True, False, False)[0]
    assert torch.equal(again, out)
    with pytest.raises(NotImplementedError, match="more queries than keys") if path == "reference" else \
            contextlib.nullcontext():
        torch.ops.internlm_kernels.cpu_attention_fwd(q, k, v, cu_q, cu_k, 0.2, True, True, True)   # forced cpu


@pytest.mark.parametrize("mode", ["kernels", "sdpa"])
def test_cpu_attention_opcheck(mode, monkeypatch):
    monkeypatch.setenv("INTERNLM_KERNELS_CPU_ATTENTION", mode)
    q, k, v, dout, cu_q, cu_k = _op_inputs([5, 0, 11, 1], [7, 3, 11, 1], 16, seed=1)
    args = (q, k, v, cu_q, cu_k, 0.25, True, True, False)
    torch.library.opcheck(torch.ops.internlm_kernels.cpu_attention_fwd.default, args)
    out, lse, ran = torch.ops.internlm_kernels.cpu_attention_fwd(*args)
    torch.library.opcheck(torch.ops.internlm_kernels.cpu_attention_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), ran, cu_q, cu_k, 0.25,
                           True))
