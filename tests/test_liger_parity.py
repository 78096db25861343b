"""Drop-in parity with Liger-Kernel (issue 27): each test names the upstream behaviour it follows.

Liger 0.8.5's behaviours, read from its source (liger_kernel/ops/{rms_norm,swiglu,cross_entropy,
fused_linear_cross_entropy}.py), not run here (its Triton kernels need CUDA):
  * LigerRMSNorm casting_mode="none": statistics and scaling in the input dtype;
  * cross-entropy with class weights and z-loss, reduction mean: Σ w_y·ce / Σ w_y + Σ λ·lse² / n_counted;
  * LigerCrossEntropyFunction returns the loss (and z-loss) in the logits' dtype, as torch's cross_entropy does;
    LigerFusedLinearCrossEntropyFunction returns an fp32 loss and a z-loss in the input dtype;
  * LigerSiLUMulFunction.apply(a, b, gate_multiplier, down_multiplier) = silu(a·m_g)·b·m_d;
  * LigerFusedLinearCrossEntropyFunction(use_token_scaling=True): each token's loss, z-loss and gradient times its
    predicted probability of the target, a constant.
The kernels (Triton, interpreted on CPU; the cpu path) are checked against reference.py in float64, and reference.py
against direct float64 formulas. torch.empty is NaN-poisoned while a test runs, so an unwritten element fails.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from test_cross_entropy import _poison_empty, assert_scaled_close  # noqa: F401  (the poisoning fixture)

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.triton import cross_entropy as ce_kernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# One bf16 ulp is 2^-8 relative. Under the Triton interpreter every fp32 -> bf16 cast truncates (platforms.md), and
# casting_mode "none" rounds six times in a chain (h², mean, + eps, rstd, h·rstd, y): up to 6 ulps there, 1 on GPU.
BF16_CHAIN_RTOL = 6 * 2.0 ** -8
# fp16 casts round to nearest under the interpreter too; 1/sqrt against torch.rsqrt may still differ by an ulp.
FP16_RTOL = 2.0 ** -10


# --------------------------------------------------------------------------------------------------
# RMSNorm casting_mode="none" (LigerRMSNorm)
# --------------------------------------------------------------------------------------------------
def test_reference_rms_norm_none_rounds_each_step_to_the_input_dtype():
    """reference.rms_norm_low_precision in fp16 equals the Llama-style expression with every rounding to fp16 written
    out (fp16's range is ample here), and its float32 result is the "gemma" one."""
    torch.manual_seed(0)
    x, w = torch.randn(6, 37, dtype=torch.float16) * 3, torch.rand(37, dtype=torch.float16) + 0.5
    f = torch.float32
    ms = ((x.float() * x.float()).half().float().mean(-1, keepdim=True)).half()
    r = torch.rsqrt((ms.float() + 1e-5).half().float()).half()
    want = ((x.float() * r.float()).half().float() * w.float()).half()
    assert torch.equal(reference.rms_norm(x, w, 1e-5, casting_mode="none"), want)
    x32 = x.to(f)
    assert_close(reference.rms_norm(x32, w.to(f), 1e-5, casting_mode="none"), reference.rms_norm(x32, w.to(f), 1e-5))


# The cpu paths are float32 only (16-bit inputs run the reference under the auto backend).
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize("backend, dtype", [("triton", F32), ("triton", F16), ("triton", BF16), ("cpu", F32),
                                            ("reference", BF16)], ids=str)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_casting_mode_none_follows_liger(backend, dtype, with_residual):
    """LigerRMSNorm(casting_mode="none"): statistics and scaling in the input dtype. Forward and backward against
    reference.rms_norm_low_precision."""
    torch.manual_seed(1)
    x = (torch.randn(5, 3, 37, device=DEV) * 2).to(dtype).requires_grad_()
    w = (torch.rand(37, device=DEV) + 0.5).to(dtype).requires_grad_()
    res = torch.randn(5, 3, 37, device=DEV).to(dtype).requires_grad_() if with_residual else None
    kw = dict(eps=1e-5, prenorm=with_residual, casting_mode="none")
    with ik.use_backend(backend):
        out = ik.rms_norm(x, w, residual=res, **kw)
    ins = (x, w) + ((res,) if with_residual else ())
    leaves = [t.detach().to(torch.float64 if dtype == torch.float32 else dtype).requires_grad_() for t in ins]
    want = reference.rms_norm(leaves[0], leaves[1], residual=leaves[2] if with_residual else None, **kw)
    outs, wants = (out, want) if with_residual else ((out,), (want,))
    rtol = {torch.float32: 1e-5, torch.float16: FP16_RTOL, torch.bfloat16: BF16_CHAIN_RTOL}[dtype]
    for got, exp in zip(outs, wants):
        assert got.dtype == dtype
        assert_close(got, exp, rtol=rtol, atol=rtol)
    grads_out = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, ins, grads_out)
    exp = torch.autograd.grad(wants, leaves, [g.to(leaves[0].dtype) for g in grads_out])
    for g, e, name in zip(got, exp, ("dx", "dw", "dres")):
        # 16 bits: the reference's gradient rounds every intermediate to 16 bits, the kernel's is float32 inside
        assert_scaled_close(g, e, msg=name)


def test_rms_norm_none_differs_from_gemma_in_bf16_and_module_takes_it():
    """The mode is really low precision (bf16 statistics differ from fp32 ones somewhere), and nn.RMSNorm takes it."""
    torch.manual_seed(2)
    x = torch.randn(16, 64, dtype=torch.bfloat16) * 3
    w = torch.rand(64, dtype=torch.bfloat16) + 0.5
    with ik.use_backend("triton"):
        none, gemma = ik.rms_norm(x, w, casting_mode="none"), ik.rms_norm(x, w, casting_mode="gemma")
    assert not torch.equal(none, gemma)
    norm = ik.nn.RMSNorm(64, eps=1e-6, dtype=torch.bfloat16, casting_mode="none")
    assert "casting_mode='none'" in repr(norm)
    with torch.inference_mode(), ik.use_backend("triton"):
        assert_close(norm(x), reference.rms_norm(x, norm.weight, 1e-6, casting_mode="none"), rtol=BF16_CHAIN_RTOL,
                     atol=BF16_CHAIN_RTOL)


# --------------------------------------------------------------------------------------------------
# z-loss with class weights, reduction mean (Liger's cross_entropy kernel)
# --------------------------------------------------------------------------------------------------
def _direct_weighted_z_loss(logits, target, class_weight, lam):
    """The mean loss and z-loss written out in float64 over the counted tokens t:
    Σ_t w_{y_t}(lse_t - z_{t,y_t}) / Σ_t w_{y_t} + λ Σ_t lse_t² / n_counted, and λ Σ_t lse_t² / n_counted."""
    counted = (target != -100).nonzero().squeeze(1)
    z = logits[counted]
    y = target[counted]
    lse = torch.logsumexp(z, dim=-1)
    w_y = class_weight[y]
    ce = (w_y * (lse - z.gather(1, y[:, None]).squeeze(1))).sum() / w_y.sum()
    z_loss = lam * (lse ** 2).sum() / counted.numel()
    return ce + z_loss, z_loss


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused_linear", "logits"])
def test_z_loss_with_class_weights_divides_by_counted_tokens_as_liger(backend, fused, monkeypatch):
    """Liger's cross-entropy (fused linear and over logits), reduction mean with ce_weight and lse_square_scale:
    the z-loss is divided by the number of counted tokens, not by the summed class weights (weights here ~2-5,
    so the two conventions differ ~3.5x in the z-loss). Loss, z-loss and gradients against a float64 formula."""
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_V", 16)   # 37 classes: three vocab blocks, a masked tail
    torch.manual_seed(3)
    n, h, v, lam = 19, 12, 37, 0.05
    hidden = torch.randn(n, h, device=DEV, requires_grad=True)
    weight = (torch.randn(v, h, device=DEV) / h ** 0.5).requires_grad_()
    target = torch.randint(0, v, (n,), device=DEV)
    target[[0, 4, 11]] = -100
    class_weight = torch.rand(v, device=DEV) * 3 + 2
    hd, wd = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want, want_z = _direct_weighted_z_loss(hd @ wd.t(), target, class_weight.double(), lam)
    want_grads = torch.autograd.grad(want, (hd, wd))
    with ik.use_backend(backend):
        if fused:
            loss, z_loss = ik.fused_linear_cross_entropy(hidden, weight, target, lse_square_scale=lam,
                                                         return_z_loss=True, ce_weight=class_weight)
            grads = torch.autograd.grad(loss, (hidden, weight))
        else:
            logits = hidden @ weight.t()
            loss, z_loss = ik.cross_entropy(logits, target, class_weight, lse_square_scale=lam, return_z_loss=True)
            grads = torch.autograd.grad(loss, (hidden, weight))
    assert_close(loss.double(), want.detach(), msg="loss")
    assert_close(z_loss.double(), want_z.detach(), msg="z_loss")
    for got, exp, name in zip(grads, want_grads, ("dhidden", "dweight")):
        assert_scaled_close(got, exp, msg=name)


def test_z_loss_convention_on_the_recomputing_backward_and_the_liger_module(monkeypatch):
    """fp16 recomputes the gradients in the backward (not ahead in the forward): the same convention there; and
    nn.FusedLinearCrossEntropyLoss (Liger's module options, by keyword) gives the same loss."""
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_V", 16)
    torch.manual_seed(4)
    n, h, v, lam = 13, 16, 37, 0.05
    hidden = torch.randn(n, h, device=DEV).half().requires_grad_()
    weight = (torch.randn(v, h, device=DEV) / h ** 0.5).half().requires_grad_()
    target = torch.randint(0, v, (n,), device=DEV)
    target[[1, 7]] = -100
    class_weight = torch.rand(v, device=DEV) * 3 + 2
    hd, wd = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want, _ = _direct_weighted_z_loss(hd @ wd.t(), target, class_weight.double(), lam)
    want_grads = torch.autograd.grad(want, (hd, wd))
    module = ik.nn.FusedLinearCrossEntropyLoss(lse_square_scale=lam, ce_weight=class_weight.half(), softcap=None)
    with ik.use_backend("triton"):
        loss = module(weight, hidden, target)
    assert loss.dtype == torch.float32
    assert_close(loss.double(), want.detach(), rtol=1e-2, atol=1e-2)
    for got, exp, name in zip(torch.autograd.grad(loss, (hidden, weight)), want_grads, ("dhidden", "dweight")):
        assert_scaled_close(got, exp, msg=name)


# --------------------------------------------------------------------------------------------------
# The loss dtype with 16-bit inputs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_logits_give_a_bf16_loss_rounded_once_as_torch_and_liger(backend, reduction):
    """torch's cross_entropy and LigerCrossEntropyFunction return a bf16 loss for bf16 logits: ours too, whose value
    is the fp32 loss (the same logits widened exactly) rounded once; the z-loss likewise. The gradient stays bf16."""
    torch.manual_seed(5)
    logits = (torch.randn(11, 37, device=DEV) * 3).bfloat16().requires_grad_()
    target = torch.randint(0, 37, (11,), device=DEV)
    target[3] = -100
    kw = dict(reduction=reduction, lse_square_scale=1e-2, label_smoothing=0.1, return_z_loss=True)
    with ik.use_backend(backend):
        loss, z_loss = ik.cross_entropy(logits, target, **kw)
        loss32, z32 = ik.cross_entropy(logits.detach().float(), target, **kw)
    assert loss.dtype == z_loss.dtype == F.cross_entropy(logits, target, reduction=reduction).dtype == torch.bfloat16
    assert loss32.dtype == torch.float32
    assert torch.equal(loss.detach(), loss32.bfloat16()) and torch.equal(z_loss, z32.bfloat16())
    (grad,) = torch.autograd.grad(loss.float().sum(), logits)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


def test_fused_linear_bf16_loss_is_fp32_and_z_loss_bf16_as_liger():
    """LigerFusedLinearCrossEntropyFunction keeps its loss in fp32 (its per-token buffer is fp32) and returns the
    z-loss in the input dtype: ours returns the same dtypes, the z-loss the fp32 one rounded once."""
    torch.manual_seed(6)
    hidden = torch.randn(9, 16, device=DEV).bfloat16()
    weight = (torch.randn(37, 16, device=DEV) / 4).bfloat16()
    target = torch.randint(0, 37, (9,), device=DEV)
    for backend in ("triton", "reference"):
        with ik.use_backend(backend):
            loss, z_loss = ik.fused_linear_cross_entropy(hidden, weight, target, lse_square_scale=1e-2,
                                                         return_z_loss=True)
            with torch.no_grad():
                _, z32 = ik.fused_linear_cross_entropy(hidden.float(), weight.float(), target,
                                                       lse_square_scale=1e-2, return_z_loss=True)
        assert loss.dtype == torch.float32 and z_loss.dtype == torch.bfloat16, backend
        # the bf16 logits of the fused path are rounded before the softmax: the fp32 z-loss here is not bitwise its
        # own, so one bf16 ulp apart at most
        assert_close(z_loss, z32.bfloat16(), rtol=2.0 ** -8, atol=0.0, msg=backend)


# --------------------------------------------------------------------------------------------------
# SwiGLU with gate / down multipliers (LigerSiLUMulFunction, Falcon-H1)
# --------------------------------------------------------------------------------------------------
def test_reference_swiglu_multipliers_are_liger_silu_mul():
    """reference.swiglu(a, b, m_g, m_d) = silu(a·m_g)·b·m_d in float64 (LigerSiLUMulFunction's math)."""
    a, b = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    assert_close(reference.swiglu(a, b, 0.3, 2.5), F.silu(a * 0.3) * b * 2.5)


@pytest.mark.parametrize("backend, dtype", [("triton", F32), ("triton", BF16), ("cpu", F32)], ids=str)
@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 19)], ids=str)
def test_swiglu_multipliers_match_reference(backend, dtype, shape):
    """LigerSiLUMulFunction with gate / down multipliers, forward (also under inference_mode) and backward."""
    torch.manual_seed(7)
    gate = (torch.randn(*shape, device=DEV) * 3).to(dtype).requires_grad_()
    up = torch.randn(*shape, device=DEV).to(dtype).requires_grad_()
    m_g, m_d = 0.35, 1.75
    with ik.use_backend(backend):
        out = ik.swiglu(gate, up, m_g, m_d)
        with torch.inference_mode():
            out_inf = ik.swiglu(gate, up, gate_multiplier=m_g, down_multiplier=m_d)
        plain = ik.swiglu(gate, up)
    assert torch.equal(out_inf, out.detach())
    leaves = [t.detach().to(torch.float64 if dtype == torch.float32 else dtype).requires_grad_() for t in (gate, up)]
    want = reference.swiglu(*leaves, m_g, m_d)
    assert out.dtype == dtype
    assert_close(out, want)
    assert_close(plain, reference.swiglu(*(t.detach() for t in leaves)))
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (gate, up), dout)
    exp = torch.autograd.grad(want, leaves, dout.to(want.dtype))
    for g, e, name in zip(got, exp, ("dgate", "dup")):
        assert_scaled_close(g, e, msg=name)


def test_swiglu_multiplier_module_and_bad_values():
    gate, up = torch.randn(3, 8), torch.randn(3, 8)
    module = ik.nn.SwiGLU(gate_multiplier=0.5, down_multiplier=3.0)
    assert "gate_multiplier=0.5" in repr(module)
    assert_close(module(gate, up), reference.swiglu(gate, up, 0.5, 3.0))
    with pytest.raises(NotImplementedError, match="multipliers"):
        module(torch.cat((gate, up), -1))
    with pytest.raises(ValueError, match="gate_multiplier"):
        ik.swiglu(gate, up, gate_multiplier=float("inf"))
    with pytest.raises(ValueError, match="down_multiplier"):
        ik.swiglu(gate, up, down_multiplier=None)


# --------------------------------------------------------------------------------------------------
# use_token_scaling (LigerFusedLinearCrossEntropyFunction)
# --------------------------------------------------------------------------------------------------
def test_reference_token_scaling_is_liger_formula():
    """reference: loss = Σ_t p_t·ce_t / n with p_t = softmax(z_t)[y_t] a constant; its gradient is p_t·dce_t."""
    torch.manual_seed(8)
    z = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    y[2] = -100
    loss, _ = reference.cross_entropy(z, y, token_scaling=True)
    counted = y != -100
    p = torch.softmax(z.detach(), -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    ce = F.cross_entropy(z, y, reduction="none")
    want = (p * ce)[counted].sum() / counted.sum()
    assert_close(loss, want)
    assert_close(torch.autograd.grad(loss, z)[0], torch.autograd.grad(want, z)[0])


@pytest.mark.parametrize("backend, dtype", [("triton", F32), ("triton", F16), ("triton", BF16), ("cpu", F32)],
                         ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_scaling_matches_reference(backend, reduction, dtype, monkeypatch):
    """LigerFusedLinearCrossEntropyFunction(use_token_scaling=True). Odd shapes (13 tokens in chunks of 4, vocab 37
    in blocks of 16), ignored tokens, smoothing, softcap and z-loss; fp16 also takes the recomputing backward; the
    forward again under inference_mode."""
    monkeypatch.setattr(ce_kernels, "LOGITS_CHUNK_BYTES", 4 * 37 * torch.tensor([], dtype=dtype).element_size())
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_V", 16)
    torch.manual_seed(9)
    hidden = torch.randn(13, 16, device=DEV).to(dtype).requires_grad_()
    weight = (torch.randn(37, 16, device=DEV) * 0.7).to(dtype).requires_grad_()
    target = torch.randint(0, 37, (13,), device=DEV)
    target[[0, 6, 12]] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1, lse_square_scale=1e-2, softcap=4.0)
    with ik.use_backend(backend):
        loss, z_loss = ik.fused_linear_cross_entropy(hidden, weight, target, return_z_loss=True,
                                                     use_token_scaling=True, **kw)
        with torch.inference_mode():
            loss_inf = ik.fused_linear_cross_entropy(hidden, weight, target, use_token_scaling=True, **kw)
    hd, wd = (t.detach().double().requires_grad_() for t in (hidden, weight))
    want, want_z = reference.linear_cross_entropy(hd, wd, target, None, -100, token_scaling=True, **kw)
    # 16 bits: the logits are rounded by the matmul (the oracle uses exact ones), ~1e-3 (fp16) / ~4e-3 (bf16) relative
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_close(loss.double(), want.detach(), **tol, msg="loss")
    assert_close(z_loss.double(), want_z.detach(), **tol, msg="z_loss")
    assert_close(loss_inf, loss.detach(), rtol=1e-6, atol=1e-6, msg="inference_mode")
    grad = torch.rand_like(loss)
    got = torch.autograd.grad(loss, (hidden, weight), grad)
    exp = torch.autograd.grad(want, (hd, wd), grad.double())
    for g, e, name in zip(got, exp, ("dhidden", "dweight")):
        assert g.dtype == dtype
        assert_scaled_close(g, e, msg=name)


def test_token_scaling_with_class_weights_and_module(monkeypatch):
    """use_token_scaling together with ce_weight (the Triton path; the cpu path takes no class weights) and through
    nn.FusedLinearCrossEntropyLoss's Liger keywords."""
    monkeypatch.setattr(ce_kernels, "MAX_BLOCK_V", 16)
    torch.manual_seed(10)
    hidden = torch.randn(11, 16, device=DEV, requires_grad=True)
    weight = torch.randn(37, 16, device=DEV, requires_grad=True)
    target = torch.randint(0, 37, (11,), device=DEV)
    target[5] = -100
    class_weight = torch.rand(37, device=DEV) * 3 + 2
    module = ik.nn.FusedLinearCrossEntropyLoss(lse_square_scale=1e-2, ce_weight=class_weight, use_token_scaling=True)
    with ik.use_backend("triton"):
        loss = module(weight, hidden, target)
    hd, wd = (t.detach().double().requires_grad_() for t in (hidden, weight))
    want, _ = reference.linear_cross_entropy(hd, wd, target, lse_square_scale=1e-2, class_weight=class_weight.double(),
                                             token_scaling=True)
    assert_close(loss.double(), want.detach())
    for g, e in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(want, (hd, wd))):
        assert_scaled_close(g, e)


def test_opcheck_new_arguments():
    """The custom ops' schemas with the new arguments (token_scaling, multipliers)."""
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    target = torch.randint(0, 13, (6,))
    torch.library.opcheck(torch.ops.internlm_kernels.linear_cross_entropy_fwd.default,
                          (hidden, weight, target, None, -100, "none", 0.0, 1e-3, 0.0, False, False, False,
                           torch.rand(13) + 1, False, False, True))
    gate, up = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.internlm_kernels.swiglu_fwd.default, (gate, up, 0.5, 2.0))


# --------------------------------------------------------------------------------------------------
# torch.compile (fullgraph), one per new variant family
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_fullgraph_compile_token_scaling_and_multipliers(backend):
    """One compiled function with both new variants, forward and backward, equal to eager."""
    torch.manual_seed(11)
    hidden = torch.randn(9, 16, device=DEV, requires_grad=True)
    up = torch.randn(9, 16, device=DEV, requires_grad=True)
    weight = torch.randn(29, 16, device=DEV, requires_grad=True)
    target = torch.randint(0, 29, (9,), device=DEV)
    target[4] = -100

    def step(hidden, up, weight, target):
        act = ik.swiglu(hidden, up, 0.5, 1.5)
        return ik.fused_linear_cross_entropy(act, weight, target, lse_square_scale=1e-3, use_token_scaling=True)

    with ik.use_backend(backend):
        compiled = torch.compile(step, fullgraph=True)
        got = compiled(hidden, up, weight, target)
        got_grads = torch.autograd.grad(got, (hidden, up, weight))
        want = step(hidden, up, weight, target)
        want_grads = torch.autograd.grad(want, (hidden, up, weight))
    assert_close(got, want)
    for g, e in zip(got_grads, want_grads):
        assert_close(g, e)


# --------------------------------------------------------------------------------------------------
# bf16 on a GPU (benchmarks/gpu_check.sh): the casts round to nearest there, so "none" is within one ulp
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_bf16_rms_norm_none_and_swiglu_multipliers():
    x = (torch.randn(4096, 4096, device="cuda") * 2).bfloat16()
    w = (torch.rand(4096, device="cuda") + 0.5).bfloat16()
    # one bf16 ulp: 1/sqrt against torch.rsqrt and the order of the float32 sum may move a rounding by one
    assert_close(ik.rms_norm(x, w, 1e-6, casting_mode="none"), reference.rms_norm(x, w, 1e-6, casting_mode="none"),
                 rtol=2.0 ** -8, atol=2.0 ** -8)
    gate, up = torch.randn(2048, 14336, device="cuda").bfloat16(), torch.randn(2048, 14336, device="cuda").bfloat16()
    assert_close(ik.swiglu(gate, up, 0.5, 2.0), reference.swiglu(gate, up, 0.5, 2.0))
