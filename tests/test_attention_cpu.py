"""The cpu attention backend (torch SDPA per document) against the reference, and its limits."""
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
