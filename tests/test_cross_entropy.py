"""Fused linear + cross-entropy (Triton backend) against reference.linear_cross_entropy in float64.

On CPU the Triton kernels run under the interpreter; torch.empty is NaN-poisoned (deterministic mode) so an
element the op forgets to write fails the comparison.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.triton import cross_entropy as kernels

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
ALL_FEATURES = dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=3.0)


@pytest.fixture(autouse=True)
def _poison_empty():
    """torch.empty returns NaN-filled memory while a test runs."""
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)  # only for the fill: cuBLAS would refuse otherwise
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def small_tiles(monkeypatch):
    """Chunks of ``rows`` tokens and vocab blocks of ``block`` columns, so small shapes cross both boundaries."""
    def set_tiles(rows: int, block: int, vocab: int, element_size: int):
        monkeypatch.setattr(kernels, "LOGITS_CHUNK_BYTES", rows * vocab * element_size)
        monkeypatch.setattr(kernels, "MAX_BLOCK_V", block)
    return set_tiles


def make_inputs(n, h, v, dtype, bias=False, ignored=(), device=DEV, scale=1.0):
    """hidden (n, h), weight (v, h) with logits of std ≈ ``scale``, targets with ``ignored`` positions at -100."""
    hidden = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) * scale / h ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(v, device=device).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, v, (n,), device=device)
    target[list(ignored)] = -100
    return hidden, weight, target, b


def triton_loss(hidden, weight, target, bias=None, **kw):
    with ik.use_backend("triton"):
        return ik.fused_linear_cross_entropy(hidden, weight, target, bias, return_z_loss=True, **kw)


def oracle(hidden, weight, target, bias, grad_loss, reduction="mean", **kw):
    """reference.linear_cross_entropy in float64 on the same (rounded) inputs: loss, z_loss and gradients."""
    inputs = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss, z_loss = reference.linear_cross_entropy(inputs[0], inputs[1], target.long(),
                                                  inputs[2] if bias is not None else None, -100, reduction,
                                                  kw.get("label_smoothing", 0.0), kw.get("lse_square_scale", 0.0),
                                                  kw.get("softcap", 0.0))
    grads = torch.autograd.grad(loss, inputs, grad_loss.double())
    return loss.detach(), z_loss.detach(), grads


def assert_scaled_close(actual, expected, fp32_tol=1e-5, msg=""):
    """Elementwise comparison with the absolute tolerance taken relative to the largest expected magnitude."""
    scale = expected.abs().max().clamp(min=1e-30)
    assert_close(actual.double() / scale, expected / scale, **_tol(actual, fp32_tol), msg=msg)


def _tol(t, fp32_tol=1e-5):
    return dict(rtol=fp32_tol, atol=fp32_tol) if t.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)


def check_against_oracle(hidden, weight, target, bias=None, reduction="mean", fp32_tol=1e-5, **kw):
    loss, z_loss = triton_loss(hidden, weight, target, bias, reduction=reduction, **kw)
    assert loss.dtype == torch.float32 and not z_loss.requires_grad
    grad_loss = torch.randn_like(loss)
    params = (hidden, weight) + ((bias,) if bias is not None else ())
    grads = torch.autograd.grad(loss, params, grad_loss)
    ref_loss, ref_z, ref_grads = oracle(hidden, weight, target, bias, grad_loss, reduction, **kw)
    tol = _tol(hidden, fp32_tol)
    assert_close(loss.double(), ref_loss, **tol, msg="loss")
    assert_close(z_loss.double(), ref_z, **tol, msg="z_loss")
    for name, got, want in zip(("dhidden", "dweight", "dbias"), grads, ref_grads):
        assert got.dtype == hidden.dtype and got.shape == want.shape
        assert_scaled_close(got, want, fp32_tol, msg=name)


CASES = ([(torch.float32, features) for features in (False, True)] + [(torch.bfloat16, True), (torch.float16, False)])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype,features", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_matches_reference(reduction, dtype, features, small_tiles):
    # 45 tokens in chunks of 16 (tail 13), vocab 211 in blocks of 64 (tail 19); bias, smoothing, z-loss, softcap
    small_tiles(16, 64, 211, torch.tensor([], dtype=dtype).element_size())
    hidden, weight, target, bias = make_inputs(45, 40, 211, dtype, bias=features, ignored=(0, 5, 44))
    check_against_oracle(hidden, weight, target, bias, reduction, **(ALL_FEATURES if features else {}))


def test_default_tiles_one_chunk_one_block():
    hidden, weight, target, bias = make_inputs(50, 33, 997, torch.float32, bias=True, ignored=(7,))
    check_against_oracle(hidden, weight, target, bias, "mean", **ALL_FEATURES)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_boundaries_and_an_all_ignored_chunk(reduction, small_tiles):
    # chunks [0,16) [16,32) [32,40); the whole second chunk is ignored; vocab 130 = 2 blocks of 64 + 2
    small_tiles(16, 64, 130, 4)
    ignored = list(range(16, 32)) + [35, 39]
    hidden, weight, target, _ = make_inputs(40, 48, 130, torch.float32, ignored=ignored)
    check_against_oracle(hidden, weight, target, None, reduction, label_smoothing=0.05, lse_square_scale=1e-2)
    loss, _ = triton_loss(hidden, weight, target, reduction=reduction)
    (dhidden,) = torch.autograd.grad(loss.sum(), hidden)
    assert torch.count_nonzero(dhidden[ignored]) == 0
    if reduction == "none":
        assert torch.count_nonzero(loss[ignored]) == 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_token_ignored_gives_zero_loss_and_gradient(reduction, small_tiles):
    small_tiles(8, 64, 100, 4)
    hidden, weight, target, bias = make_inputs(20, 16, 100, torch.float32, bias=True, ignored=range(20))
    loss, z_loss = triton_loss(hidden, weight, target, bias, reduction=reduction, lse_square_scale=1e-2)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert loss.item() == 0.0 and z_loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_fp32_matches_float64_tightly_on_large_logits(small_tiles):
    # logits of std 8 (and a softcap of 30): the online log-sum-exp must stay exact
    small_tiles(16, 64, 211, 4)
    hidden, weight, target, _ = make_inputs(40, 24, 211, torch.float32, ignored=(3,), scale=8.0)
    check_against_oracle(hidden, weight, target, None, "sum", softcap=30.0, lse_square_scale=1e-4)


def test_leading_dims_and_int32_target():
    hidden, weight, target, _ = make_inputs(38, 20, 129, torch.float32, ignored=(1,))
    hidden3 = hidden.detach().reshape(2, 19, 20).requires_grad_()
    loss, z_loss = triton_loss(hidden3, weight, target.int().reshape(2, 19), reduction="none", lse_square_scale=1e-3)
    assert loss.shape == z_loss.shape == (2, 19)
    grad_loss = torch.randn(2, 19)
    grads = torch.autograd.grad(loss, (hidden3, weight), grad_loss)
    ref_loss, ref_z, ref_grads = oracle(hidden, weight, target, None, grad_loss.reshape(-1), "none",
                                        lse_square_scale=1e-3)
    assert_close(loss.reshape(-1).double(), ref_loss)
    assert_close(z_loss.reshape(-1).double(), ref_z)
    assert_scaled_close(grads[0].reshape(38, 20), ref_grads[0])
    assert_scaled_close(grads[1], ref_grads[1])


def test_none_reduction_with_broadcast_upstream_grad():
    # loss.sum() hands the op a stride-0 (expanded) per-token gradient
    hidden, weight, target, _ = make_inputs(30, 16, 70, torch.float32, ignored=(2,))
    loss, _ = triton_loss(hidden, weight, target, reduction="none")
    grads = torch.autograd.grad(loss.sum() * 3.0, (hidden, weight))
    _, _, ref_grads = oracle(hidden, weight, target, None, torch.full((30,), 3.0), "none")
    for got, want in zip(grads, ref_grads):
        assert_scaled_close(got, want)


def test_rows_kernel_writes_loss_and_scaled_gradient(small_tiles):
    small_tiles(1, 32, 75, 4)
    logits = torch.randn(9, 75, dtype=torch.float64) * 3
    target = torch.randint(0, 75, (9,))
    target[4] = -100
    per_token = torch.randn(9)
    for grad_scale in (None, torch.tensor(0.5), per_token):
        buf = logits.float().clone()
        loss, z_loss = torch.full((9,), float("nan")), torch.full((9,), float("nan"))
        kernels.cross_entropy_rows(buf, target, loss, z_loss, grad_scale, -100, 0.2, 1e-2, 0.0)
        z = logits.clone().requires_grad_()
        lse = torch.logsumexp(z, -1)
        valid = target != -100
        picked = z.gather(1, target.clamp(min=0)[:, None])[:, 0]
        want = (0.8 * (lse - picked) + 0.2 * (lse - z.mean(-1)) + 1e-2 * lse ** 2) * valid
        assert_close(loss.double(), want.detach())
        assert_close(z_loss.double(), (1e-2 * lse ** 2 * valid).detach())
        if grad_scale is None:
            assert torch.equal(buf, logits.float())  # forward-only leaves the logits alone
        else:
            (dz,) = torch.autograd.grad(want, z, grad_scale.double().expand(9))
            assert_close(buf.double(), dz)


def test_scale_kernel_strides_over_every_element_and_skips_a_factor_of_one():
    x = torch.randn(4 * kernels.SCALE_BLOCK * 2 + 7)  # 4 programs on CPU: two rounds each and a tail
    want = x * -0.75
    kernels.scale_unless_one_(x, torch.tensor(-0.75))
    assert torch.equal(x, want)
    kernels.scale_unless_one_(x, torch.tensor(1.0))
    assert torch.equal(x, want)


@pytest.mark.parametrize("needs", ["hidden", "weight", "bias", "nothing"])
def test_gradients_only_for_inputs_that_need_them(needs):
    hidden, weight, target, bias = make_inputs(21, 16, 50, torch.float32, bias=True, ignored=(4,))
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        t.requires_grad_(name == needs)
    with _OpCalls() as calls:
        loss, _ = triton_loss(hidden, weight, target, bias, lse_square_scale=1e-3)
    ahead = calls.args[0][9:12]
    assert ahead == tuple(name == needs for name in ("hidden", "weight", "bias"))
    assert loss.requires_grad == (needs != "nothing")
    if needs != "nothing":
        wanted = dict(hidden=hidden, weight=weight, bias=bias)[needs]
        (grad,) = torch.autograd.grad(loss, wanted)
        _, _, ref_grads = oracle(hidden, weight, target, bias, torch.tensor(1.0), lse_square_scale=1e-3)
        assert_scaled_close(grad, ref_grads[("hidden", "weight", "bias").index(needs)])


def test_float16_defers_gradients_to_the_backward():
    # a GradScaler-sized upstream grad must reach dlogits before they are rounded to fp16
    hidden, weight, target, _ = make_inputs(21, 16, 50, torch.float16, ignored=(4,), scale=4.0)
    with _OpCalls() as calls:
        loss, _ = triton_loss(hidden, weight, target)
    assert calls.args[0][9:12] == (False, False, False)
    grads = torch.autograd.grad(loss * 65536.0, (hidden, weight))
    _, _, ref_grads = oracle(hidden, weight, target, None, torch.tensor(65536.0))
    for got, want in zip(grads, ref_grads):
        assert_scaled_close(got, want)


def test_no_grad_mode_computes_only_the_loss():
    hidden, weight, target, _ = make_inputs(21, 16, 50, torch.float32)
    with torch.no_grad(), _OpCalls() as calls:
        loss, _ = triton_loss(hidden, weight, target, reduction="sum")
    assert calls.args[0][9:12] == (False, False, False) and not loss.requires_grad
    ref_loss, _, _ = oracle(hidden, weight, target, None, torch.tensor(1.0), "sum")
    assert_close(loss.double(), ref_loss)


def test_precomputed_gradient_is_handed_over_without_a_copy():
    hidden, weight, target, _ = make_inputs(21, 16, 50, torch.float32)
    op = torch.ops.internlm_kernels.linear_cross_entropy_fwd
    loss, _, dhidden, dweight, _, _ = op(hidden, weight, target, None, -100, "mean", 0.0, 0.0, 0.0, True, True, False)
    pointers = dhidden.data_ptr(), dweight.data_ptr()
    del dhidden, dweight
    (loss * 0.5).backward()
    assert (hidden.grad.data_ptr(), weight.grad.data_ptr()) == pointers


def test_second_backward_through_a_scaled_gradient_raises():
    # the precomputed gradient is scaled in place: a retained graph must not hand it out twice
    hidden, weight, target, _ = make_inputs(21, 16, 50, torch.float32)
    loss, _ = triton_loss(hidden, weight, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_reference_backend_agrees_and_z_loss_has_no_gradient():
    hidden, weight, target, bias = make_inputs(30, 16, 70, torch.float32, bias=True, ignored=(2,))
    out = {}
    for backend in ("reference", "triton"):
        with ik.use_backend(backend):
            loss, z_loss = ik.fused_linear_cross_entropy(hidden, weight, target, bias, reduction="sum",
                                                         return_z_loss=True, **ALL_FEATURES)
        assert not z_loss.requires_grad
        out[backend] = (loss, z_loss, *torch.autograd.grad(loss, (hidden, weight, bias)))
    for got, want in zip(out["triton"], out["reference"]):
        assert_scaled_close(got, want.double())


def test_module_matches_function():
    hidden, weight, target, _ = make_inputs(30, 16, 70, torch.float32, ignored=(2,))
    module = ik.nn.FusedLinearCrossEntropyLoss(reduction="sum", lse_square_scale=1e-3, return_z_loss=True)
    with ik.use_backend("triton"):
        loss, z_loss = module(weight, hidden, target)
    want_loss, want_z = triton_loss(hidden, weight, target, reduction="sum", lse_square_scale=1e-3)
    assert torch.equal(loss, want_loss) and torch.equal(z_loss, want_z)


def test_opcheck():
    hidden, weight, target, bias = make_inputs(13, 8, 19, torch.float32, bias=True, ignored=(1,))
    fwd = torch.ops.internlm_kernels.linear_cross_entropy_fwd.default
    for reduction, ahead, b in (("mean", True, bias), ("sum", False, None), ("none", False, bias)):
        torch.library.opcheck(fwd, (hidden, weight, target, b, -100, reduction, 0.1, 1e-3, 2.0, ahead, ahead,
                                    ahead and b is not None))
    torch.library.opcheck(torch.ops.internlm_kernels.linear_cross_entropy_bwd.default,
                          (hidden.detach(), weight.detach(), target, bias.detach(), torch.randn(13), -100, 0.1,
                           1e-3, 2.0, True, True, True))
    torch.library.opcheck(torch.ops.internlm_kernels.linear_cross_entropy_scale_.default,
                          (torch.randn(5, 3), torch.tensor(2.0)))


def test_fullgraph_compile_matches_eager():
    hidden, weight, target, _ = make_inputs(26, 16, 45, torch.float32, ignored=(3,))

    def step(h, w, t):
        with ik.use_backend("triton"):
            loss, z_loss = ik.fused_linear_cross_entropy(h, w, t, lse_square_scale=1e-3, return_z_loss=True)
        return loss * 2.0, z_loss

    compiled = torch.compile(step, fullgraph=True)(hidden, weight, target)
    eager = step(hidden, weight, target)
    grads = [torch.autograd.grad(out[0], (hidden, weight)) for out in (compiled, eager)]
    assert_close(compiled[0], eager[0])
    assert_close(compiled[1], eager[1])
    for got, want in zip(*grads):
        assert_close(got, want)


BAD_INPUTS = [
    ("hidden", lambda h, w, t: dict(hidden=h.double())),
    ("hidden", lambda h, w, t: dict(hidden=h[0])),
    ("weight", lambda h, w, t: dict(weight=w.half())),
    ("weight", lambda h, w, t: dict(weight=w[:, :-1])),
    ("weight", lambda h, w, t: dict(weight=w[:0])),
    ("target", lambda h, w, t: dict(target=t.float())),
    ("target", lambda h, w, t: dict(target=t[:-1])),
    ("target", lambda h, w, t: dict(target=torch.where(t == 3, 50, t))),
    ("target", lambda h, w, t: dict(target=torch.where(t == 3, -1, t))),
    ("bias", lambda h, w, t: dict(bias=torch.zeros(49))),
    ("bias", lambda h, w, t: dict(bias=torch.zeros(50, dtype=torch.float16))),
    ("bias", lambda h, w, t: dict(bias=torch.zeros(50, 1))),
    ("reduction", lambda h, w, t: dict(reduction="avg")),
    ("label_smoothing", lambda h, w, t: dict(label_smoothing=1.5)),
    ("lse_square_scale", lambda h, w, t: dict(lse_square_scale=-1e-4)),
    ("softcap", lambda h, w, t: dict(softcap=float("nan"))),
    ("ignore_index", lambda h, w, t: dict(ignore_index=-100.0)),
    ("return_z_loss", lambda h, w, t: dict(return_z_loss=1)),
]


@pytest.mark.parametrize("name,change", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_value_error_naming_it(name, change):
    hidden, weight, target, _ = make_inputs(10, 8, 50, torch.float32, device="cpu")
    target[0] = 3
    kwargs = dict(hidden=hidden, weight=weight, target=target) | change(hidden, weight, target)
    with pytest.raises(ValueError, match=name):
        ik.fused_linear_cross_entropy(**kwargs)


def test_device_mismatch_raises_value_error():
    hidden, weight, target, _ = make_inputs(10, 8, 50, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="target"):
        ik.fused_linear_cross_entropy(hidden, weight, target.to("meta"))


class _OpCalls(TorchDispatchMode):
    """Records the arguments of linear_cross_entropy_fwd calls (the real op still runs)."""

    def __enter__(self):
        self.args = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.internlm_kernels.linear_cross_entropy_fwd.default:
            self.args.append(tuple(args))
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------------
# GPU (compiled Triton, full-size vocab): run by benchmarks/gpu_check.sh
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_vocab_92544_matches_reference(reduction, dtype, monkeypatch):
    # default tiles: 4096-wide vocab blocks with a masked tail (92544 = 22.6 blocks), several chunks of rows.
    # fp32 sums of 92544 terms round at ~sqrt(92544)·6e-8 ≈ 2e-5 relative: compare fp32 to 1e-4 here.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    hidden, weight, target, bias = make_inputs(2000, 256, 92544, dtype, bias=True, ignored=range(100, 700))
    check_against_oracle(hidden, weight, target, bias, reduction, fp32_tol=1e-4, **ALL_FEATURES)


@pytest.mark.gpu
def test_gpu_bf16_error_no_worse_than_eager_bf16():
    # eager bf16 (logits materialized in bf16, as transformers does) is the precision users accept today
    hidden, weight, target, _ = make_inputs(4096, 1024, 92544, torch.bfloat16, scale=3.0)
    loss, _ = triton_loss(hidden, weight, target)
    ours = (loss, *torch.autograd.grad(loss, (hidden, weight)))
    eager_loss = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), target)
    eager = (eager_loss, *torch.autograd.grad(eager_loss, (hidden, weight)))
    ref_loss, _, ref_grads = oracle(hidden, weight, target, None, torch.tensor(1.0, device=DEV))
    ref = (ref_loss, *ref_grads)
    for name, o, e, r in zip(("loss", "dhidden", "dweight"), ours, eager, ref):
        ours_err = (o.double() - r).norm() / r.norm()
        eager_err = (e.double() - r).norm() / r.norm()
        assert ours_err <= 1.5 * eager_err + 1e-6, f"{name}: ours {ours_err:.2e} vs eager bf16 {eager_err:.2e}"


@pytest.mark.gpu
def test_gpu_extra_peak_memory_at_16k_tokens_vocab_92544_under_1_gib():
    torch.use_deterministic_algorithms(False)  # measure without the poison fill
    hidden, weight, target, _ = make_inputs(16384, 4096, 92544, torch.bfloat16, scale=2.0)

    def fwd_bwd():
        loss, _ = triton_loss(hidden, weight, target)
        return torch.autograd.grad(loss, (hidden, weight))

    fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = fwd_bwd()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert all(torch.isfinite(g).all() for g in grads)
    assert extra <= 2**30, f"extra peak {extra / 2**30:.3f} GiB"
