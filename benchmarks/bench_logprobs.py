"""Per-token log-probs (+ entropy) of hidden @ weight.T, 16384 tokens × 4096 → vocab 92544 (bf16), forward +
backward: ik.fused_linear_logprobs beside eager torch (logits materialized, log_softmax + gather + entropy, as RLHF
frameworks compute them) and our fused linear cross-entropy (the goal: time within +10% of it, extra memory
<= 1 GiB; eager needs ~17 GiB). Figure: TFLOP/s of the matmuls each does (ours: 4·2·N·H·V — the backward recomputes
the logits; eager and the fused cross-entropy: 3·2·N·H·V) reported against the same 6·N·H·V so the times compare;
extra peak memory on GPU. On CPU only eager runs, at a tiny shape.
"""
from __future__ import annotations

import pytest
import torch
from bench_cross_entropy import extra_peak_gib
from common import OURS, device, record

import internlm_kernels as ik

ON_GPU = torch.cuda.is_available()
N, H, V, DTYPE = (16384, 4096, 92544, torch.bfloat16) if ON_GPU else (64, 32, 500, torch.float32)
IMPLS = [OURS, "eager", "ours-fused-linear-cross-entropy"]


def _eager(x, w, y):
    logp = torch.log_softmax((x @ w.t()).float(), dim=-1)
    token = logp.gather(-1, y[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token, entropy


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_fwd_bwd(benchmark, impl):
    dev = device()
    if impl != "eager" and not ON_GPU:
        pytest.skip("our Triton kernels time only on CUDA")
    x = torch.randn(N, H, device=dev, dtype=DTYPE, requires_grad=True)
    w = (torch.randn(V, H, device=dev, dtype=DTYPE) * 0.02).requires_grad_()
    y = torch.randint(0, V, (N,), device=dev)

    def step():
        if impl == OURS:
            logp, ent = ik.fused_linear_logprobs(x, w, y, return_entropy=True)
            loss = logp.sum() + 0.01 * ent.sum()
        elif impl == "eager":
            logp, ent = _eager(x, w, y)
            loss = logp.sum() + 0.01 * ent.sum()
        else:
            loss = ik.fused_linear_cross_entropy(x, w, y)
        return torch.autograd.grad(loss, (x, w))

    peak = extra_peak_gib(step)
    record(benchmark, step, group=f"linear logprobs fwd+bwd {N}x{H}->{V} {DTYPE}", impl=impl, metric="TFLOP/s",
           work=6 * N * H * V, unit_scale=1e-12, extra_peak_gib=peak,
           note=f"+{peak:.2f} GiB peak" if peak is not None else "")
    if ON_GPU:
        torch.cuda.empty_cache()
