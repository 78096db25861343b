"""The extension's SwiGLU kernels (csrc/cpu/swiglu_kernels.h, internlm_kernels/cpu/swiglu.py) against
reference.swiglu in float64: each ISA build the CPU has, widths that end mid vector, one row and thousands over two
threads, separate gate and up and the packed [gate | up] layout, Liger's gate / down multipliers, gates far out in
both tails of the sigmoid, one input without a gradient. torch.empty is NaN-poisoned while a test runs, so an output
element the kernels forget to write fails. The sigmoid's exponential is a polynomial (~1 ulp), not libm's: the
project's fp32 tolerance (1e-5) applies."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from test_attention import _poison_empty  # noqa: F401  (autouse fixture)
from test_attention_cpu_kernels import _isas

import internlm_kernels as ik
from internlm_kernels import _ext, reference
from internlm_kernels.cpu import swiglu as cpu_swiglu

pytestmark = pytest.mark.skipif(_ext.why_unavailable("cpu") is not None, reason="the extension is not built")


def _gates(rows, width, g):
    """Normal gates with every 11th pushed far into a tail (|g| up to ~90: e^-|g| underflows float32)."""
    gate = torch.randn(rows, width, generator=g) * 3
    tail = torch.zeros(rows, width, dtype=torch.bool).view(-1)
    tail[::11] = True
    gate.view(-1)[tail] *= 30
    return gate


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("rows,width", [(1, 5), (3, 1), (2000, 352), (129, 130), (33, 17)])
@pytest.mark.parametrize("multipliers", [(1.0, 1.0), (0.7, 1.3)])
def test_kernels_match_reference_fwd_bwd(monkeypatch, isa, threads, rows, width, multipliers):
    monkeypatch.setattr(cpu_swiglu, "isa", lambda: isa)
    g = torch.Generator().manual_seed(rows * 3 + width)
    gate = _gates(rows, width, g).requires_grad_(True)
    up = torch.randn(rows, width, generator=g).requires_grad_(True)
    dout = torch.randn(rows, width, generator=g)
    with ik.use_backend(swiglu="cpu"):
        out = ik.swiglu(gate, up, *multipliers)
    g64, u64 = (t.detach().double().requires_grad_(True) for t in (gate, up))
    expect = reference.swiglu(g64, u64, *multipliers)
    assert_close(out, expect)
    for name, a, b in zip(("gate", "up"), torch.autograd.grad(out, (gate, up), dout),
                          torch.autograd.grad(expect, (g64, u64), dout.double())):
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("shape", [(2, 1000, 2 * 176), (7, 2 * 9)])
def test_packed_kernels_match_reference(monkeypatch, isa, threads, shape):
    monkeypatch.setattr(cpu_swiglu, "isa", lambda: isa)
    g = torch.Generator().manual_seed(shape[-1])
    gate_up = torch.cat((_gates(*shape[:-1], shape[-1] // 2, g).reshape(*shape[:-1], -1) if len(shape) == 2
                         else _gates(shape[0] * shape[1], shape[-1] // 2, g).reshape(*shape[:-1], -1),
                         torch.randn(*shape[:-1], shape[-1] // 2, generator=g)), dim=-1).requires_grad_(True)
    dout = torch.randn(*shape[:-1], shape[-1] // 2, generator=g)
    with ik.use_backend(swiglu="cpu"):
        out = ik.swiglu_packed(gate_up)
    gu64 = gate_up.detach().double().requires_grad_(True)
    expect = reference.swiglu_packed(gu64)
    assert_close(out, expect)
    assert_close(torch.autograd.grad(out, gate_up, dout)[0], torch.autograd.grad(expect, gu64, dout.double())[0])


@pytest.mark.parametrize("isa", _isas())
def test_one_gradient_strided_inputs_and_inference_mode(monkeypatch, isa):
    """up frozen (no dup written), gate a strided view, and the forward under inference_mode."""
    monkeypatch.setattr(cpu_swiglu, "isa", lambda: isa)
    base = torch.randn(65, 2 * 40)
    gate = base[:, 1::2].requires_grad_(True)
    up = torch.randn(65, 40)
    with ik.use_backend(swiglu="cpu"):
        out = ik.swiglu(gate, up)
        with torch.inference_mode():
            frozen = ik.swiglu(gate.detach(), up)
    g64 = gate.detach().double().requires_grad_(True)
    expect = reference.swiglu(g64, up.double())
    assert_close(out, expect)
    assert_close(frozen, expect)
    dout = torch.randn(65, 40)
    assert_close(torch.autograd.grad(out, gate, dout)[0], torch.autograd.grad(expect, g64, dout.double())[0])


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("rows,inter", [(1, 5), (64, 352), (1025, 33)])
def test_silu_mul_packed_matches_reference(monkeypatch, isa, kernel, rows, inter):
    """The generator's silu(a1) · a3 of its fused w1|w3 product, by the kernel and by its ATen fallback."""
    monkeypatch.setattr(cpu_swiglu, "isa", lambda: isa)
    if not kernel:
        monkeypatch.setattr(cpu_swiglu, "extension_runs", lambda: False)
    g = torch.Generator().manual_seed(rows + inter)
    a = torch.cat((_gates(rows, inter, g), torch.randn(rows, inter, generator=g)), dim=-1)
    with torch.inference_mode():
        got = cpu_swiglu.silu_mul_packed(a)
    assert_close(got, reference.swiglu_packed(a.double()))
