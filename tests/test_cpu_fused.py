"""The cpu backends of rms_norm, swiglu and rotary (autograd Functions with hand-written backwards,
internlm_kernels/cpu/) against internlm_kernels/reference.py in float64: forward and backward, odd sizes,
residual/prenorm variants, packed sequences of unequal length with offsets, partial rotary."""
import pytest
import torch
from conftest import assert_close, oracle_leaf

import internlm_kernels as ik
from internlm_kernels import reference as ref

LENGTHS = [5, 1, 17, 0, 9, 30, 2]


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _grads_match(outs, leaves, expects, ref_leaves):
    outs, expects = [o for o in outs if o is not None], [e for e in expects if e is not None]
    douts = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, leaves, douts)
    want = torch.autograd.grad(expects, ref_leaves, [d.double() for d in douts])
    for g, w in zip(got, want):
        assert_close(g, w)


@pytest.mark.parametrize("shape", [(37, 96), (2, 5, 257), (1, 1)])
@pytest.mark.parametrize("residual,prenorm", [(False, False), (False, True), (True, False), (True, True)])
def test_rms_norm_matches_reference(shape, residual, prenorm):
    x = torch.randn(*shape, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_(True)
    r = torch.randn(*shape, requires_grad=True) if residual else None
    leaves = [t for t in (x, w, r) if t is not None]
    with ik.use_backend(rms_norm="cpu"):
        got = ik.rms_norm(x, w, 1e-5, r, prenorm)
    ref_leaves = [oracle_leaf(t, torch.float32) for t in leaves]
    expect = ref.rms_norm(ref_leaves[0], ref_leaves[1], 1e-5, ref_leaves[2] if residual else None, prenorm)
    got, expect = (got, expect) if prenorm else ((got,), (expect,))
    for g, e in zip(got, expect):
        assert_close(g, e)
    _grads_match(got, leaves, expect, ref_leaves)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("shape", [(37, 33), (2, 3, 130)])
def test_swiglu_matches_reference(packed, shape):
    if packed:
        gu = torch.randn(*shape[:-1], 2 * shape[-1], requires_grad=True)
        leaves, call, oracle = [gu], lambda: ik.swiglu_packed(gu), ref.swiglu_packed
    else:
        g, u = torch.randn(*shape, requires_grad=True), torch.randn(*shape, requires_grad=True)
        leaves, call, oracle = [g, u], lambda: ik.swiglu(g, u), ref.swiglu
    with ik.use_backend(swiglu="cpu"):
        got = call()
    ref_leaves = [oracle_leaf(t, torch.float32) for t in leaves]
    expect = oracle(*ref_leaves)
    assert_close(got, expect)
    _grads_match([got], leaves, [expect], ref_leaves)


def _tables(seqlen, rotary_dim):
    return ref.rotary_cos_sin(seqlen, rotary_dim, theta=10000.0)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rotary_dim", [32, 20])
@pytest.mark.parametrize("offsets", ["zero", "int", "tensor"])
def test_apply_rotary_matches_reference(packed, rotary_dim, offsets):
    if packed:
        cu, x = _cu(LENGTHS), torch.randn(sum(LENGTHS), 3, 32, requires_grad=True)
        n_seqs = len(LENGTHS)
    else:
        cu, x = None, torch.randn(2, 19, 3, 32, requires_grad=True)
        n_seqs = 2
    seqlen_offsets = {"zero": 0, "int": 5, "tensor": torch.arange(n_seqs) * 2}[offsets]
    cos, sin = _tables(64, rotary_dim)
    with ik.use_backend(rotary="cpu"):
        got = ik.apply_rotary_emb(x, cos, sin, seqlen_offsets=seqlen_offsets, cu_seqlens=cu)
    xo = oracle_leaf(x, torch.float32)
    expect = ref.apply_rotary_emb(xo, cos.double(), sin.double(), False, seqlen_offsets, cu)
    assert_close(got, expect)
    _grads_match([got], [x], [expect], [xo])


def test_apply_rotary_inplace():
    cos, sin = _tables(32, 16)
    x = torch.randn(2, 9, 2, 16)
    expect = ref.apply_rotary_emb(x, cos, sin)
    with ik.use_backend(rotary="cpu"):
        out = ik.apply_rotary_emb(x, cos, sin, inplace=True)
    assert out is x
    assert_close(x, expect)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rotary_dim", [32, 24])
def test_qkv_rotary_matches_reference(packed, rotary_dim):
    n_kv_heads, group, D = 2, 3, 32
    F = n_kv_heads * (group + 2) * D
    if packed:
        cu, offsets = _cu(LENGTHS), torch.arange(len(LENGTHS))
        w = torch.randn(sum(LENGTHS), F, requires_grad=True)
    else:
        cu, offsets = None, 4
        w = torch.randn(2, 19, F, requires_grad=True)
    cos, sin = _tables(48, rotary_dim)
    with ik.use_backend(rotary="cpu"):
        got = ik.qkv_rotary(w, cos, sin, n_kv_heads, D, cu_seqlens=cu, seqlen_offsets=offsets)
    wo = oracle_leaf(w, torch.float32)
    expect = ref.qkv_rotary(wo, cos.double(), sin.double(), n_kv_heads, D, False, offsets, cu)
    for t, e in zip(got, expect):
        assert t.shape == e.shape and t.is_contiguous()
        assert_close(t, e)
    _grads_match(got, [w], expect, [wo])


def test_auto_runs_the_reference_for_what_the_cpu_path_lacks_and_forced_cpu_refuses():
    cos, sin = _tables(16, 8)
    x = torch.randn(1, 4, 2, 8)
    expect = ref.apply_rotary_emb(x, cos, sin, interleaved=True)
    assert_close(ik.apply_rotary_emb(x, cos, sin, interleaved=True), expect)
    with ik.use_backend(rotary="cpu"), pytest.raises(NotImplementedError, match="interleaved"):
        ik.apply_rotary_emb(x, cos, sin, interleaved=True)
    g = torch.randn(3, 4, dtype=torch.bfloat16)
    assert_close(ik.swiglu(g, g), ref.swiglu(g, g))
    with ik.use_backend(swiglu="cpu"), pytest.raises(NotImplementedError, match="bfloat16"):
        ik.swiglu(g, g)
    with ik.use_backend(rms_norm="cpu"), pytest.raises(NotImplementedError, match="bfloat16"):
        ik.rms_norm(g, torch.ones(4, dtype=torch.bfloat16))


def test_cpu_paths_under_fullgraph_compile_match_eager():
    """rms_norm, swiglu (packed and separate), qkv_rotary, linear and linear cross-entropy on their cpu backends,
    traced together (the traced branches avoid out= into strided views, which Dynamo refuses, and the extension's
    kernels, which Inductor cannot see into)."""
    x, r = torch.randn(13, 32, requires_grad=True), torch.randn(13, 32, requires_grad=True)
    w, gu = torch.randn(32, requires_grad=True), torch.randn(13, 64, requires_grad=True)
    wqkv, W = torch.randn(13, 2 * 4 * 8, requires_grad=True), torch.randn(11, 32, requires_grad=True)
    cos, sin = _tables(16, 8)
    cu, target = _cu([5, 8]), torch.randint(0, 11, (13,))

    def step(x, r, w, gu, wqkv, W):
        y, h = ik.rms_norm(x, w, 1e-5, r, True)
        q, k, v = ik.qkv_rotary(wqkv, cos, sin, 2, 8, cu_seqlens=cu, max_seqlen=8)
        loss = ik.fused_linear_cross_entropy(y + h + ik.swiglu_packed(gu)[:, :32], W, target)
        return (loss + q.square().sum() + k.sum() + v.sum() + ik.linear(x, W).square().sum()
                + ik.swiglu(x, r, 0.7, 1.3).square().sum())

    args = (x, r, w, gu, wqkv, W)
    eager = step(*args)
    traced = torch.compile(step, fullgraph=True)(*args)
    assert_close(traced, eager, rtol=1e-5, atol=1e-4)
    for g, e in zip(torch.autograd.grad(traced, args), torch.autograd.grad(eager, args)):
        assert_close(g, e, rtol=1e-5, atol=1e-4)
