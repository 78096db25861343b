"""ik.cross_entropy over given logits, and the options both cross-entropies gained for Liger's users: per-class
weights, token accuracy / predicted tokens, and the fp32 dW accumulator of the fused linear cross-entropy.

The Triton kernels (interpreted on CPU) are checked against reference.py in float64, against torch's own
cross_entropy where it has the feature, with torch.empty NaN-poisoned so an unwritten element fails.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from test_cross_entropy import _poison_empty, assert_scaled_close  # noqa: F401  (the poisoning fixture)

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.triton import cross_entropy as kernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_logits(n, v, dtype=torch.float32, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 2).to(DEV, dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g).to(DEV)
    target[list(ignored)] = -100
    weight = (torch.rand(v, generator=g) + 0.25).to(DEV)
    return logits, target, weight


def oracle(logits, target, weight, grad, **kw):
    x = logits.detach().double().requires_grad_()
    loss, z_loss = reference.cross_entropy(x, target, None if weight is None else weight.double(), **kw)
    return loss.detach(), z_loss, torch.autograd.grad(loss, x, grad.double())[0]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference(reduction, weighted, monkeypatch):
    monkeypatch.setattr(kernels, "MAX_BLOCK_V", 16)  # 37 classes: three vocab blocks, a masked tail
    logits, target, weight = make_logits(19, 37, ignored=(0, 7))
    weight = weight if weighted else None
    kw = dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=4.0, reduction=reduction)
    with ik.use_backend("triton"):
        loss, z_loss = ik.cross_entropy(logits, target, weight, return_z_loss=True, **kw)
    grad = torch.rand_like(loss)
    (dlogits,) = torch.autograd.grad(loss, logits, grad)
    want_loss, want_z, want_grad = oracle(logits, target, weight, grad, **kw)
    assert_close(loss.double(), want_loss, msg="loss")
    assert_close(z_loss.double(), want_z.detach(), msg="z_loss")
    assert dlogits.dtype == logits.dtype
    assert_scaled_close(dlogits, want_grad, msg="dlogits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_torch_cross_entropy_with_weight_and_smoothing(dtype):
    logits, target, weight = make_logits(23, 29, dtype, ignored=(3,), seed=1)
    kw = dict(ignore_index=-100, label_smoothing=0.2)
    with ik.use_backend("triton"):
        loss = ik.cross_entropy(logits, target, weight.to(dtype), **kw)
    (got,) = torch.autograd.grad(loss, logits)
    x = logits.detach().float().requires_grad_()
    want = torch.nn.functional.cross_entropy(x, target, weight.to(dtype).float(), **kw)
    (want_grad,) = torch.autograd.grad(want, x)
    # fp32 softmax on the same (16-bit) values: the same fp32 loss, returned rounded once to the logits' dtype (as
    # torch's own cross_entropy returns a bf16 loss for bf16 logits)
    assert loss.dtype == dtype
    assert_close(loss.float(), want.to(dtype).float(), rtol=1e-5, atol=1e-6)
    assert_close(got, want_grad.to(dtype))


def test_reference_backend_and_leading_dims():
    logits, target, weight = make_logits(24, 17, ignored=(5,), seed=2)
    out = {}
    for backend in ("reference", "triton"):
        with ik.use_backend(backend):
            loss, acc, pred = ik.cross_entropy(logits.view(4, 6, 17), target.view(4, 6), weight, softcap=3.0,
                                               return_token_accuracy=True, return_predicted_tokens=True)
        out[backend] = (loss, acc, pred, torch.autograd.grad(loss, logits)[0])
    assert out["triton"][2].shape == (4, 6)
    for got, want in zip(out["triton"], out["reference"]):
        assert_close(got, want) if got.is_floating_point() else torch.testing.assert_close(got, want)


def test_token_accuracy_and_predicted_tokens(monkeypatch):
    monkeypatch.setattr(kernels, "MAX_BLOCK_V", 8)
    logits, target, _ = make_logits(20, 30, ignored=(1, 2), seed=3)
    with torch.no_grad():
        target[4:12] = logits[4:12].argmax(-1)     # some tokens right
        logits[6, 3] = logits[6, 20] = 50.0        # a tie across vocab blocks: the first maximal class wins
        target[6] = 3
    with ik.use_backend("triton"):
        loss, acc, pred = ik.cross_entropy(logits, target, return_token_accuracy=True, return_predicted_tokens=True)
        per_token = ik.cross_entropy(logits, target, reduction="none", return_token_accuracy=True)[1]
    valid = target != -100
    want_pred = torch.where(valid, logits.argmax(-1), -1)
    torch.testing.assert_close(pred, want_pred)
    assert pred[6] == 3
    correct = ((want_pred == target) & valid).float()
    assert_close(acc, correct.sum() / valid.sum())
    assert_close(per_token, correct)
    assert acc.item() >= 8 / 18


def test_fused_linear_weight_accuracy_against_reference(monkeypatch):
    """ce_weight, token accuracy and predicted tokens of the fused linear CE, over several chunks and vocab blocks,
    in the gradient-ahead (mean) and the recomputing (none) paths."""
    monkeypatch.setattr(kernels, "MAX_BLOCK_V", 16)
    monkeypatch.setattr(kernels, "LOGITS_CHUNK_BYTES", 7 * 41 * 4)  # 7-row chunks
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(25, 12, generator=g).to(DEV).requires_grad_()
    weight = (torch.randn(41, 12, generator=g) / 2).to(DEV).requires_grad_()
    target = torch.randint(0, 41, (25,), generator=g).to(DEV)
    target[[2, 9]] = -100
    ce_weight = (torch.rand(41, generator=g) + 0.5).to(DEV)
    kw = dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=5.0)
    for reduction in ("mean", "none"):
        with ik.use_backend("triton"):
            loss, acc, pred = ik.fused_linear_cross_entropy(
                hidden, weight, target, reduction=reduction, ce_weight=ce_weight, return_token_accuracy=True,
                return_predicted_tokens=True, **kw)
        grad = torch.rand_like(loss)
        got = torch.autograd.grad(loss, (hidden, weight), grad)
        x, w = (t.detach().double().requires_grad_() for t in (hidden, weight))
        want, _ = reference.linear_cross_entropy(x, w, target, None, -100, reduction, class_weight=ce_weight.double(),
                                                 **kw)
        want_grads = torch.autograd.grad(want, (x, w), grad.double())
        assert_close(loss.double(), want.detach(), msg=reduction)
        for a, b in zip(got, want_grads):
            assert_scaled_close(a, b, msg=reduction)
        logits = reference.linear_logits(x.detach(), w.detach(), softcap=5.0)
        torch.testing.assert_close(pred, reference.predicted_tokens(logits, target))
        correct = ((pred == target) & (target != -100)).float()
        assert_close(acc.double(), (correct if reduction == "none" else correct.sum() / 23).double())


def test_fp32_dweight_accumulator(monkeypatch):
    """bf16 weights, 32 chunks: dW accumulated in fp32 stays within about one bf16 rounding of the exact sum, and
    is closer to it than the bf16 accumulator (the default)."""
    monkeypatch.setattr(kernels, "LOGITS_CHUNK_BYTES", 4 * 24 * 2)  # 4-row chunks
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(128, 16, generator=g).to(DEV, torch.bfloat16)
    weight = (torch.randn(24, 16, generator=g) / 4).to(DEV, torch.bfloat16).requires_grad_()
    target = torch.randint(0, 24, (128,), generator=g).to(DEV)
    errors = {}
    w64 = weight.detach().double().requires_grad_()
    want, _ = reference.linear_cross_entropy(hidden.double(), w64, target, reduction="sum")
    (exact,) = torch.autograd.grad(want, w64)
    for accum in (None, torch.float32):
        with ik.use_backend("triton"):
            loss = ik.fused_linear_cross_entropy(hidden, weight, target, reduction="sum", accum_dtype=accum)
        (dw,) = torch.autograd.grad(loss, weight)
        assert dw.dtype == torch.bfloat16
        errors[accum] = ((dw.double() - exact).norm() / exact.norm()).item()
    assert errors[torch.float32] < 2 ** -8          # the final rounding and the bf16 per-chunk dlogits
    assert errors[torch.float32] < errors[None] / 2


def test_bad_arguments():
    logits, target, weight = make_logits(4, 5)
    with pytest.raises(ValueError, match="weight"):
        ik.cross_entropy(logits, target, weight[:3])
    with pytest.raises(ValueError, match="target"):
        ik.cross_entropy(logits, target[:3])
    with pytest.raises(ValueError, match="return_token_accuracy"):
        ik.cross_entropy(logits, target, return_token_accuracy=1)
    with pytest.raises(NotImplementedError, match="weight"):
        ik.cross_entropy(logits, target, weight.requires_grad_())
    with pytest.raises(NotImplementedError, match="accum_dtype"):
        ik.fused_linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), target, accum_dtype=torch.float64)


def test_inference_mode_and_opcheck():
    # torch.compile(fullgraph=True) of ik.cross_entropy: tests/test_patch_compile.py
    logits, target, weight = make_logits(9, 11, ignored=(2,), seed=6)
    with torch.inference_mode(), ik.use_backend("triton"):
        loss = ik.cross_entropy(logits.detach(), target, weight, label_smoothing=0.1)
    want, _ = reference.cross_entropy(logits.detach(), target, weight, label_smoothing=0.1)
    assert_close(loss, want)
    fwd = torch.ops.internlm_kernels.cross_entropy_fwd.default
    for reduction, ahead, w in (("mean", True, weight), ("none", False, None)):
        torch.library.opcheck(fwd, (logits, target, w, -100, reduction, 0.1, 1e-3, 2.0, ahead, True))
    torch.library.opcheck(torch.ops.internlm_kernels.cross_entropy_bwd.default,
                          (logits.detach(), target, weight, torch.rand(9), -100, 0.1, 0.0, 0.0))


@pytest.mark.gpu
def test_gpu_fp32_dweight_accumulator_and_bf16_logits():
    """On CUDA the fp32 accumulator is cuBLAS's fp32-output addmm (a path the CPU tests cannot take)."""
    torch.manual_seed(7)
    hidden = torch.randn(8192, 256, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(32000, 256, device="cuda") / 16).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 32000, (8192,), device="cuda")
    w64 = weight.detach().double().requires_grad_()
    want, _ = reference.linear_cross_entropy(hidden.double(), w64, target)
    (exact,) = torch.autograd.grad(want, w64)
    errors = {}
    for accum in (None, torch.float32):
        loss = ik.fused_linear_cross_entropy(hidden, weight, target, accum_dtype=accum)
        (dw,) = torch.autograd.grad(loss, weight)
        errors[accum] = ((dw.double() - exact).norm() / exact.norm()).item()
    assert errors[torch.float32] < 2 ** -7 and errors[torch.float32] <= errors[None]
    logits = (hidden @ weight.detach().t()).requires_grad_()
    loss, acc = ik.cross_entropy(logits, target, return_token_accuracy=True)
    want = torch.nn.functional.cross_entropy(logits.float(), target)
    assert_close(loss, want, rtol=1e-4, atol=1e-4)
    assert_close(acc, (logits.argmax(-1) == target).float().mean())
