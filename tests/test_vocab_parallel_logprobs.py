"""The vocabulary-parallel fused linear log-probs (internlm_kernels/distributed/vocab_parallel_logprobs.py) on 2 real
gloo ranks against ``reference.linear_logprobs`` of the full head: per-token log-probs and entropy, and the
gradients to the hidden states and the head for arbitrary per-token upstream gradients (through both outputs, and
through the log-probs alone), with the head split unevenly (37 rows: 19 + 18, torch.chunk's split), ignored
targets, a temperature, sequence-parallel (token-sharded) and replicated hidden states, several row chunks; and
the DTensor route of ``ik.fused_linear_logprobs``.

Tolerance: fp32 throughout; the ranks sum the softmax normalizer and the hidden-state gradient over two vocabulary
halves instead of one pass over the vocabulary, a reordering of fp32 sums of ~40 terms of size O(1): relative error
~ 40 x 2^-24 ~ 2.4e-6, so 1e-5 relative (1e-6 absolute for log-probs and entropies that are ~0). A gradient entry
is a sum over the tokens (dW) or the vocabulary (dh) of terms up to the gradient's largest entry that can cancel to
~0, so its absolute error is relative to that scale: 1e-5 x the largest entry of the gradient.
"""
from __future__ import annotations

import pytest
import torch
from distributed_harness import run_ranks

VOCAB, WIDTH, TOKENS, TEMPERATURE = 37, 24, 22, 0.7


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, WIDTH, generator=g)
    weight = torch.randn(VOCAB, WIDTH, generator=g) * 0.5
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    targets[[0, 5, 6, 21]] = -100
    grad_logp = torch.randn(TOKENS, generator=g)
    grad_entropy = torch.randn(TOKENS, generator=g)
    return hidden, weight, targets, grad_logp, grad_entropy


def _reference(entropy_grad: bool):
    from internlm_kernels import reference

    hidden, weight, targets, grad_logp, grad_entropy = _inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logp, entropy = reference.linear_logprobs(hidden, weight, targets, TEMPERATURE)
    loss = (logp * grad_logp).sum() + ((entropy * grad_entropy).sum() if entropy_grad else 0)
    loss.backward()
    return logp.detach(), entropy.detach(), hidden.grad, weight.grad


def _scale(grad: torch.Tensor) -> float:
    """The absolute tolerance of a gradient's entries (module docstring)."""
    return 1e-5 * float(grad.abs().max())


def _on_ranks(rank: int, world: int, sequence_parallel: bool, chunk_rows: int, entropy_grad: bool):
    import torch.distributed as dist

    from internlm_kernels.distributed.vocab_parallel_logprobs import vocab_parallel_logprobs

    hidden, weight, targets, grad_logp, grad_entropy = _inputs()
    bounds = [0, *torch.tensor([len(c) for c in weight.chunk(world)]).cumsum(0).tolist()]
    local_w = weight[bounds[rank]:bounds[rank + 1]].clone().requires_grad_(True)
    rows = TOKENS // world
    local_h = (hidden[rank * rows:(rank + 1) * rows] if sequence_parallel else hidden).clone().requires_grad_(True)
    logp, entropy = vocab_parallel_logprobs(local_h, local_w, targets, dist.group.WORLD, vocab_start=bounds[rank],
                                            temperature=TEMPERATURE, sequence_parallel=sequence_parallel,
                                            chunk_rows=chunk_rows)
    loss = (logp * grad_logp).sum() + ((entropy * grad_entropy).sum() if entropy_grad else 0)
    loss.backward()
    return logp.detach(), entropy.detach(), local_h.grad, local_w.grad, bounds


@pytest.mark.parametrize("sequence_parallel,chunk_rows,entropy_grad",
                         [(True, 4096, True), (False, 5, True), (True, 5, False)])
def test_vocab_parallel_logprobs_equal_the_full_head(sequence_parallel, chunk_rows, entropy_grad):
    want_logp, want_entropy, want_dh, want_dw = _reference(entropy_grad)
    assert want_logp[0] == 0 and bool((want_logp[1:5] < 0).all())        # the inputs do reach both cases
    results = run_ranks(_on_ranks, 2, sequence_parallel, chunk_rows, entropy_grad)
    rows = TOKENS // 2
    for rank, (logp, entropy, dh, dw, bounds) in enumerate(results):
        assert bounds == [0, 19, 37]
        torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(entropy, want_entropy, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dw, want_dw[bounds[rank]:bounds[rank + 1]], rtol=1e-5, atol=_scale(want_dw))
        want = want_dh[rank * rows:(rank + 1) * rows] if sequence_parallel else want_dh
        torch.testing.assert_close(dh, want, rtol=1e-5, atol=_scale(want_dh))
        assert not any(bool(t.isnan().any()) for t in (logp, entropy, dh, dw))


def _dtensor_route(rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import internlm_kernels as ik

    hidden, weight, targets, grad_logp, _ = _inputs()
    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    h_local = hidden.chunk(world)[rank].clone().requires_grad_(True)
    from torch.distributed.tensor import DTensor

    h = DTensor.from_local(h_local, mesh, [Shard(0)], run_check=False)
    logp = ik.fused_linear_logprobs(h, w, targets, TEMPERATURE)
    with pytest.raises(ValueError, match="targets holds class 40"):
        ik.fused_linear_logprobs(h, w, torch.full_like(targets, 40), TEMPERATURE)
    with pytest.raises(ValueError, match="temperature"):
        ik.fused_linear_logprobs(h, w, targets, 0.0)
    with torch.inference_mode():         # PPO's evaluation and experience run without autograd
        logp_inference, entropy = ik.fused_linear_logprobs(h, w, targets, TEMPERATURE, return_entropy=True)
    (logp * grad_logp).sum().backward()
    return type(logp).__name__, logp.detach(), h_local.grad, w.grad.full_tensor(), logp_inference, entropy


def test_fused_linear_logprobs_routes_a_vocabulary_sharded_head():
    """A DTensor head (as models.tensor_parallel lays out the LM head) runs the vocabulary-parallel path and gives
    one process's log-probs and gradients as a plain tensor."""
    want_logp, want_entropy, want_dh, want_dw = _reference(entropy_grad=False)
    for rank, (kind, logp, dh, dw, logp_inference, entropy) in enumerate(run_ranks(_dtensor_route, 2)):
        assert kind == "Tensor"
        torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logp_inference, want_logp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(entropy, want_entropy, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dh, want_dh.chunk(2)[rank], rtol=1e-5, atol=_scale(want_dh))
        torch.testing.assert_close(dw, want_dw, rtol=1e-5, atol=_scale(want_dw))
