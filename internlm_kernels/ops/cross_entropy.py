"""Fused linear + cross-entropy: the loss of hidden @ weight.T without materializing the logits.

Drop-in for Liger's fused linear cross-entropy. The Triton backend runs ``triton/cross_entropy.py``'s chunked
driver through three custom ops:

  linear_cross_entropy_fwd      loss and z-loss; for reduction mean/sum with gradients wanted it also computes the
                                gradients (unscaled by the upstream grad) in the same pass over the logits, as the
                                logits are only ever held one chunk at a time
  linear_cross_entropy_bwd      recomputes the logits chunk by chunk and returns the gradients for a per-token
                                upstream grad (reduction none, or a mean/sum call whose gradients were not computed
                                ahead)
  linear_cross_entropy_scale_   multiplies a precomputed gradient in place by the upstream grad, read on the device
                                (skipped when it is 1: no host sync, no copy)

``cross_entropy(logits, target, ...)`` is the same loss over logits that exist anyway (Liger's
LigerCrossEntropyLoss), through ``cross_entropy_fwd`` / ``cross_entropy_bwd`` on the same row kernel; both
functions take per-class weights, return the token accuracy and the predicted tokens on request, and the fused one
accumulates dW in fp32 with ``accum_dtype=torch.float32``. The two share the ``linear_cross_entropy`` backend switch.

The z-loss output is for logging: it carries no gradient (the loss already includes it), on every backend.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import cpu, reference
from ..backend import choose
from ..checks import FLOAT_DTYPES, check_same_dtype, check_tensor, reads_values
from ..cpu import cross_entropy as cpu_cross_entropy
from . import _eager as eager

REDUCTIONS = ("mean", "sum", "none")


def fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0, return_z_loss=False, *,
                               ce_weight=None, return_token_accuracy=False, return_predicted_tokens=False,
                               accum_dtype=None, use_token_scaling=False):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``target`` (see ``reference.linear_cross_entropy``).

    hidden (..., H), weight (V, H), target (...) int64/int32 class indices or ``ignore_index``, bias (V,) or None.
    Returns the loss (fp32 whatever the input dtype, as Liger's fused linear cross-entropy; a scalar for mean/sum,
    shaped like ``target`` for none), or (loss, z_loss) with ``return_z_loss``; z_loss = λ·lse² reduced the same
    way (mean: over the counted tokens, never class-weighted), already included in the loss, without gradient, in
    hidden's dtype (as Liger). ``softcap`` None means 0 (none), as Liger's default.
    ``use_token_scaling`` (Liger's): each token's loss and z-loss are multiplied by its predicted probability of
    the target, p = softmax(logits)[target], taken as a constant.
    A DTensor ``weight`` sharded on the vocabulary (tensor parallelism) runs the vocabulary-parallel loss of
    internlm_kernels/distributed/vocab_parallel_ce.py.
    ``ce_weight`` (V,): per-class weights as torch's cross_entropy ``weight`` (mean divides by the summed weights
    of the counted targets). ``return_token_accuracy`` / ``return_predicted_tokens`` append the fraction of counted
    tokens whose argmax is the target (per token for reduction none) / each token's argmax (int64, -1 where
    ignored): the output is then (loss[, z_loss][, token_accuracy][, predicted_tokens]). ``accum_dtype`` None
    accumulates dW in the weight's dtype, torch.float32 in fp32 (one more V×H fp32 buffer; see
    docs/kernels/cross_entropy.md for the error it removes).
    """
    softcap = 0.0 if softcap is None else softcap
    if _is_dtensor(weight):
        from ..distributed.vocab_parallel_ce import dtensor_cross_entropy

        if use_token_scaling:
            raise NotImplementedError("use_token_scaling with a vocabulary-sharded (DTensor) weight")
        return dtensor_cross_entropy(hidden, weight, target, ignore_index, reduction, bias=bias is not None,
                                     label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                                     softcap=softcap, return_z_loss=return_z_loss)
    vocab, width = check_linear_head(hidden, weight, target, "target")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, device=hidden.device)
        check_same_dtype("bias", bias, "hidden", hidden)
        if bias.shape[0] != vocab:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {vocab} rows")
    _check_loss_options(ignore_index, reduction, label_smoothing, lse_square_scale, softcap, return_z_loss=return_z_loss,
                        return_token_accuracy=return_token_accuracy, return_predicted_tokens=return_predicted_tokens,
                        use_token_scaling=use_token_scaling)
    _check_class_weight("ce_weight", ce_weight, vocab, hidden.device)
    if accum_dtype not in (None, torch.float32, weight.dtype):
        raise NotImplementedError(f"accum_dtype={accum_dtype}: dW accumulates in the weight's dtype (None) or "
                                  "torch.float32")
    if reads_values(target):  # CPU, or CUDA under the debug switch (reading device values syncs): checks.py
        check_target_values(target, ignore_index, vocab)

    hidden2d = hidden.reshape(-1, width)  # (N, H)
    target1d = target.reshape(-1)          # (N,)
    want_argmax = return_token_accuracy or return_predicted_tokens
    backend = choose("linear_cross_entropy", hidden.device)
    predicted = None
    if backend == "cpu" and cpu.runs_here(
            "linear_cross_entropy", hidden.dtype in cpu_cross_entropy.DTYPES and ce_weight is None and not want_argmax
            and cpu.plain(hidden, weight, bias),
            f"dtype {hidden.dtype}, ce_weight, return_token_accuracy, return_predicted_tokens or tensor subclasses"):
        loss, z_loss = cpu_cross_entropy.linear_cross_entropy(hidden2d, weight, target1d.long(), bias, ignore_index,
                                                              reduction, label_smoothing, lse_square_scale, softcap,
                                                              use_token_scaling)
    elif backend != "triton":
        loss, z_loss = reference.linear_cross_entropy(hidden2d, weight, target1d.long(), bias, ignore_index,
                                                      reduction, label_smoothing, lse_square_scale, softcap,
                                                      class_weight=ce_weight, token_scaling=use_token_scaling)
        predicted = None
        if want_argmax:
            with torch.no_grad():
                logits = reference.linear_logits(hidden2d, weight, bias, softcap)
            predicted = reference.predicted_tokens(logits, target1d, ignore_index)
    else:
        # fp16 recomputes in the backward instead: its narrow range needs the upstream grad (a GradScaler's scale)
        # applied before dlogits are rounded to fp16, as in eager fp16, or small probabilities flush to zero.
        ahead = reduction != "none" and torch.is_grad_enabled() and hidden.dtype != torch.float16
        loss, z_loss, _, _, _, predicted = eager.call(linear_cross_entropy_fwd,
            hidden2d, weight, target1d, bias, ignore_index, reduction, float(label_smoothing),
            float(lse_square_scale), float(softcap), ahead and hidden.requires_grad, ahead and weight.requires_grad,
            ahead and bias is not None and bias.requires_grad, ce_weight, want_argmax, accum_dtype == torch.float32,
            use_token_scaling)
    return _outputs(loss, z_loss, predicted, target, ignore_index, reduction, return_z_loss,
                    return_token_accuracy, return_predicted_tokens, torch.float32, hidden.dtype)


def cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  lse_square_scale=0.0, softcap=0.0, return_z_loss=False, return_token_accuracy=False,
                  return_predicted_tokens=False):
    """Cross-entropy of given ``logits`` (..., V) against ``target`` (...): torch's ``cross_entropy`` (class
    indices, ``weight`` (V,) per class, ``ignore_index``, ``reduction``, ``label_smoothing``) plus the options of
    ``fused_linear_cross_entropy``: z-loss λ·lse², a logit softcap c·tanh(z / c), and on request the z-loss, the
    token accuracy and the predicted tokens, returned as (loss[, z_loss][, token_accuracy][, predicted_tokens]).
    The loss and z-loss have the logits' dtype, as torch's cross_entropy and Liger's LigerCrossEntropyLoss return
    them (computed in fp32 and rounded once); the gradient has the logits' dtype. With class weights, mean divides
    the z-loss by the number of counted tokens (Liger's convention). ``softcap`` None means 0. See
    ``reference.cross_entropy``.
    """
    softcap = 0.0 if softcap is None else softcap
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (..., vocab) with a non-empty vocab, got shape {tuple(logits.shape)}")
    check_tensor("target", target, dtypes=(torch.int64, torch.int32), device=logits.device)
    vocab = logits.shape[-1]
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target has shape {tuple(target.shape)} but logits' leading shape is "
                         f"{tuple(logits.shape[:-1])}")
    _check_loss_options(ignore_index, reduction, label_smoothing, lse_square_scale, softcap, return_z_loss=return_z_loss,
                        return_token_accuracy=return_token_accuracy, return_predicted_tokens=return_predicted_tokens)
    _check_class_weight("weight", weight, vocab, logits.device)
    if reads_values(target):  # CPU, or CUDA under the debug switch: checks.py
        check_target_values(target, ignore_index, vocab)

    logits2d = logits.reshape(-1, vocab)
    target1d = target.reshape(-1)
    want_argmax = return_token_accuracy or return_predicted_tokens
    if choose("linear_cross_entropy", logits.device) == "reference":
        loss, z_loss = reference.cross_entropy(logits2d, target1d.long(), weight, ignore_index, reduction,
                                               label_smoothing, lse_square_scale, softcap)
        predicted = None
        if want_argmax:
            capped = logits2d.detach().float()
            if softcap > 0:
                capped = softcap * torch.tanh(capped / softcap)
            predicted = reference.predicted_tokens(capped, target1d, ignore_index)
    else:
        ahead = (reduction != "none" and torch.is_grad_enabled() and logits.requires_grad
                 and logits.dtype != torch.float16)
        loss, z_loss, _, predicted = torch.ops.internlm_kernels.cross_entropy_fwd(
            logits2d, target1d, weight, ignore_index, reduction, float(label_smoothing), float(lse_square_scale),
            float(softcap), ahead, want_argmax)
    return _outputs(loss, z_loss, predicted, target, ignore_index, reduction, return_z_loss,
                    return_token_accuracy, return_predicted_tokens, logits.dtype, logits.dtype)


def _outputs(loss, z_loss, predicted, target, ignore_index, reduction, return_z_loss, return_token_accuracy,
             return_predicted_tokens, loss_dtype, z_loss_dtype):
    """(loss[, z_loss][, token_accuracy][, predicted_tokens]) shaped like the target for reduction none, the loss
    and z-loss (computed in fp32 or fp64) rounded once to ``loss_dtype`` / ``z_loss_dtype`` (no-ops when they are
    already in it)."""
    if loss_dtype != torch.float64:
        loss = loss.to(loss_dtype)
    z_loss = z_loss.detach()
    if z_loss_dtype != torch.float64:
        z_loss = z_loss.to(z_loss_dtype)
    if reduction == "none":
        loss, z_loss = loss.reshape(target.shape), z_loss.reshape(target.shape)
    out = [loss]
    if return_z_loss:
        out.append(z_loss)
    if return_token_accuracy:
        valid = target.reshape(-1) != ignore_index
        correct = ((predicted == target.reshape(-1)) & valid).float()
        if reduction == "none":
            out.append(correct.reshape(target.shape))
        else:
            out.append(correct.sum() / valid.sum().clamp(min=1))
    if return_predicted_tokens:
        out.append(predicted.reshape(target.shape))
    return out[0] if len(out) == 1 else tuple(out)


def _check_class_weight(name: str, class_weight, vocab: int, device) -> None:
    if class_weight is None:
        return
    check_tensor(name, class_weight, dtypes=FLOAT_DTYPES, ndim=1, device=device)
    if class_weight.shape[0] != vocab:
        raise ValueError(f"{name} has {class_weight.shape[0]} entries but the vocabulary has {vocab} classes")
    if class_weight.requires_grad:
        raise NotImplementedError(f"{name} requires grad: per-class weights are constants here")


def _mean_denominators(target: Tensor, ignore_index: int, class_weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """What reduction mean divides by: (for the cross-entropy part, for the z-loss part). The z-loss is divided by
    the number of counted tokens (Liger's convention: it is not class-weighted); the cross-entropy by that number
    too, or by the sum of the counted targets' class weights (as torch's weighted cross_entropy). A denominator of
    0 is taken as 1, so an all-ignored batch has loss 0. Without class weights both are the same tensor."""
    valid = target != ignore_index
    count = valid.sum().clamp(min=1)
    if class_weight is None:
        return count, count
    total = (class_weight.float()[torch.where(valid, target, 0)] * valid).sum()
    return torch.where(total > 0, total, torch.ones_like(total)), count


def _z_ratio(reduction: str, denominators: tuple[Tensor, Tensor]) -> Tensor | None:
    """ρ, the z-loss term's gradient scale relative to the cross-entropy term's (0-d fp32): the cross-entropy
    denominator over the z-loss one for mean with class weights; None (ρ = 1) otherwise."""
    ce_den, z_den = denominators
    if reduction != "mean" or ce_den is z_den:
        return None
    return (ce_den / z_den).to(torch.float32)


def _ahead_scale(ahead: bool, reduction: str, denominator: Tensor, device) -> Tensor | None:
    """The upstream gradient the kernels fold in when they compute gradients ahead (in the forward): 1 for
    reduction sum, 1 / denominator (the cross-entropy part's) for mean; None when they compute none."""
    if not ahead:
        return None
    scale = torch.ones((), device=device, dtype=torch.float32)
    return scale / denominator if reduction == "mean" else scale


def _is_dtensor(t) -> bool:
    if type(t) is Tensor or not torch.distributed.is_available():   # the common case costs one type check
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_linear_head(hidden: Tensor, weight: Tensor, target: Tensor, target_name: str) -> tuple[int, int]:
    """hidden (..., H) and weight (V, H) of one float dtype, class indices shaped like hidden's leading dims;
    returns (V, H). Shared by the fused linear cross-entropy and the fused linear log-probs."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., hidden_size) with at least 2 dims, got shape {tuple(hidden.shape)}")
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2, device=hidden.device)
    check_same_dtype("weight", weight, "hidden", hidden)
    check_tensor(target_name, target, dtypes=(torch.int64, torch.int32), device=hidden.device)
    vocab, width = weight.shape
    if vocab == 0:
        raise ValueError("weight has 0 rows: the vocabulary must not be empty")
    if width != hidden.shape[-1]:
        raise ValueError(f"weight is {tuple(weight.shape)} but hidden has {hidden.shape[-1]} features")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"{target_name} has shape {tuple(target.shape)} but hidden's leading shape is "
                         f"{tuple(hidden.shape[:-1])}")
    return vocab, width


def _check_loss_options(ignore_index, reduction, label_smoothing, lse_square_scale, softcap, **flags) -> None:
    """The options cross_entropy and fused_linear_cross_entropy share; ``flags`` are the boolean switches."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _check_scalar("label_smoothing", label_smoothing, 0.0, 1.0)
    _check_scalar("lse_square_scale", lse_square_scale, 0.0, math.inf)
    _check_scalar("softcap", softcap, 0.0, math.inf)
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be a bool, got {value!r}")


def _check_scalar(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def check_target_values(target: Tensor, ignore_index: int, vocab: int, name: str = "target") -> None:
    """Every target is a class in [0, vocab) or ``ignore_index``: reads the values, so callers run it only where
    checks.reads_values allows (CPU, or CUDA under the debug switch)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        first = int(target[bad][0])
        raise ValueError(f"{name} holds class {first}, outside [0, {vocab}) and not ignore_index={ignore_index}")


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# --------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("internlm_kernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int,
                             reduction: str, label_smoothing: float, lse_square_scale: float, softcap: float,
                             dhidden_ahead: bool, dweight_ahead: bool, dbias_ahead: bool,
                             class_weight: Tensor | None = None, want_argmax: bool = False, accum_fp32: bool = False,
                             token_scaling: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, z_loss, dhidden, dweight, dbias, predicted); a gradient is computed (for an upstream grad of 1) only
    when its ``*_ahead`` flag is set, which reduction none does not allow, else it is an empty tensor; predicted
    (N,) int64 argmax per token when ``want_argmax``, else empty."""
    from ..triton import cross_entropy as kernels

    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    ahead = dhidden_ahead or dweight_ahead or dbias_ahead
    if ahead and reduction == "none":
        raise NotImplementedError("reduction='none' cannot compute gradients ahead: the upstream grad is per token")
    denominators = _mean_denominators(target, ignore_index, class_weight)
    scale = _ahead_scale(ahead, reduction, denominators[0], hidden.device)
    loss, z_loss, dh, dw, db, predicted = kernels.linear_cross_entropy_chunked(
        hidden, weight, target, bias, ignore_index, label_smoothing, lse_square_scale, softcap, scale,
        dhidden_ahead, dweight_ahead, dbias_ahead, class_weight, want_argmax, accum_fp32,
        _z_ratio(reduction, denominators), token_scaling)
    loss, z_loss = _reduce(loss, z_loss, reduction, denominators)
    return (loss, z_loss, _empty(hidden) if dh is None else dh, _empty(weight) if dw is None else dw,
            _empty(weight) if db is None else db, _predicted(predicted, target))


def _reduce(loss: Tensor, z_loss: Tensor, reduction: str, denominators: tuple[Tensor, Tensor]
            ) -> tuple[Tensor, Tensor]:
    """Per-token (loss, z_loss) reduced; the loss includes the z-loss, which mean divides by its own denominator."""
    if reduction == "none":
        return loss, z_loss
    loss, z_loss = loss.sum(), z_loss.sum()
    if reduction == "mean":
        ce_den, z_den = denominators
        if ce_den is z_den:
            loss, z_loss = loss / ce_den, z_loss / z_den
        else:
            loss, z_loss = (loss - z_loss) / ce_den + z_loss / z_den, z_loss / z_den
    return loss, z_loss


def _predicted(predicted: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.int64) if predicted is None else predicted


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
      dhidden_ahead, dweight_ahead, dbias_ahead, class_weight=None, want_argmax=False, accum_fp32=False,
      token_scaling=False):
    f32 = torch.float32
    loss = hidden.new_empty(hidden.shape[:1] if reduction == "none" else (), dtype=f32)
    return (loss, torch.empty_like(loss), hidden.new_empty(hidden.shape if dhidden_ahead else (0,)),
            weight.new_empty(weight.shape if dweight_ahead else (0,)),
            weight.new_empty(weight.shape[:1] if dbias_ahead else (0,)),
            target.new_empty(target.shape if want_argmax else (0,), dtype=torch.int64))


@torch.library.custom_op("internlm_kernels::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, grad_scale: Tensor,
                             ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
                             need_dhidden: bool, need_dweight: bool, need_dbias: bool,
                             class_weight: Tensor | None = None, accum_fp32: bool = False,
                             z_ratio: Tensor | None = None, token_scaling: bool = False
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ_t grad_scale_t · loss_t (grad_scale fp32, 0-d or (N,); the z-loss term's scaled by z_ratio
    too when given); empty where not needed."""
    from ..triton import cross_entropy as kernels

    _, _, dh, dw, db, _ = kernels.linear_cross_entropy_chunked(
        hidden, weight, target, bias, ignore_index, label_smoothing, lse_square_scale, softcap, grad_scale,
        need_dhidden, need_dweight, need_dbias, class_weight, False, accum_fp32, z_ratio, token_scaling)
    return (_empty(hidden) if dh is None else dh, _empty(weight) if dw is None else dw,
            _empty(weight) if db is None else db)


@linear_cross_entropy_bwd.register_fake
def _(hidden, weight, target, bias, grad_scale, ignore_index, label_smoothing, lse_square_scale, softcap,
      need_dhidden, need_dweight, need_dbias, class_weight=None, accum_fp32=False, z_ratio=None,
      token_scaling=False):
    return (hidden.new_empty(hidden.shape if need_dhidden else (0,)),
            weight.new_empty(weight.shape if need_dweight else (0,)),
            weight.new_empty(weight.shape[:1] if need_dbias else (0,)))


@torch.library.custom_op("internlm_kernels::linear_cross_entropy_scale_", mutates_args=("grad",))
def linear_cross_entropy_scale_(grad: Tensor, factor: Tensor) -> None:
    """grad *= factor in place (factor 0-d, read on the device; nothing is touched when it is 1)."""
    from ..triton import cross_entropy as kernels

    kernels.scale_unless_one_(grad, factor.to(torch.float32))


@linear_cross_entropy_scale_.register_fake
def _(grad, factor):
    return None


# --------------------------------------------------------------------------------------------------
# Autograd of linear_cross_entropy_fwd
# --------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    (hidden, weight, target, bias, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
     dhidden_ahead, dweight_ahead, dbias_ahead, class_weight, _want_argmax, accum_fp32, token_scaling) = inputs
    _, z_loss, dh, dw, db, predicted = output
    ctx.mark_non_differentiable(z_loss, dh, dw, db, predicted)
    ctx.options = (ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
    ctx.accum_fp32, ctx.token_scaling = accum_fp32, token_scaling
    need = ctx.needs_input_grad
    ctx.ahead = reduction != "none" and all(
        ready or not wanted for ready, wanted in ((dhidden_ahead, need[0]), (dweight_ahead, need[1]),
                                                   (dbias_ahead, need[3])))
    if ctx.ahead:
        ctx.save_for_backward(dh, dw, db)  # the inputs themselves are not kept alive
    else:
        ctx.save_for_backward(hidden, weight, target, bias, class_weight)


def _eager(*tensors: Tensor) -> bool:
    """True when running eagerly on plain tensors (not traced into fake / functional tensors by a compiler)."""
    return not torch.compiler.is_compiling() and all(type(t) is Tensor for t in tensors)


def _backward(ctx, grad_loss, _grad_z_loss, _grad_dh, _grad_dw, _grad_db, _grad_predicted):
    need_dh, need_dw, _, need_db = ctx.needs_input_grad[:4]
    ignore_index, reduction, label_smoothing, lse_square_scale, softcap = ctx.options
    grad_loss = grad_loss.to(torch.float32)
    if ctx.ahead:
        grads = []
        for grad, wanted in zip(ctx.saved_tensors, (need_dh, need_dw, need_db)):
            if not wanted:
                grads.append(None)
            elif not _eager(grad, grad_loss):
                # A traced backward (torch.compile, aot_autograd) must not mutate the forward outputs it saved.
                grads.append(grad * grad_loss)
            else:
                torch.ops.internlm_kernels.linear_cross_entropy_scale_(grad, grad_loss)
                grads.append(grad)
        dh, dw, db = grads
    else:
        hidden, weight, target, bias, class_weight = ctx.saved_tensors
        scale, z_ratio = _backward_scale(grad_loss, reduction, target, ignore_index, class_weight)
        dh, dw, db = eager.call(linear_cross_entropy_bwd,
            hidden, weight, target, bias, scale, ignore_index, label_smoothing, lse_square_scale, softcap,
            need_dh, need_dw, need_db and bias is not None, class_weight, ctx.accum_fp32, z_ratio,
            ctx.token_scaling)
        dh, dw, db = (dh if need_dh else None, dw if need_dw else None,
                      db if need_db and bias is not None else None)
    return (dh, dw, None, db) + (None,) * 12


def _backward_scale(grad_loss: Tensor, reduction: str, target: Tensor, ignore_index: int,
                    class_weight: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(per-token or 0-d gradient scale, z-loss ratio ρ) of a backward that recomputes the logits."""
    if reduction != "mean":
        return grad_loss, None
    denominators = _mean_denominators(target, ignore_index, class_weight)
    return grad_loss / denominators[0], _z_ratio(reduction, denominators)


torch.library.register_autograd("internlm_kernels::linear_cross_entropy_fwd", _backward,
                                setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Cross-entropy over given logits
# --------------------------------------------------------------------------------------------------
def _logits_rows(logits: Tensor, target: Tensor, class_weight: Tensor | None, ignore_index: int,
                 label_smoothing: float, lse_square_scale: float, softcap: float, grad_scale: Tensor | None,
                 want_argmax: bool, z_ratio: Tensor | None = None):
    """Run the row kernel over (N, V) logits: (loss, z_loss, dlogits | None, argmax | None). The kernel writes the
    gradient over its input, so that input is a copy of the logits (which stay untouched)."""
    from ..triton import cross_entropy as kernels

    N = logits.shape[0]
    rows = logits.clone(memory_format=torch.contiguous_format) if grad_scale is not None else logits.contiguous()
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    z_loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    argmax = torch.empty(N, device=logits.device, dtype=torch.int64) if want_argmax else None
    weight_sum = None
    if class_weight is not None:
        class_weight = class_weight.contiguous()
        weight_sum = class_weight.sum(dtype=torch.float32)
    kernels.cross_entropy_rows(rows, target, loss, z_loss, grad_scale, ignore_index, label_smoothing,
                               lse_square_scale, softcap, class_weight, weight_sum, argmax, z_ratio)
    return loss, z_loss, rows if grad_scale is not None else None, argmax


@torch.library.custom_op("internlm_kernels::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: Tensor, target: Tensor, class_weight: Tensor | None, ignore_index: int, reduction: str,
                      label_smoothing: float, lse_square_scale: float, softcap: float, grad_ahead: bool,
                      want_argmax: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, z_loss, dlogits, predicted) of logits (N, V); dlogits (for an upstream grad of 1) only with
    ``grad_ahead`` (reduction mean/sum), predicted (N,) int64 only with ``want_argmax``, else empty."""
    if grad_ahead and reduction == "none":
        raise NotImplementedError("reduction='none' cannot compute gradients ahead: the upstream grad is per token")
    denominators = _mean_denominators(target, ignore_index, class_weight)
    scale = _ahead_scale(grad_ahead, reduction, denominators[0], logits.device)
    loss, z_loss, dlogits, predicted = _logits_rows(logits, target, class_weight, ignore_index, label_smoothing,
                                                    lse_square_scale, softcap, scale, want_argmax,
                                                    _z_ratio(reduction, denominators))
    loss, z_loss = _reduce(loss, z_loss, reduction, denominators)
    return loss, z_loss, _empty(logits) if dlogits is None else dlogits, _predicted(predicted, target)


@cross_entropy_fwd.register_fake
def _(logits, target, class_weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, grad_ahead,
      want_argmax):
    loss = logits.new_empty(logits.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    return (loss, torch.empty_like(loss),
            logits.new_empty(logits.shape if grad_ahead else (0,)),
            target.new_empty(target.shape if want_argmax else (0,), dtype=torch.int64))


@torch.library.custom_op("internlm_kernels::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(logits: Tensor, target: Tensor, class_weight: Tensor | None, grad_scale: Tensor,
                      ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
                      z_ratio: Tensor | None = None) -> Tensor:
    """dlogits of Σ_t grad_scale_t · loss_t (grad_scale fp32, 0-d or (N,); the z-loss term's scaled by z_ratio
    too when given)."""
    return _logits_rows(logits, target, class_weight, ignore_index, label_smoothing, lse_square_scale, softcap,
                        grad_scale.to(torch.float32), False, z_ratio)[2]


@cross_entropy_bwd.register_fake
def _(logits, target, class_weight, grad_scale, ignore_index, label_smoothing, lse_square_scale, softcap,
      z_ratio=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_logits(ctx, inputs, output):
    (logits, target, class_weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, grad_ahead,
     _want_argmax) = inputs
    _, z_loss, dlogits, predicted = output
    ctx.mark_non_differentiable(z_loss, dlogits, predicted)
    ctx.options = (ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
    ctx.ahead = grad_ahead
    ctx.save_for_backward(dlogits) if grad_ahead else ctx.save_for_backward(logits, target, class_weight)


def _backward_logits(ctx, grad_loss, _grad_z_loss, _grad_dlogits, _grad_predicted):
    if not ctx.needs_input_grad[0]:
        return (None,) * 10
    ignore_index, reduction, label_smoothing, lse_square_scale, softcap = ctx.options
    grad_loss = grad_loss.to(torch.float32)
    if ctx.ahead:
        (dlogits,) = ctx.saved_tensors
        if not _eager(dlogits, grad_loss):
            dlogits = dlogits * grad_loss  # a traced backward must not mutate a saved forward output
        else:
            torch.ops.internlm_kernels.linear_cross_entropy_scale_(dlogits, grad_loss)
    else:
        logits, target, class_weight = ctx.saved_tensors
        scale, z_ratio = _backward_scale(grad_loss, reduction, target, ignore_index, class_weight)
        dlogits = torch.ops.internlm_kernels.cross_entropy_bwd(logits, target, class_weight, scale, ignore_index,
                                                               label_smoothing, lse_square_scale, softcap, z_ratio)
    return (dlogits,) + (None,) * 9


torch.library.register_autograd("internlm_kernels::cross_entropy_fwd", _backward_logits,
                                setup_context=_setup_logits)
