"""The cpu backend of fused linear cross-entropy (oneDNN matmuls, gradients in the forward for mean/sum) against
reference.linear_cross_entropy in float64: every reduction and option, ignored tokens, several row chunks."""
import pytest
import torch
from conftest import assert_close, oracle_leaf

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.cpu import cross_entropy as cpu_ce


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, lse_square_scale=1e-3),
                                     dict(softcap=3.0, bias=True)], ids=["plain", "smooth+z", "softcap+bias"])
def test_cpu_matches_reference(monkeypatch, reduction, options):
    monkeypatch.setattr(cpu_ce, "LOGITS_CHUNK_ELEMENTS", 13 * 37)  # 13-row chunks: 6 chunks, a ragged last one
    options = dict(options)
    N, H, V = 71, 24, 37
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (0.3 * torch.randn(V, H)).requires_grad_(True)
    bias = torch.randn(V, requires_grad=True) if options.pop("bias", False) else None
    target = torch.randint(0, V, (N,))
    target[::5] = -100
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    with ik.use_backend(linear_cross_entropy="cpu"):
        loss, z_loss = ik.fused_linear_cross_entropy(hidden, weight, target, bias, reduction=reduction,
                                                     return_z_loss=True, **options)
    ref_leaves = [oracle_leaf(t, torch.float32) for t in leaves]
    expect, expect_z = reference.linear_cross_entropy(ref_leaves[0], ref_leaves[1], target,
                                                      ref_leaves[2] if bias is not None else None,
                                                      reduction=reduction, **options)
    assert_close(loss, expect)
    assert_close(z_loss, expect_z)
    upstream = torch.randn_like(loss)
    got = torch.autograd.grad(loss, leaves, upstream)
    want = torch.autograd.grad(expect, ref_leaves, upstream.double())
    for g, w in zip(got, want):
        assert_close(g, w)


def test_auto_picks_cpu_for_float32_and_forced_cpu_refuses_bf16():
    assert ik.backend.choose("linear_cross_entropy", "cpu") == "cpu"
    h, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(5, 8, dtype=torch.bfloat16)
    t = torch.tensor([0, 1, 2, 3])
    assert_close(ik.fused_linear_cross_entropy(h, w, t), reference.linear_cross_entropy(h, w, t)[0])
    with ik.use_backend(linear_cross_entropy="cpu"), pytest.raises(NotImplementedError, match="bfloat16"):
        ik.fused_linear_cross_entropy(h, w, t)


def test_every_token_ignored_gives_zero_loss_and_gradient():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    loss = ik.fused_linear_cross_entropy(h, w, torch.full((6,), -100))
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()
