"""Linear + cross-entropy, 16384 tokens × 4096 → vocab 92544 (bf16): ours against its peers in the same run.

Peers: eager torch (the logits materialized, as transformers computes them), the same under torch.compile, and
Liger's LigerFusedLinearCrossEntropyLoss when installed. Besides the plain loss, the Liger options users switch on
run with the same options on every implementation (fwd + bwd): ``use_token_scaling``, and class weights with a
z-loss (mean: the z-loss over the counted tokens, as Liger). Figures: TFLOP/s of the three matmuls (6·N·H·V for
forward + backward, 2·N·H·V for the loss alone) and, on GPU, the extra peak memory of one call (gradients
included), which is the point of fusing. On CPU only the peers run, at a tiny shape.
"""
from __future__ import annotations

import pytest
import torch
from common import OURS, device, peer_available, record

import internlm_kernels as ik

ON_GPU = torch.cuda.is_available()
N, H, V, DTYPE = (16384, 4096, 92544, torch.bfloat16) if ON_GPU else (64, 32, 500, torch.float32)
SHAPE = f"{N}x{H}->{V} {str(DTYPE).replace('torch.', '')}"
IMPLS = [OURS, "eager", "torch.compile", "liger"]


# Option sets (Liger's keyword names): "ce_weight" is replaced by a class-weight tensor in [0.5, 1.5).
VARIANTS = {
    "token_scaling": dict(use_token_scaling=True),
    "ce_weight+z_loss": dict(ce_weight=True, lse_square_scale=1e-4),
}


def _eager(x, w, y, ce_weight=None, lse_square_scale=0.0, use_token_scaling=False):
    """The same loss with materialized fp32 logits (every target counted: no ignore_index in these inputs)."""
    z = (x @ w.t()).float()
    if ce_weight is None and lse_square_scale == 0.0 and not use_token_scaling:
        return torch.nn.functional.cross_entropy(z, y)
    lse = z.logsumexp(-1)
    ce = torch.nn.functional.cross_entropy(z, y, weight=ce_weight, reduction="none")
    z_loss = lse_square_scale * lse.square()
    if use_token_scaling:
        p = (z.gather(1, y[:, None]).squeeze(1) - lse).exp().detach()
        ce, z_loss = ce * p, z_loss * p
    denominator = ce_weight[y].sum() if ce_weight is not None else y.numel()
    return ce.sum() / denominator + z_loss.sum() / y.numel()


def _options(variant: str | None) -> dict:
    options = dict(VARIANTS[variant]) if variant else {}
    if options.pop("ce_weight", False):
        g = torch.Generator().manual_seed(0)
        options["ce_weight"] = (torch.rand(V, generator=g) + 0.5).to(device())
    return options


def loss_fn(impl: str, variant: str | None = None):
    options = _options(variant)
    if impl == OURS:
        if not ON_GPU:
            pytest.skip("our Triton kernels time only on CUDA (the CPU interpreter is a test harness, not a figure)")

        def ours(x, w, y):
            with ik.use_backend("triton"):
                return ik.fused_linear_cross_entropy(x, w, y, **options)
        return ours
    if impl == "eager":
        return lambda x, w, y: _eager(x, w, y, **options)
    if impl == "torch.compile":
        compiled = torch.compile(_eager)
        return lambda x, w, y: compiled(x, w, y, **options)
    if not (ON_GPU and peer_available("liger_kernel")):
        pytest.skip("Liger is installed only on GPU machines")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    liger = LigerFusedLinearCrossEntropyLoss(**options)
    return lambda x, w, y: liger(w, x, y)


def inputs():
    dev = device()
    x = torch.randn(N, H, device=dev, dtype=DTYPE, requires_grad=True)
    w = (torch.randn(V, H, device=dev, dtype=DTYPE) * 0.02).requires_grad_()
    y = torch.randint(0, V, (N,), device=dev)
    return x, w, y


def extra_peak_gib(fn) -> float | None:
    """Peak memory one call adds above what is allocated before it (its outputs and gradients included)."""
    if not ON_GPU:
        return None
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _run(benchmark, impl: str, group: str, work: float, step):
    peak = extra_peak_gib(step)
    note = f"+{peak:.2f} GiB peak" if peak is not None else ""
    try:
        record(benchmark, step, group=group, impl=impl, metric="TFLOP/s", work=work, unit_scale=1e-12,
               extra_peak_gib=peak, note=note)
    finally:
        if ON_GPU:
            torch.cuda.empty_cache()


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_fwd_bwd(benchmark, impl):
    fn = loss_fn(impl)
    x, w, y = inputs()
    _run(benchmark, impl, f"linear_ce fwd+bwd {SHAPE}", 6 * N * H * V,
         lambda: torch.autograd.grad(fn(x, w, y), (x, w)))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_liger_options_fwd_bwd(benchmark, impl, variant):
    fn = loss_fn(impl, variant)
    x, w, y = inputs()
    _run(benchmark, impl, f"linear_ce {variant} fwd+bwd {SHAPE}", 6 * N * H * V,
         lambda: torch.autograd.grad(fn(x, w, y), (x, w)))


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_loss_only(benchmark, impl):
    fn = loss_fn(impl)
    x, w, y = inputs()

    def loss():
        with torch.no_grad():
            return fn(x, w, y)
    _run(benchmark, impl, f"linear_ce loss only (no grad) {SHAPE}", 2 * N * H * V, loss)
