"""RMSNorm's ``offset`` (Gemma's x / rms · (1 + w)) and ``casting_mode`` ("gemma": all in fp32; "llama": the
normalized row rounded to x's dtype before the weight; "none": Liger's, every step in x's dtype, tested in 16 bits in
test_liger_parity.py): the Triton kernels against reference.rms_norm in float64,
and in bf16 against transformers' own Gemma2RMSNorm and LlamaRMSNorm."""
import pytest
import torch
from conftest import assert_close, oracle_leaf

import internlm_kernels as ik
from internlm_kernels import reference

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("casting_mode", ["gemma", "llama", "none"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_offset_and_casting_mode_match_reference(casting_mode, with_residual):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 45, requires_grad=True)
    w = (torch.randn(45) * 0.1).requires_grad_()
    res = torch.randn(3, 7, 45, requires_grad=True) if with_residual else None
    kw = dict(eps=1e-5, prenorm=True, offset=1.0, casting_mode=casting_mode)
    with ik.use_backend("triton"):
        y, h = ik.rms_norm(x, w, residual=res, **kw)
    leaves = [oracle_leaf(t, torch.float32) for t in (x, w) + ((res,) if with_residual else ())]
    want_y, want_h = reference.rms_norm(leaves[0], leaves[1], residual=leaves[2] if with_residual else None, **kw)
    assert_close(y, want_y)
    assert_close(h, want_h)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    ins = (x, w) + ((res,) if with_residual else ())
    got = torch.autograd.grad((y, h), ins, (dy, dh))
    want = torch.autograd.grad((want_y, want_h), leaves, (dy.double(), dh.double()))
    for g, e, name in zip(got, want, ("dx", "dw", "dres")):
        assert_close(g, e, msg=name)


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_bf16_matches_transformers_norms(family):
    torch.manual_seed(1)
    if family == "gemma2":
        module = transformers.models.gemma2.modeling_gemma2.Gemma2RMSNorm(64, eps=1e-6)
        kw = dict(eps=1e-6, offset=1.0, casting_mode="gemma")
    else:
        module = transformers.models.llama.modeling_llama.LlamaRMSNorm(64, eps=1e-6)
        kw = dict(eps=1e-6, casting_mode="llama")
    module = module.to(torch.bfloat16)
    with torch.no_grad():
        module.weight.normal_(0.0, 0.5)
    x = torch.randn(5, 64, dtype=torch.bfloat16) * 3
    want = module(x)
    for backend in ("reference", "triton"):
        with ik.use_backend(backend):
            got = ik.rms_norm(x, module.weight, **kw)
        assert got.dtype == torch.bfloat16
        assert_close(got, want, msg=backend)  # bf16 tolerance: the interpreter's fp32->bf16 cast truncates


def test_module_options_and_bad_arguments():
    norm = ik.nn.RMSNorm(8, offset=1.0, casting_mode="llama")
    assert torch.equal(norm.weight, torch.zeros(8)) and "casting_mode='llama'" in repr(norm)
    x = torch.randn(2, 8)
    assert_close(norm(x), reference.rms_norm(x, torch.ones(8)))
    with pytest.raises(ValueError, match="casting_mode"):
        ik.rms_norm(x, norm.weight, casting_mode="fp16")
    with pytest.raises(ValueError, match="offset"):
        ik.rms_norm(x, norm.weight, offset=float("nan"))


def test_inference_mode_and_opcheck():
    x, w = torch.randn(4, 24), torch.randn(24) * 0.1
    with torch.inference_mode(), ik.use_backend("triton"):
        y = ik.rms_norm(x, w, offset=1.0, casting_mode="llama")
    assert_close(y, reference.rms_norm(x, w, offset=1.0, casting_mode="llama"))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.library.opcheck(torch.ops.internlm_kernels.rms_norm_fwd.default, (xg, wg, 1e-6, 1.0, True))
    torch.library.opcheck(torch.ops.internlm_kernels.add_rms_norm_fwd.default,
                          (xg, torch.randn(4, 24), wg, 1e-6, torch.float32, 1.0, False))
    # casting_mode "none" (low_precision) through the same ops
    xh, wh = xg.detach().half().requires_grad_(), wg.detach().half().requires_grad_()
    torch.library.opcheck(torch.ops.internlm_kernels.rms_norm_fwd.default, (xh, wh, 1e-6, 0.0, False, True))
    torch.library.opcheck(torch.ops.internlm_kernels.add_rms_norm_fwd.default,
                          (xh, torch.randn(4, 24), wh, 1e-6, torch.float32, 0.0, False, True))
