"""RMSNorm (+ fused residual add) Triton kernels against internlm_kernels/reference.py, forward and backward."""
import pytest
import torch
from conftest import assert_close, oracle_leaf

import internlm_kernels as ik
from internlm_kernels import reference as ref
from internlm_kernels.triton import rms_norm as kernels

LOW = (torch.float16, torch.bfloat16)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _assert_grad_close(actual, expected, x_dtype):
    """Gradients of low-precision inputs (x's dtype) are judged relative to their scale: dweight sums over rows, and
    with a residual the backward reads h as stored in the residual's dtype (as flash-attn does)."""
    if x_dtype in LOW:
        scale = expected.abs().max().item()
        assert_close(actual, expected, rtol=1e-2, atol=1e-2 * max(scale, 1.0))
    else:
        assert_close(actual, expected)


@pytest.mark.parametrize("shape", [(3, 37, 1000), (1, 1, 8), (4, 6144), (2, 3, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernels_write_every_output(shape, dtype):
    """The launch helpers fill NaN-poisoned outputs completely: forward y, h, rstd; backward dx, dres, dw."""
    N = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(dtype).reshape(-1, N)
    res = torch.randn(shape, device=DEVICE).to(dtype).reshape(-1, N)
    w = torch.randn(N, device=DEVICE)
    y = torch.full_like(x, float("nan"))
    h = torch.full_like(x, float("nan"), dtype=torch.float32)
    rstd = torch.full((x.shape[0],), float("nan"), device=DEVICE)
    kernels.rms_norm_forward(x, w, 1e-5, y, rstd, residual=res, h=h)
    hd = x.double() + res.double()
    expect_rstd = torch.rsqrt(hd.pow(2).mean(-1) + 1e-5)
    assert_close(h, hd.float())
    assert_close(rstd, expect_rstd.float())
    assert_close(y, ref.rms_norm(x.double(), w.double(), 1e-5, res.double()).to(dtype))

    dy = torch.randn_like(x)
    dh_out = torch.randn_like(h)
    dx = torch.full_like(x, float("nan"))
    dres = torch.full_like(h, float("nan"))
    dw = kernels.rms_norm_backward(dy, h, w, rstd, dx, dh_out=dh_out, dres=dres)
    hd.requires_grad_(True)
    wd = w.double().requires_grad_(True)
    yd = ref.rms_norm(hd, wd, 1e-5)
    gh, gw = torch.autograd.grad(yd, (hd, wd), dy.double())
    assert_close(dres, (gh + dh_out.double()).float())
    assert_close(dx, (gh + dh_out.double()).to(dtype))
    _assert_grad_close(dw, gw.float(), dtype)


# (residual: None | "same" dtype as x | "fp32"; prenorm; residual_in_fp32); an fp32 residual only differs from
# "same" for low-precision x.
RESIDUAL_CASES = [(None, False, False), (None, True, False), (None, True, True), ("same", False, False),
                  ("same", True, False), ("fp32", False, False), ("fp32", True, False)]
CASES = [(dtype, *case) for dtype in (torch.float32, torch.float16, torch.bfloat16) for case in RESIDUAL_CASES
         if not (dtype == torch.float32 and case[0] == "fp32")]


@pytest.mark.parametrize("dtype,residual,prenorm,residual_in_fp32", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference_forward_backward(dtype, residual, prenorm, residual_in_fp32):
    shape = (3, 37, 1000)
    x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(True)
    # flash-attn allows an fp32 weight with low-precision x: use one for fp16, the same dtype otherwise.
    w = torch.randn(shape[-1], device=DEVICE).to(torch.float32 if dtype == torch.float16 else dtype)
    w.requires_grad_(True)
    r = None
    if residual is not None:
        r = torch.randn(shape, device=DEVICE).to(dtype if residual == "same" else torch.float32).requires_grad_(True)
    inputs = [t for t in (x, w, r) if t is not None]

    with ik.use_backend("triton"):
        out = ik.rms_norm(x, w, 1e-5, r, prenorm, residual_in_fp32)
    leaves = [oracle_leaf(t, dtype) for t in inputs]
    expect = ref.rms_norm(leaves[0], leaves[1], 1e-5, leaves[2] if r is not None else None, prenorm,
                          residual_in_fp32)

    outs = out if prenorm else (out,)
    expects = expect if prenorm else (expect,)
    if prenorm:
        want_h_dtype = r.dtype if r is not None else (torch.float32 if residual_in_fp32 else dtype)
        assert outs[1].dtype == want_h_dtype
    assert outs[0].dtype == dtype
    for o, e in zip(outs, expects):
        assert o.shape == e.shape
        assert_close(o, e.to(o.dtype))

    grads_out = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, inputs, grads_out)
    want = torch.autograd.grad(expects, leaves, [g.to(e.dtype) for g, e in zip(grads_out, expects)])
    for g, e, t in zip(got, want, inputs):
        assert g.dtype == t.dtype
        _assert_grad_close(g, e.to(g.dtype), dtype)


@pytest.mark.parametrize("shape", [(1, 1, 8), (4, 6144), (5, 1, 1)])
def test_odd_shapes_fp32(shape):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    w = torch.randn(shape[-1], device=DEVICE, requires_grad=True)
    r = torch.randn(shape, device=DEVICE, requires_grad=True)
    with ik.use_backend("triton"):
        y, h = ik.rms_norm(x, w, 1e-6, r, prenorm=True)
    xo, wo, ro = (t.detach().double().requires_grad_(True) for t in (x, w, r))
    ye, he = ref.rms_norm(xo, wo, 1e-6, ro, prenorm=True)
    assert_close(y, ye.float())
    assert_close(h, he.float())
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    got = torch.autograd.grad((y, h), (x, w, r), (gy, gh))
    want = torch.autograd.grad((ye, he), (xo, wo, ro), (gy.double(), gh.double()))
    for g, e in zip(got, want):
        assert_close(g, e.float())


def test_empty_rows():
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    with ik.use_backend("triton"):
        y = ik.rms_norm(x, w)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert y.shape == (0, 16) and gx.shape == (0, 16)
    assert torch.equal(gw, torch.zeros_like(w))


def test_module_matches_function():
    norm = ik.nn.RMSNorm(24, eps=1e-5).to(DEVICE)
    torch.nn.init.normal_(norm.weight)
    x, r = torch.randn(2, 5, 24, device=DEVICE), torch.randn(2, 5, 24, device=DEVICE)
    with ik.use_backend("triton"):
        y, h = norm(x, r, prenorm=True)
    ye, he = ref.rms_norm(x, norm.weight.detach(), 1e-5, r, prenorm=True)
    assert_close(y, ye)
    assert_close(h, he)


def test_opcheck():
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(24, device=DEVICE, requires_grad=True)
    r = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    rstd = torch.rand(2, 5, device=DEVICE) + 0.5
    ops = torch.ops.internlm_kernels
    torch.library.opcheck(ops.rms_norm_fwd, (x, w, 1e-5))
    torch.library.opcheck(ops.add_rms_norm_fwd, (x, r, w, 1e-5, torch.float32))
    torch.library.opcheck(ops.add_rms_norm_fwd, (x.half(), None, w, 1e-5, torch.float32))
    torch.library.opcheck(ops.rms_norm_bwd, (torch.randn_like(x), x.detach(), w.detach(), rstd, None,
                                             torch.float32, None))
    torch.library.opcheck(ops.rms_norm_bwd, (torch.randn_like(x), x.detach(), w.detach(), rstd,
                                             torch.randn_like(x), torch.float16, torch.float32))


def test_bad_inputs_raise_value_error_naming_the_argument():
    x, w = torch.randn(3, 8), torch.randn(8)
    with ik.use_backend("triton"):
        with pytest.raises(ValueError, match="x"):
            ik.rms_norm(x.long(), w)
        with pytest.raises(ValueError, match="weight"):
            ik.rms_norm(x, torch.randn(7))
        with pytest.raises(ValueError, match="weight"):
            ik.rms_norm(x, torch.randn(8, 1))
        with pytest.raises(ValueError, match="weight"):
            ik.rms_norm(x, torch.randn(8, device="meta"))
        with pytest.raises(ValueError, match="residual"):
            ik.rms_norm(x, w, residual=torch.randn(3, 9))
        with pytest.raises(ValueError, match="residual"):
            ik.rms_norm(x, w, residual=torch.randn(3, 8).long())
        with pytest.raises(ValueError, match="x"):
            ik.rms_norm(torch.randn(3, 0), torch.randn(0))
        with pytest.raises(ValueError, match="x"):
            ik.rms_norm([1.0, 2.0], w)
        with pytest.raises(ValueError, match="eps"):
            ik.rms_norm(x, w, eps=-1e-6)


def test_rows_wider_than_a_program_raise_not_implemented():
    n = kernels.MAX_FEATURES + 1
    with ik.use_backend("triton"), pytest.raises(NotImplementedError, match="last dim"):
        ik.rms_norm(torch.randn(1, n), torch.randn(n))


@pytest.mark.gpu
@pytest.mark.parametrize("N", [4096, 6144, 1000])
def test_gpu_bf16_with_fp32_residual(N):
    x = torch.randn(4096, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4096, N, device="cuda", dtype=torch.float32, requires_grad=True)
    w = torch.randn(N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, h = ik.rms_norm(x, w, 1e-5, r, prenorm=True)
    ye, he = ref.rms_norm(x, w, 1e-5, r, prenorm=True)
    assert_close(y, ye)
    assert_close(h, he)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    for g, e in zip(torch.autograd.grad((y, h), (x, w, r), (gy, gh)), torch.autograd.grad((ye, he), (x, w, r),
                                                                                            (gy, gh))):
        _assert_grad_close(g, e, torch.bfloat16)
