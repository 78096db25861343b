"""Rotary embedding Triton kernels (flash-attn apply_rotary_emb and the fused InternLM2 wqkv rotary) against
internlm_kernels/reference.py: rotate-half and interleaved, partial rotary_dim, offsets, packed sequences, in place,
forward and backward."""
import pytest
import torch
from conftest import assert_close, oracle_leaf

import internlm_kernels as ik
from internlm_kernels import reference as ref
from internlm_kernels.triton import rotary as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Seven sequences of unequal length, including lengths 1 and 0.
LENGTHS = [5, 1, 17, 0, 9, 30, 2]


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _tables(seqlen, rotary_dim, dtype=torch.float32):
    cos, sin = ref.rotary_cos_sin(seqlen, rotary_dim, theta=10000.0, device=DEVICE)
    return cos.to(dtype), sin.to(dtype)


def _assert_rotary_matches(x, cos, sin, interleaved=False, seqlen_offsets=0, cu_seqlens=None, inplace=False):
    """Our apply_rotary_emb equals the reference in value and gradient (x is a float leaf that requires grad)."""
    dtype = x.dtype
    xo = oracle_leaf(x, dtype)
    tables = (cos.double(), sin.double()) if dtype == torch.float32 else (cos, sin)
    expect = ref.apply_rotary_emb(xo, *tables, interleaved, seqlen_offsets, cu_seqlens)
    arg = x.clone() if inplace else x  # a non-leaf to rotate in place; its gradient flows to x
    with ik.use_backend("triton"):
        out = ik.apply_rotary_emb(arg, cos, sin, interleaved, inplace, seqlen_offsets, cu_seqlens)
    if inplace:
        assert out is arg
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, expect.to(dtype))
    dout = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, dout)
    (want,) = torch.autograd.grad(expect, xo, dout.to(expect.dtype))
    assert_close(got, want.to(dtype))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [64, 48, 32])
@pytest.mark.parametrize("offsets", ["zero", "int", "tensor"])
def test_batch_matches_reference(interleaved, rotary_dim, offsets):
    B, S, H, D = 2, 37, 3, 64
    x = torch.randn(B, S, H, D, device=DEVICE, requires_grad=True)
    seqlen_offsets = {"zero": 0, "int": 5, "tensor": torch.tensor([3, 11], device=DEVICE)}[offsets]
    cos, sin = _tables(S + 20, rotary_dim)  # longer tables than needed
    _assert_rotary_matches(x, cos, sin, interleaved, seqlen_offsets)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [32, 20])
@pytest.mark.parametrize("offsets", ["zero", "tensor"])
def test_packed_sequences_restart_positions(interleaved, rotary_dim, offsets):
    cu = _cu(LENGTHS)
    x = torch.randn(sum(LENGTHS), 4, 32, device=DEVICE, requires_grad=True)
    seqlen_offsets = 0 if offsets == "zero" else torch.arange(len(LENGTHS), device=DEVICE) * 2
    cos, sin = _tables(max(LENGTHS) + 2 * len(LENGTHS), rotary_dim)
    _assert_rotary_matches(x, cos, sin, interleaved, seqlen_offsets, cu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("packed", [False, True])
def test_low_precision(dtype, packed):
    # Tables in x's dtype (what flash-attn callers pass) for fp16, float32 tables for bf16.
    cos, sin = _tables(64, 64, dtype if dtype == torch.float16 else torch.float32)
    if packed:
        x = torch.randn(sum(LENGTHS), 3, 64, device=DEVICE).to(dtype).requires_grad_(True)
        _assert_rotary_matches(x, cos, sin, cu_seqlens=_cu(LENGTHS), seqlen_offsets=3)
    else:
        x = torch.randn(2, 29, 3, 64, device=DEVICE).to(dtype).requires_grad_(True)
        _assert_rotary_matches(x, cos, sin, interleaved=True)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_writes_into_x_and_backward(packed, dtype):
    cos, sin = _tables(64, 24)
    if packed:
        x = torch.randn(sum(LENGTHS), 2, 32, device=DEVICE).to(dtype).requires_grad_(True)
        _assert_rotary_matches(x, cos, sin, cu_seqlens=_cu(LENGTHS), seqlen_offsets=1, inplace=True)
    else:
        x = torch.randn(2, 21, 2, 32, device=DEVICE).to(dtype).requires_grad_(True)
        _assert_rotary_matches(x, cos, sin, interleaved=True, inplace=True)


def test_inplace_on_a_strided_view_touches_only_the_view():
    """Rotating the q slice of a (T, 3, H, D) tensor in place changes that slice and nothing else."""
    qkv = torch.randn(40, 3, 2, 32, device=DEVICE)
    before = qkv.clone()
    cu = _cu([13, 27])
    cos, sin = _tables(32, 32)
    with ik.use_backend("triton"):
        ik.apply_rotary_emb(qkv[:, 0], cos, sin, cu_seqlens=cu, inplace=True, max_seqlen=27)
    assert_close(qkv[:, 0], ref.apply_rotary_emb(before[:, 0], cos, sin, cu_seqlens=cu))
    assert torch.equal(qkv[:, 1:], before[:, 1:])


def test_kernel_writes_every_output_element():
    """NaN-poisoned outputs, including the pass-through features past rotary_dim, are completely written."""
    cu = _cu(LENGTHS)
    x = torch.randn(sum(LENGTHS), 3, 40, device=DEVICE)
    cos, sin = _tables(40, 24)
    out = torch.full_like(x, float("nan"))
    kernels.rotary_forward(x, cos, sin, out, cu_seqlens=cu, seqlen_offset=2)
    assert_close(out, ref.apply_rotary_emb(x.double(), cos.double(), sin.double(), False, 2, cu).float())


# ---------------------------------------------------------------------------------------------------------------
# Fused rotary over the packed wqkv output
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rotary_dim,interleaved", [(32, False), (20, False), (32, True)])
def test_qkv_rotary_matches_reference(packed, rotary_dim, interleaved):
    n_kv_heads, group, D = 2, 3, 32
    F = n_kv_heads * (group + 2) * D
    if packed:
        cu, offsets = _cu(LENGTHS), torch.arange(len(LENGTHS), device=DEVICE)
        w = torch.randn(sum(LENGTHS), F, device=DEVICE, requires_grad=True)
    else:
        cu, offsets = None, 4
        w = torch.randn(2, 19, F, device=DEVICE, requires_grad=True)
    cos, sin = _tables(48, rotary_dim)
    with ik.use_backend("triton"):
        q, k, v = ik.qkv_rotary(w, cos, sin, n_kv_heads, D, cu_seqlens=cu, seqlen_offsets=offsets,
                                interleaved=interleaved)
    wo = oracle_leaf(w, torch.float32)
    expect = ref.qkv_rotary(wo, cos.double(), sin.double(), n_kv_heads, D, interleaved, offsets, cu)
    lead = w.shape[:-1]
    for t, e, heads in zip((q, k, v), expect, (n_kv_heads * group, n_kv_heads, n_kv_heads)):
        assert t.shape == (*lead, heads, D) and t.is_contiguous()
        assert_close(t, e.float())
    douts = [torch.randn_like(t) for t in (q, k, v)]
    (got,) = torch.autograd.grad((q, k, v), w, douts)
    (want,) = torch.autograd.grad(expect, wo, [d.double() for d in douts])
    assert_close(got, want.float())


def test_qkv_rotary_kernels_write_every_output_element():
    cu = _cu(LENGTHS)
    T, n_kv_heads, group, D = sum(LENGTHS), 2, 2, 40
    packed = torch.randn(T, n_kv_heads * (group + 2), D, device=DEVICE)
    cos, sin = _tables(32, 24)
    q, k, v = (torch.full((T, h, D), float("nan"), device=DEVICE) for h in (n_kv_heads * group, n_kv_heads,
                                                                              n_kv_heads))
    kernels.qkv_rotary(packed, q, k, v, cos, sin, backward=False, cu_seqlens=cu)
    expect = ref.qkv_rotary(packed.reshape(T, -1), cos, sin, n_kv_heads, D, cu_seqlens=cu)
    for t, e in zip((q, k, v), expect):
        assert_close(t, e)
    dpacked = torch.full_like(packed, float("nan"))
    kernels.qkv_rotary(dpacked, q, k, v, cos, sin, backward=True, cu_seqlens=cu)
    assert_close(dpacked, packed)  # the backward rotation undoes the forward one


def test_qkv_rotary_bf16_internlm2_group_layout():
    """7B-like grouping (g = 4 query heads per KV head) in bf16 over packed documents."""
    n_kv_heads, group, D = 2, 4, 64
    w = torch.randn(sum(LENGTHS), n_kv_heads * (group + 2) * D, device=DEVICE).bfloat16().requires_grad_(True)
    cos, sin = _tables(64, 64)
    with ik.use_backend("triton"):
        q, k, v = ik.qkv_rotary(w, cos, sin, n_kv_heads, D, cu_seqlens=_cu(LENGTHS), max_seqlen=30)
    expect = ref.qkv_rotary(w, cos, sin, n_kv_heads, D, cu_seqlens=_cu(LENGTHS))
    for t, e in zip((q, k, v), expect):
        assert_close(t, e)
    douts = [torch.randn_like(t) for t in (q, k, v)]
    assert_close(torch.autograd.grad((q, k, v), w, douts)[0], torch.autograd.grad(expect, w, douts)[0])


# ---------------------------------------------------------------------------------------------------------------
# Tables, registration, input checks
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling_type,seqlen", [(None, 40), ("linear", 40), ("dynamic", 20), ("dynamic", 48)])
def test_rotary_embedding_module_caches_reference_tables(scaling_type, seqlen):
    rope = ik.nn.RotaryEmbedding(16, theta=1e6, scaling_type=scaling_type, scaling_factor=2.0,
                                 max_position_embeddings=32)
    cos, sin = rope(seqlen, DEVICE)
    ec, es = ik.rotary_cos_sin(seqlen, 16, 1e6, scaling_type, 2.0, 32, device=DEVICE)
    assert cos.shape == (seqlen, 8)
    assert_close(cos, ec)
    assert_close(sin, es)
    again = rope(seqlen - 1, DEVICE)
    if seqlen - 1 <= 32 or scaling_type != "dynamic":
        assert again[0].data_ptr() == cos.data_ptr()  # a prefix of the cached table, not a rebuild
    assert_close(again[0], ik.rotary_cos_sin(seqlen - 1, 16, 1e6, scaling_type, 2.0, 32, device=DEVICE)[0])


def test_opcheck():
    ops = torch.ops.internlm_kernels
    cos, sin = _tables(16, 8)
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32, device=DEVICE)
    x = torch.randn(10, 2, 12, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.apply_rotary, (x, cos, sin, None, 1, cu, False, False))
    torch.library.opcheck(ops.apply_rotary, (torch.randn(2, 5, 2, 12, device=DEVICE, requires_grad=True), cos, sin,
                                             torch.tensor([1, 2], device=DEVICE), 0, None, True, True))
    torch.library.opcheck(ops.apply_rotary_, (x.detach().clone(), cos, sin, None, 1, cu, False, False))
    w = torch.randn(10, 2 * 5 * 4, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.qkv_rotary, (w, cos[:, :2], sin[:, :2], None, 0, cu, 2, 4, False))
    dq, dk, dv = (torch.randn(10, h, 4, device=DEVICE) for h in (6, 2, 2))
    torch.library.opcheck(ops.qkv_rotary_bwd, (dq, dk, dv, cos[:, :2], sin[:, :2], None, 0, cu, False))


def test_bad_inputs_raise_value_error_naming_the_argument():
    x = torch.randn(2, 8, 2, 16)
    cos, sin = _tables(16, 16)
    cu = _cu([3, 13])
    with ik.use_backend("triton"):
        with pytest.raises(ValueError, match="x"):
            ik.apply_rotary_emb(x.reshape(16, 2, 16), cos, sin)        # packed x needs cu_seqlens
        with pytest.raises(ValueError, match="x"):
            ik.apply_rotary_emb(x.int(), cos, sin)
        with pytest.raises(ValueError, match="sin"):
            ik.apply_rotary_emb(x, cos, sin[:, :4])
        with pytest.raises(ValueError, match="cos"):
            ik.apply_rotary_emb(x, *_tables(16, 40))                      # rotary dim beyond head dim
        with pytest.raises(ValueError, match="cos/sin have 16 rows"):
            ik.apply_rotary_emb(x, cos, sin, seqlen_offsets=9)          # positions past the tables
        with pytest.raises(ValueError, match="cos/sin have 16 rows"):
            ik.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([0, 9]))
        with pytest.raises(ValueError, match="cos/sin have 16 rows"):
            ik.apply_rotary_emb(x.reshape(16, 2, 16), cos, sin, cu_seqlens=cu, max_seqlen=17)
        with pytest.raises(ValueError, match="seqlen_offsets"):
            ik.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match="seqlen_offsets"):
            ik.apply_rotary_emb(x, cos, sin, seqlen_offsets=-1)
        with pytest.raises(ValueError, match="seqlen_offsets"):
            ik.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([2, -1]))
        offsets = torch.tensor([0, 1])
        ik.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets)
        offsets[1] = 9  # a changed tensor is checked again, not served from the per-version cache
        with pytest.raises(ValueError, match="cos/sin have 16 rows"):
            ik.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets)
        with pytest.raises(ValueError, match="seqlen_offsets"):
            ik.apply_rotary_emb(x, cos, sin, seqlen_offsets=1.5)
        with pytest.raises(ValueError, match="cu_seqlens"):
            ik.apply_rotary_emb(x.reshape(16, 2, 16), cos, sin, cu_seqlens=cu.long())
        with pytest.raises(ValueError, match="cu_seqlens"):
            ik.apply_rotary_emb(x.reshape(16, 2, 16), cos, sin, cu_seqlens=_cu([3, 4]))
        with pytest.raises(ValueError, match="max_seqlen"):
            ik.apply_rotary_emb(x, cos, sin, max_seqlen=8)
        with pytest.raises(ValueError, match="inplace"):
            ik.apply_rotary_emb(x.transpose(-1, -2).contiguous().transpose(-1, -2), cos, sin, inplace=True)
        with pytest.raises(NotImplementedError, match="cos/sin"):
            ik.apply_rotary_emb(x, cos.clone().requires_grad_(True), sin)
        with pytest.raises(ValueError, match="wqkv_out"):
            ik.qkv_rotary(torch.randn(8, 100), cos, sin, 2, 16, cu_seqlens=_cu([8]))
        with pytest.raises(ValueError, match="n_kv_heads"):
            ik.qkv_rotary(torch.randn(8, 128), cos, sin, 0, 16, cu_seqlens=_cu([8]))
        with pytest.raises(ValueError, match="wqkv_out"):
            ik.qkv_rotary(torch.randn(8, 128), cos, sin, 2, 16)            # 2-D needs cu_seqlens


@pytest.mark.gpu
def test_gpu_bf16_internlm2_7b_heads():
    """7B heads (32 q, 8 kv, d 128) over 4096 packed tokens: both kernels on the GPU against the reference."""
    lengths = [1, 100, 2047, 1, 948, 999]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    T = sum(lengths)
    w = torch.randn(T, 8 * 6 * 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = ref.rotary_cos_sin(4096, 128, theta=1e6, device="cuda")
    q, k, v = ik.qkv_rotary(w, cos, sin, 8, 128, cu_seqlens=cu, max_seqlen=2047)
    expect = ref.qkv_rotary(w, cos, sin, 8, 128, cu_seqlens=cu)
    for t, e in zip((q, k, v), expect):
        assert_close(t, e)
    douts = [torch.randn_like(t) for t in (q, k, v)]
    assert_close(torch.autograd.grad((q, k, v), w, douts)[0], torch.autograd.grad(expect, w, douts)[0])
    x = expect[0].detach().requires_grad_(True)
    out = ik.apply_rotary_emb(x, cos, sin, cu_seqlens=cu, max_seqlen=2047)
    assert_close(out, ref.apply_rotary_emb(x, cos, sin, cu_seqlens=cu))
