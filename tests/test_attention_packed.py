"""flash-attn's packed entry points, unpad_input / pad_input and window_size given as any pair of integers: each
against reference.py's attention on the unpacked tensors (forward and the gradient in the packed layout)."""
import numpy as np
import pytest
import torch
from conftest import assert_close, oracle_leaf

import internlm_kernels as ik
from internlm_kernels import reference


def _ref_varlen(q, k, v, cu_q, cu_k, **kw):
    return reference.flash_attn_varlen(q, k, v, cu_q, cu_k, **kw)[0]


def test_varlen_qkvpacked_and_kvpacked_match_reference():
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 12, 19], dtype=torch.int32)
    qkv = torch.randn(19, 3, 4, 16, requires_grad=True)
    kw = dict(causal=True, window_size=(4, 0), softcap=3.0)
    with ik.use_backend("triton"):
        out = ik.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, **kw)
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    leaf = oracle_leaf(qkv, torch.float32)
    want = _ref_varlen(*leaf.unbind(1), cu, cu, **kw)
    (want_dqkv,) = torch.autograd.grad(want, leaf, dout.double())
    assert dqkv.shape == qkv.shape
    assert_close(out, want)
    assert_close(dqkv, want_dqkv)

    q = torch.randn(19, 4, 16, requires_grad=True)
    kv = torch.randn(23, 2, 2, 16, requires_grad=True)  # GQA: 2 KV heads for 4 query heads
    cu_k = torch.tensor([0, 9, 14, 23], dtype=torch.int32)
    with ik.use_backend("triton"):
        out = ik.flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 7, 9, causal=True)
    got = torch.autograd.grad(out, (q, kv), dout)
    lq, lkv = oracle_leaf(q, torch.float32), oracle_leaf(kv, torch.float32)
    want = _ref_varlen(lq, *lkv.unbind(1), cu, cu_k, causal=True)
    assert_close(out, want)
    for g, e in zip(got, torch.autograd.grad(want, (lq, lkv), dout.double())):
        assert_close(g, e)


def test_batched_packed_functions_match_flash_attn_func():
    torch.manual_seed(1)
    qkv = torch.randn(2, 6, 3, 2, 8)
    q, k, v = qkv.unbind(2)
    want = ik.flash_attn_func(q, k, v, causal=True)
    assert_close(ik.flash_attn_qkvpacked_func(qkv, causal=True), want)
    assert_close(ik.flash_attn_kvpacked_func(q, qkv[:, :, 1:], causal=True), want)
    with torch.inference_mode(), ik.use_backend("triton"):
        assert_close(ik.flash_attn_qkvpacked_func(qkv, causal=True), want)
    with pytest.raises(ValueError, match="qkv"):
        ik.flash_attn_qkvpacked_func(qkv[:, :, :2])


def test_unpad_then_varlen_then_pad_equals_masked_attention():
    torch.manual_seed(2)
    B, S, H, D = 3, 7, 2, 8
    x = torch.randn(B, S, 3, H, D, requires_grad=True)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    packed, indices, cu, max_seqlen, seqused = ik.unpad_input(x, mask)
    assert packed.shape == (14, 3, H, D) and max_seqlen == 7 and isinstance(max_seqlen, int)
    torch.testing.assert_close(cu, torch.tensor([0, 5, 12, 14], dtype=torch.int32))
    torch.testing.assert_close(seqused, torch.tensor([5, 7, 2], dtype=torch.int32))
    out = ik.pad_input(ik.flash_attn_varlen_qkvpacked_func(packed, cu, max_seqlen, causal=True), indices, B, S)
    assert out.shape == (B, S, H, D)
    assert torch.all(out[0, 5:] == 0) and torch.all(out[2, 2:] == 0)
    for b, n in enumerate((5, 7, 2)):
        q, k, v = x[b, :n].unbind(1)
        want = ik.flash_attn_func(q[None], k[None], v[None], causal=True)[0]
        assert_close(out[b, :n], want)
    out.sum().backward()
    assert torch.all(x.grad[0, 5:] == 0) and x.grad[1].abs().sum() > 0
    with pytest.raises(NotImplementedError, match="unused_mask"):
        ik.unpad_input(x, mask, unused_mask=mask)


@pytest.mark.parametrize("window", [(torch.tensor(3), torch.tensor(0)), torch.tensor([3, 0]),
                                    (np.int64(3), np.int32(0)), [3, 0]], ids=["0d-tensors", "tensor", "numpy", "list"])
def test_window_size_any_integer_pair(window):
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 9, 2, 8) for _ in range(3))
    want = ik.flash_attn_func(q, k, v, causal=True, window_size=(3, 0))
    assert_close(ik.flash_attn_func(q, k, v, causal=True, window_size=window), want)


@pytest.mark.parametrize("window", [(1.5, 0), (3,), (True, 0), (-2, 0), 4, torch.tensor([1.0, 0.0])])
def test_window_size_rejects_non_integer_pairs(window):
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="window_size"):
        ik.flash_attn_func(q, q, q, window_size=window)
