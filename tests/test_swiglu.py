"""SwiGLU Triton kernels (two tensors, and one packed [gate | up] tensor) against internlm_kernels/reference.py."""
import pytest
import torch
from conftest import assert_close, oracle_leaf

import internlm_kernels as ik
from internlm_kernels import reference as ref
from internlm_kernels.triton import swiglu as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("M,N", [(111, 1000), (1, 8), (5, 2500)])
@pytest.mark.parametrize("packed", [False, True])
def test_kernels_write_every_output(M, N, packed):
    """NaN-poisoned outputs are completely written, also when gate/up/dgate/dup are halves of packed rows."""
    gate_up = torch.randn(M, 2 * N, device=DEVICE)
    if packed:
        gate, up = gate_up[:, :N], gate_up[:, N:]
    else:
        gate, up = gate_up[:, :N].contiguous(), gate_up[:, N:].contiguous()
    out = torch.full((M, N), float("nan"), device=DEVICE)
    kernels.swiglu_forward(gate, up, out)
    gd, ud = gate.double().requires_grad_(True), up.double().requires_grad_(True)
    expect = ref.swiglu(gd, ud)
    assert_close(out, expect.float())

    dout = torch.randn(M, N, device=DEVICE)
    dgate_up = torch.full((M, 2 * N), float("nan"), device=DEVICE)
    dgate, dup = dgate_up[:, :N], dgate_up[:, N:]
    if not packed:
        dgate, dup = dgate.contiguous(), dup.contiguous()
    kernels.swiglu_backward(dout, gate, up, dgate, dup)
    eg, eu = torch.autograd.grad(expect, (gd, ud), dout.double())
    assert_close(dgate, eg.float())
    assert_close(dup, eu.float())
    if packed:
        assert not dgate_up.isnan().any()


@pytest.mark.parametrize("shape", [(3, 37, 1000), (1, 1, 8), (2, 7, 333)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_separate_matches_reference_forward_backward(shape, dtype):
    gate = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(True)
    up = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(True)
    with ik.use_backend("triton"):
        out = ik.swiglu(gate, up)
    go, uo = oracle_leaf(gate, dtype), oracle_leaf(up, dtype)
    expect = ref.swiglu(go, uo)
    assert out.dtype == dtype and out.shape == shape
    assert_close(out, expect.to(dtype))
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (gate, up), dout)
    want = torch.autograd.grad(expect, (go, uo), dout.to(expect.dtype))
    for g, e in zip(got, want):
        assert g.dtype == dtype
        assert_close(g, e.to(dtype))


@pytest.mark.parametrize("shape", [(3, 37, 2000), (1, 1, 8), (2, 7, 666)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_matches_reference_forward_backward(shape, dtype):
    gate_up = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(True)
    with ik.use_backend("triton"):
        out = ik.swiglu_packed(gate_up)
    leaf = oracle_leaf(gate_up, dtype)
    expect = ref.swiglu_packed(leaf)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    assert_close(out, expect.to(dtype))
    dout = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, gate_up, dout)
    (want,) = torch.autograd.grad(expect, leaf, dout.to(expect.dtype))
    assert got.shape == shape and got.dtype == dtype
    assert_close(got, want.to(dtype))


def test_strided_inputs_and_module():
    """Inputs whose last dim is strided (copied for the kernel) and transposed views give the reference result."""
    base = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    gate, up = base[:, ::2], base.t().reshape(40, 6).t()[:, :20]
    with ik.use_backend("triton"):
        out = ik.nn.SwiGLU()(gate, up)
        packed = ik.nn.SwiGLU()(base.t())
    assert_close(out, ref.swiglu(gate, up))
    assert_close(packed, ref.swiglu_packed(base.t()))
    got = torch.autograd.grad(out.sum() + packed.sum(), base)[0]
    want = torch.autograd.grad(ref.swiglu(gate, up).sum() + ref.swiglu_packed(base.t()).sum(), base)[0]
    assert_close(got, want)


def test_empty():
    gate = torch.randn(4, 0, device=DEVICE, requires_grad=True)
    with ik.use_backend("triton"):
        out = ik.swiglu(gate, gate)
        packed = ik.swiglu_packed(torch.randn(0, 6, device=DEVICE))
    assert out.shape == (4, 0) and packed.shape == (0, 3)
    assert torch.autograd.grad(out.sum(), gate)[0].shape == (4, 0)


def test_opcheck():
    gate = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    up = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    ops = torch.ops.internlm_kernels
    torch.library.opcheck(ops.swiglu_fwd, (gate, up))
    torch.library.opcheck(ops.swiglu_bwd, (torch.randn_like(gate), gate.detach(), up.detach()))
    torch.library.opcheck(ops.swiglu_packed_fwd, (torch.randn(2, 5, 24, device=DEVICE, requires_grad=True),))
    torch.library.opcheck(ops.swiglu_packed_bwd, (torch.randn(2, 5, 12, device=DEVICE), gate.detach()))


def test_bad_inputs_raise_value_error_naming_the_argument():
    g = torch.randn(3, 8)
    with ik.use_backend("triton"):
        with pytest.raises(ValueError, match="gate"):
            ik.swiglu(g.long(), g)
        with pytest.raises(ValueError, match="up"):
            ik.swiglu(g, g.half())
        with pytest.raises(ValueError, match="up"):
            ik.swiglu(g, torch.randn(3, 8, device="meta"))
        with pytest.raises(ValueError, match="shape"):
            ik.swiglu(g, torch.randn(3, 9))
        with pytest.raises(ValueError, match="gate_up"):
            ik.swiglu_packed(torch.randn(3, 7))
        with pytest.raises(ValueError, match="gate_up"):
            ik.swiglu_packed(torch.randn(3, 8).int())


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_bf16_intermediate_14336(packed):
    N = 14336
    gate_up = torch.randn(2048, 2 * N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if packed:
        out, expect = ik.swiglu_packed(gate_up), ref.swiglu_packed(gate_up)
    else:
        gate, up = gate_up[:, :N].contiguous(), gate_up[:, N:].contiguous()
        out, expect = ik.swiglu(gate, up), ref.swiglu(gate, up)
    assert_close(out, expect)
    dout = torch.randn_like(out)
    assert_close(torch.autograd.grad(out, gate_up, dout)[0], torch.autograd.grad(expect, gate_up, dout)[0])
