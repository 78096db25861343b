"""One AdamW step and one gradient clipping, ours beside torch's in the same run.

Shapes: GPU, 1e9 fp32 parameters in 64 tensors (the anchor: torch fused 8.07 ms = 3471 GB/s on an H200,
../shared/anchors/README.md); CPU, 16M fp32 parameters in 64 tensors.
AdamW GB/s counts 28 bytes per parameter: param, grad, exp_avg, exp_avg_sq read (16), param, exp_avg,
exp_avg_sq written (12). Peers: torch.optim.AdamW with foreach=True and with fused=True.
Clipping GB/s counts 12 bytes per gradient element: read for the norm, read and written by the scaling (max_norm
is small enough that every call scales). Peer: torch.nn.utils.clip_grad_norm_ (foreach).
"""
from __future__ import annotations

import pytest
import torch

import internlm_kernels as ik
from benchmarks.common import OURS, device, record

N_PARAMS = 10**9 if torch.cuda.is_available() else 16 * 2**20
N_TENSORS = 64
LABEL = f"{N_PARAMS / 1e9:g}e9" if N_PARAMS >= 10**9 else f"{N_PARAMS / 2**20:g}M"
HYPER = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)


@pytest.fixture(scope="module")
def params():
    ps = [torch.randn(N_PARAMS // N_TENSORS, device=device()) for _ in range(N_TENSORS)]
    for p in ps:
        p.grad = torch.randn_like(p)
    yield ps
    ps.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _optimizer(impl, ps):
    if impl == OURS:
        return ik.FusedAdamW(ps, **HYPER)
    return torch.optim.AdamW(ps, **HYPER, **{impl.removeprefix("torch-"): True})


@pytest.mark.parametrize("impl", [OURS, "torch-foreach", "torch-fused"])
def test_adamw_step(benchmark, impl, params):
    opt = _optimizer(impl, params)
    opt.step()  # allocates the state outside the timing
    record(benchmark, opt.step, group=f"adamw step {LABEL} fp32 x{N_TENSORS}", impl=impl, metric="GB/s",
           work=28 * N_PARAMS)
    del opt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.mark.parametrize("impl", [OURS, "torch"])
def test_clip_grad_norm(benchmark, impl, params):
    clip = ik.clip_grad_norm_ if impl == OURS else torch.nn.utils.clip_grad_norm_
    record(benchmark, lambda: clip(params, 1.0), group=f"clip_grad_norm_ {LABEL} fp32 x{N_TENSORS}", impl=impl,
           metric="GB/s", work=12 * N_PARAMS)
