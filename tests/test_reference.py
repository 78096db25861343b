"""The plain-torch references agree with independent torch formulations (they are the oracle for every kernel)."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from internlm_kernels import reference as ref


def _expand(t, group):
    return t.repeat_interleave(group, dim=1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1), (6, 2)])
def test_attention_matches_sdpa_per_document(causal, hq, hkv):
    lens = [1, 5, 17, 9]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    T, D = sum(lens), 16
    q, k, v = torch.randn(T, hq, D), torch.randn(T, hkv, D), torch.randn(T, hkv, D)
    out, lse = ref.flash_attn_varlen(q, k, v, cu, cu, causal=causal)
    for b in range(len(lens)):
        s, e = int(cu[b]), int(cu[b + 1])
        qs, ks, vs = q[s:e].transpose(0, 1), _expand(k[s:e], hq // hkv).transpose(0, 1), _expand(
            v[s:e], hq // hkv).transpose(0, 1)
        expect = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1)
        assert_close(out[s:e], expect)
        scores = (qs @ ks.transpose(1, 2)) / math.sqrt(D)
        if causal:
            scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        assert_close(lse[:, s:e], torch.logsumexp(scores, -1))


def test_attention_bottom_right_alignment_and_window():
    # 3 queries over 7 keys, causal: query i sees keys j <= i + 4; window (2, 0) also requires j >= i + 2.
    mask = ref.attention_mask(3, 7, causal=True, window_size=(2, -1))
    expect = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expect)


def test_attention_empty_rows_are_zero_with_inf_lse():
    # 4 queries, 2 keys, causal bottom-right: queries 0 and 1 see no key.
    q, k, v = torch.randn(4, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    cu_q, cu_k = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
    out, lse = ref.flash_attn_varlen(q, k, v, cu_q, cu_k, causal=True)
    assert torch.equal(out[:2], torch.zeros(2, 2, 8))
    assert torch.isinf(lse[:, :2]).all() and (lse[:, :2] > 0).all()
    assert torch.isfinite(lse[:, 2:]).all()


def test_attention_softcap_and_alibi_formula():
    L, H, D = 6, 2, 8
    q, k, v = torch.randn(L, H, D, dtype=torch.float64), torch.randn(L, H, D, dtype=torch.float64), torch.randn(
        L, H, D, dtype=torch.float64)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    out, _ = ref.attention_one(q, k, v, 0.3, causal=True, softcap=5.0, alibi_slopes=slopes)
    s = 0.3 * torch.einsum("ihd,jhd->hij", q, k)
    s = 5.0 * torch.tanh(s / 5.0)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    s = s - slopes[:, None, None] * (i - j).abs()
    s = s.masked_fill(j > i, float("-inf"))
    expect = torch.einsum("hij,jhd->ihd", s.softmax(-1), v)
    assert_close(out, expect)


def test_attention_gradcheck_with_empty_rows():
    q = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 1, 4, dtype=torch.float64, requires_grad=True)
    cu_q, cu_k = torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    torch.autograd.gradcheck(lambda q, k, v: ref.flash_attn_varlen(q, k, v, cu_q, cu_k, causal=True,
                                                                   window_size=(1, 0))[0], (q, k, v))


def test_rms_norm_matches_torch():
    x, w = torch.randn(3, 7, 33), torch.randn(33)
    assert_close(ref.rms_norm(x, w, 1e-5), F.rms_norm(x, (33,), w, 1e-5))


def test_rms_norm_residual_and_dtypes():
    x, r, w = torch.randn(4, 10).bfloat16(), torch.randn(4, 10).bfloat16(), torch.randn(10)
    y, h = ref.rms_norm(x, w, 1e-6, residual=r, prenorm=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    h32 = x.float() + r.float()
    assert_close(y, F.rms_norm(h32, (10,), w, 1e-6).bfloat16())
    _, h = ref.rms_norm(x, w, prenorm=True, residual_in_fp32=True)
    assert h.dtype == torch.float32 and torch.equal(h, x.float())


def test_swiglu_matches_silu():
    g, u = torch.randn(5, 9), torch.randn(5, 9)
    assert_close(ref.swiglu(g, u), F.silu(g) * u)
    assert_close(ref.swiglu_packed(torch.cat([g, u], -1)), F.silu(g) * u)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def test_rotary_rotate_half_matches_llama_formula():
    B, S, H, D = 2, 7, 3, 16
    x = torch.randn(B, S, H, D)
    cos, sin = ref.rotary_cos_sin(S, D, theta=10000.0)
    c, s = torch.cat([cos, cos], -1)[None, :, None], torch.cat([sin, sin], -1)[None, :, None]
    assert_close(ref.apply_rotary_emb(x, cos, sin), x * c + _rotate_half(x) * s)


def test_rotary_interleaved_is_complex_multiplication_and_partial():
    S, H, D, rd = 5, 2, 12, 8
    x = torch.randn(1, S, H, D)
    cos, sin = ref.rotary_cos_sin(S, rd)
    out = ref.apply_rotary_emb(x, cos, sin, interleaved=True)
    xc = torch.view_as_complex(x[..., :rd].reshape(1, S, H, rd // 2, 2).contiguous())
    rot = torch.view_as_real(xc * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[None, :, None]).flatten(-2)
    assert_close(out[..., :rd], rot)
    assert torch.equal(out[..., rd:], x[..., rd:])


def test_rotary_packed_positions_restart_and_conjugate_inverts():
    cu = torch.tensor([0, 1, 4, 9], dtype=torch.int32)
    assert ref.rotary_positions(torch.empty(9, 1, 4), 2, cu).tolist() == [2, 2, 3, 4, 2, 3, 4, 5, 6]
    x = torch.randn(9, 2, 8, dtype=torch.float64)
    cos, sin = ref.rotary_cos_sin(16, 8, dtype=torch.float64)
    y = ref.apply_rotary_emb(x, cos, sin, cu_seqlens=cu)
    assert_close(ref.apply_rotary_emb(y, cos, sin, cu_seqlens=cu, conjugate=True), x)


def test_rotary_dynamic_ntk_formula():
    d, theta, factor, max_pos, L = 16, 10000.0, 2.0, 32, 80
    cos, sin = ref.rotary_cos_sin(L, d, theta, "dynamic", factor, max_pos, dtype=torch.float64)
    base = theta * ((factor * L / max_pos) - (factor - 1)) ** (d / (d - 2))
    freqs = torch.arange(L, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    assert_close(cos, freqs.cos())
    assert_close(sin, freqs.sin())
    short_cos, _ = ref.rotary_cos_sin(max_pos, d, theta, "dynamic", factor, max_pos, dtype=torch.float64)
    plain_cos, _ = ref.rotary_cos_sin(max_pos, d, theta, dtype=torch.float64)
    assert torch.equal(short_cos, plain_cos)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_cross_entropy_matches_torch(reduction, smoothing):
    h, w = torch.randn(11, 8, dtype=torch.float64), torch.randn(13, 8, dtype=torch.float64)
    t = torch.randint(0, 13, (11,))
    t[[2, 5]] = -100
    loss, z = ref.linear_cross_entropy(h, w, t, reduction=reduction, label_smoothing=smoothing)
    expect = F.cross_entropy(h @ w.t(), t, reduction=reduction, label_smoothing=smoothing)
    assert_close(loss, expect)
    assert torch.count_nonzero(z) == 0


def test_linear_cross_entropy_z_loss_and_all_ignored():
    h, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    t = torch.randint(0, 9, (6,))
    loss, z = ref.linear_cross_entropy(h, w, t, lse_square_scale=1e-2, reduction="sum")
    lse = torch.logsumexp(h @ w.t(), -1)
    assert_close(z, 1e-2 * lse.pow(2).sum())
    assert_close(loss, F.cross_entropy(h @ w.t(), t, reduction="sum") + z)
    h.requires_grad_(True)
    loss, _ = ref.linear_cross_entropy(h, w, torch.full((6,), -100), reduction="mean")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_adamw_step_matches_torch():
    p0 = torch.randn(17)
    p_ref, p_ours = p0.clone().requires_grad_(True), p0.clone()
    opt = torch.optim.AdamW([p_ref], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    m, v = torch.zeros(17), torch.zeros(17)
    for step in range(1, 6):
        g = torch.randn(17)
        p_ref.grad = g.clone()
        opt.step()
        ref.adamw_step(p_ours, g, m, v, step, 1e-2, 0.9, 0.95, 1e-8, 0.1)
    assert torch.equal(p_ours, p_ref.detach())


def test_total_norm_matches_clip_grad_norm():
    ts = [torch.randn(5), torch.randn(3, 4)]
    for p in (2.0, 1.0, float("inf")):
        params = [torch.nn.Parameter(torch.zeros_like(t)) for t in ts]
        for prm, t in zip(params, ts):
            prm.grad = t.clone()
        assert_close(ref.total_norm(ts, p), torch.nn.utils.clip_grad_norm_(params, 1e9, p))
