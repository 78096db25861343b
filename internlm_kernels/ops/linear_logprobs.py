"""Fused linear log-probabilities: per-token log p(target) and entropy of softmax(hidden @ weight.T / T) without the
(tokens × vocab) logits — the PPO actor's and reference model's forward.

Custom ops (torch.ops.internlm_kernels.*), kernels in triton/linear_logprobs.py:
  linear_logprobs_fwd(hidden, weight, targets, temperature, ignore_index) -> (logprob, entropy, stats)
  linear_logprobs_bwd(hidden, weight, targets, stats, grad_logprob, grad_entropy?, temperature, ignore_index,
                      need_dhidden, need_dweight) -> (dhidden, dweight)
The forward keeps (lse, Σ p z) per token (8 bytes) for the backward, which recomputes the logits chunk by chunk.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from ..backend import choose
from ..checks import reads_values
from .cross_entropy import _is_dtensor, check_linear_head, check_target_values


@torch.library.custom_op("internlm_kernels::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                        ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton import linear_logprobs as kernels

    return kernels.linear_logprobs_fwd(hidden, weight, targets, temperature, ignore_index)


@linear_logprobs_fwd.register_fake
def _(hidden, weight, targets, temperature, ignore_index):
    n = hidden.shape[0]
    f32 = torch.float32
    return hidden.new_empty((n,), dtype=f32), hidden.new_empty((n,), dtype=f32), hidden.new_empty((n, 2), dtype=f32)


@torch.library.custom_op("internlm_kernels::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(hidden: Tensor, weight: Tensor, targets: Tensor, stats: Tensor, grad_logprob: Tensor,
                        grad_entropy: Tensor | None, temperature: float, ignore_index: int, need_dhidden: bool,
                        need_dweight: bool) -> tuple[Tensor, Tensor]:
    """(dhidden, dweight), each an empty tensor when not needed."""
    from ..triton import linear_logprobs as kernels

    dh, dw = kernels.linear_logprobs_bwd(hidden, weight, targets, stats, grad_logprob, grad_entropy, temperature,
                                         ignore_index, need_dhidden, need_dweight)
    return (hidden.new_empty(0) if dh is None else dh, weight.new_empty(0) if dw is None else dw)


@linear_logprobs_bwd.register_fake
def _(hidden, weight, targets, stats, grad_logprob, grad_entropy, temperature, ignore_index, need_dhidden,
      need_dweight):
    return (hidden.new_empty(hidden.shape if need_dhidden else (0,)),
            weight.new_empty(weight.shape if need_dweight else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, ignore_index = inputs
    ctx.save_for_backward(hidden, weight, targets, output[2])
    ctx.options = (temperature, ignore_index)
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # an unused entropy leaves its grad None: the kernel then skips that term


def _backward(ctx, grad_logprob, grad_entropy, _grad_stats):
    hidden, weight, targets, stats = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[:2]
    if grad_logprob is None:
        grad_logprob = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    dh, dw = torch.ops.internlm_kernels.linear_logprobs_bwd(
        hidden, weight, targets, stats, grad_logprob.float().contiguous(),
        None if grad_entropy is None else grad_entropy.float().contiguous(), *ctx.options, need_dh, need_dw)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=-100):
    """Log-probability of ``targets`` under softmax(hidden @ weight.T / temperature), and with ``return_entropy``
    the entropy of that distribution, per token, without materializing the logits (see
    ``reference.linear_logprobs``). hidden (..., H), weight (V, H) of hidden's dtype, targets (...) int64/int32.
    Returns float32 tensors shaped like ``targets`` (0 where the target is ``ignore_index``); gradients flow to
    hidden and weight through both outputs.
    A DTensor ``weight`` sharded on the vocabulary (tensor parallelism) runs the vocabulary-parallel log-probs of
    internlm_kernels/distributed/vocab_parallel_logprobs.py (hidden a (tokens, H) DTensor on its mesh; the result a
    plain tensor, the same on every rank).
    """
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature <= 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy must be a bool, got {return_entropy!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if _is_dtensor(weight):
        from ..distributed.vocab_parallel_logprobs import dtensor_logprobs

        if reads_values(targets):
            check_target_values(targets, ignore_index, weight.shape[0], "targets")
        logp, entropy = dtensor_logprobs(hidden, weight, targets, temperature, ignore_index)
        logp, entropy = logp.reshape(targets.shape), entropy.reshape(targets.shape)
        return (logp, entropy) if return_entropy else logp
    vocab, width = check_linear_head(hidden, weight, targets, "targets")
    if reads_values(targets):  # CPU, or CUDA under the debug switch (reading device values syncs): checks.py
        check_target_values(targets, ignore_index, vocab, "targets")
    hidden2d, targets1d = hidden.reshape(-1, width), targets.reshape(-1)
    if choose("linear_logprobs", hidden.device) == "reference":
        logp, entropy = reference.linear_logprobs(hidden2d, weight, targets1d, float(temperature), ignore_index)
    else:
        logp, entropy, _ = torch.ops.internlm_kernels.linear_logprobs_fwd(
            hidden2d.contiguous(), weight.contiguous(), targets1d.contiguous(), float(temperature), ignore_index)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp
