"""The extension's RMSNorm kernels (csrc/cpu/rms_norm_kernels.h, internlm_kernels/cpu/rms_norm.py) against
reference.rms_norm in float64: each ISA build the CPU has, widths that end mid vector, one row and thousands (dw summed
over several blocks of rows and over two threads' partials), with and without the residual, with and without the
gradient reaching the carried sum h, and without a weight gradient. torch.empty is NaN-poisoned while a test runs,
so an output element the kernels forget to write fails. fp32 sums in another order than the reference: the project's
fp32 tolerance (1e-5) applies."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from test_attention import _poison_empty  # noqa: F401  (autouse fixture)
from test_attention_cpu_kernels import _isas

import internlm_kernels as ik
from internlm_kernels import _ext, reference
from internlm_kernels.cpu import rms_norm as cpu_rms_norm

pytestmark = pytest.mark.skipif(_ext.why_unavailable("cpu") is not None, reason="the extension is not built")


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("rows,width", [(1, 7), (3, 1), (3000, 130), (517, 128), (64, 257)])
@pytest.mark.parametrize("residual,carried", [(False, False), (True, False), (True, True)])
def test_kernels_match_reference_fwd_bwd(monkeypatch, isa, threads, rows, width, residual, carried):
    monkeypatch.setattr(cpu_rms_norm, "isa", lambda: isa)
    g = torch.Generator().manual_seed(rows * 7 + width + residual)
    x = torch.randn(rows, width, generator=g).mul_(3).requires_grad_(True)
    w = (1 + 0.3 * torch.randn(width, generator=g)).requires_grad_(True)
    r = torch.randn(rows, width, generator=g).requires_grad_(True) if residual else None
    dy = torch.randn(rows, width, generator=g)
    dh = torch.randn(rows, width, generator=g) if carried else None
    with ik.use_backend(rms_norm="cpu"):
        y, h = ik.rms_norm(x, w, 1e-5, r, True)
    leaves = [t for t in (x, w, r) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ey, eh = reference.rms_norm(ref_leaves[0], ref_leaves[1], 1e-5, ref_leaves[2] if residual else None, True)
    assert_close(y, ey)
    assert_close(h, eh)
    outs, grads = ([y, h], [dy, dh]) if carried else ([y], [dy])
    got = torch.autograd.grad(outs, leaves, grads)
    want = torch.autograd.grad([ey, eh] if carried else [ey], ref_leaves, [t.double() for t in grads])
    for name, a, b in zip(("x", "weight", "residual"), got, want):
        if name == "weight":
            h64 = eh.detach()
            n64 = h64 / (h64.square().mean(-1, keepdim=True) + 1e-5).sqrt()
            _assert_sum_close(a, b, (dy.double() * n64).abs().sum(0))
        else:
            assert_close(a, b, msg=name)


def _assert_sum_close(got, want, magnitude):
    """dw sums a product over every row: its float32 rounding scales with the sum of the terms' magnitudes
    (``magnitude``, per element), not with the result, which cancels (a few rows: the fp32 tolerance itself)."""
    assert not torch.isnan(got).any()
    err = (got.double() - want).abs()
    bound = 1e-5 * torch.maximum(magnitude, want.abs()) + 1e-5
    assert (err <= bound).all(), f"dw: worst error {err.max().item():.3g}, {(err / bound).max().item():.2f}x the bound"


@pytest.mark.parametrize("isa", _isas())
def test_without_weight_gradient_and_with_strided_input(monkeypatch, isa):
    """A frozen weight (no dw, no partials), a non-contiguous x and weight (the kernels read contiguous copies), and
    the forward under inference_mode."""
    monkeypatch.setattr(cpu_rms_norm, "isa", lambda: isa)
    base = torch.randn(130, 2 * 33)
    x = base[:, ::2].requires_grad_(True)
    w = (1 + 0.3 * torch.randn(2 * 33))[::2]      # strided too: the kernels read a contiguous copy
    with ik.use_backend(rms_norm="cpu"):
        y = ik.rms_norm(x, w, 1e-6)
    x64 = x.detach().double().requires_grad_(True)
    expect = reference.rms_norm(x64, w.double(), 1e-6)
    assert_close(y, expect)
    dy = torch.randn_like(y)
    assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(expect, x64, dy.double())[0])
    with torch.inference_mode(), ik.use_backend(rms_norm="cpu"):
        assert_close(ik.rms_norm(x.detach(), w, 1e-6), expect)


def test_same_result_every_run_at_a_thread_count():
    """dw's sum order depends on the thread count only: two runs agree bit for bit."""
    x = torch.randn(2048, 128, requires_grad=True)
    w = torch.ones(128, requires_grad=True)
    dy = torch.randn(2048, 128)

    def run():
        with ik.use_backend(rms_norm="cpu"):
            return torch.autograd.grad(ik.rms_norm(x, w, 1e-5), (x, w), dy)

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("rows,width", [(1, 7), (64, 128), (1025, 130)])
def test_rms_scaled_matches_its_definition(monkeypatch, isa, kernel, rows, width):
    """The generator's weightless norm x · rsqrt(Σ x² + eps_sum), by the kernel and by its ATen fallback."""
    monkeypatch.setattr(cpu_rms_norm, "isa", lambda: isa)
    if not kernel:
        monkeypatch.setattr(cpu_rms_norm, "extension_runs", lambda: False)
    x = torch.randn(rows, width) * 2
    eps_sum = width * 1e-5
    with torch.inference_mode():
        got = cpu_rms_norm.rms_scaled(x, eps_sum)
    x64 = x.double()
    assert_close(got, x64 / (x64.square().sum(-1, keepdim=True) + eps_sum).sqrt())
