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

The z-loss output is for logging: it carries no gradient (the loss already includes it), on every backend.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import cpu, reference
from .._checks import FLOAT_DTYPES, check_same_dtype, check_tensor
from ..backend import choose
from ..cpu import cross_entropy as cpu_cross_entropy

REDUCTIONS = ("mean", "sum", "none")


def fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0, return_z_loss=False):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``target`` (see ``reference.linear_cross_entropy``).

    hidden (..., H), weight (V, H), target (...) int64/int32 class indices or ``ignore_index``, bias (V,) or None.
    Returns the loss (fp32; a scalar for mean/sum, shaped like ``target`` for none), or (loss, z_loss) with
    ``return_z_loss``; z_loss = λ·lse² reduced the same way, already included in the loss, without gradient.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., hidden_size) with at least 2 dims, got shape {tuple(hidden.shape)}")
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2, device=hidden.device)
    check_same_dtype("weight", weight, "hidden", hidden)
    check_tensor("target", target, dtypes=(torch.int64, torch.int32), device=hidden.device)
    vocab, width = weight.shape
    if vocab == 0:
        raise ValueError("weight has 0 rows: the vocabulary must not be empty")
    if width != hidden.shape[-1]:
        raise ValueError(f"weight is {tuple(weight.shape)} but hidden has {hidden.shape[-1]} features")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target has shape {tuple(target.shape)} but hidden's leading shape is "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, device=hidden.device)
        check_same_dtype("bias", bias, "hidden", hidden)
        if bias.shape[0] != vocab:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {vocab} rows")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _check_scalar("label_smoothing", label_smoothing, 0.0, 1.0)
    _check_scalar("lse_square_scale", lse_square_scale, 0.0, math.inf)
    _check_scalar("softcap", softcap, 0.0, math.inf)
    if not isinstance(return_z_loss, bool):
        raise ValueError(f"return_z_loss must be a bool, got {return_z_loss!r}")
    if not torch.compiler.is_compiling():  # values cannot be read while tracing; the eager call checks them
        _check_target_values(target, ignore_index, vocab)

    hidden2d = hidden.reshape(-1, width)  # (N, H)
    target1d = target.reshape(-1)          # (N,)
    backend = choose("linear_cross_entropy", hidden.device)
    if backend == "cpu" and cpu.runs_here("linear_cross_entropy", hidden.dtype in cpu_cross_entropy.DTYPES,
                                          f"dtype {hidden.dtype}"):
        loss, z_loss = cpu_cross_entropy.linear_cross_entropy(hidden2d, weight, target1d.long(), bias, ignore_index,
                                                              reduction, label_smoothing, lse_square_scale, softcap)
    elif backend != "triton":
        loss, z_loss = reference.linear_cross_entropy(hidden2d, weight, target1d.long(), bias, ignore_index,
                                                      reduction, label_smoothing, lse_square_scale, softcap)
    else:
        # fp16 recomputes in the backward instead: its narrow range needs the upstream grad (a GradScaler's scale)
        # applied before dlogits are rounded to fp16, as in eager fp16, or small probabilities flush to zero.
        ahead = reduction != "none" and torch.is_grad_enabled() and hidden.dtype != torch.float16
        loss, z_loss, _, _, _ = torch.ops.internlm_kernels.linear_cross_entropy_fwd(
            hidden2d, weight, target1d, bias, ignore_index, reduction, float(label_smoothing),
            float(lse_square_scale), float(softcap), ahead and hidden.requires_grad, ahead and weight.requires_grad,
            ahead and bias is not None and bias.requires_grad)
    z_loss = z_loss.detach()
    if reduction == "none":
        loss, z_loss = loss.reshape(target.shape), z_loss.reshape(target.shape)
    return (loss, z_loss) if return_z_loss else loss


def _check_scalar(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def _check_target_values(target: Tensor, ignore_index: int, vocab: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        first = int(target[bad][0])
        raise ValueError(f"target holds class {first}, outside [0, {vocab}) and not ignore_index={ignore_index}")


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# --------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("internlm_kernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int,
                             reduction: str, label_smoothing: float, lse_square_scale: float, softcap: float,
                             dhidden_ahead: bool, dweight_ahead: bool, dbias_ahead: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, z_loss, dhidden, dweight, dbias); a gradient is computed (for an upstream grad of 1) only when its
    ``*_ahead`` flag is set, which reduction none does not allow, else it is an empty tensor."""
    from ..triton import cross_entropy as kernels

    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    ahead = dhidden_ahead or dweight_ahead or dbias_ahead
    if ahead and reduction == "none":
        raise NotImplementedError("reduction='none' cannot compute gradients ahead: the upstream grad is per token")
    n_valid = (target != ignore_index).sum()
    scale = None
    if ahead:
        scale = torch.ones((), device=hidden.device, dtype=torch.float32)
        if reduction == "mean":
            scale = scale / n_valid.clamp(min=1)
    loss, z_loss, dh, dw, db = kernels.linear_cross_entropy_chunked(
        hidden, weight, target, bias, ignore_index, label_smoothing, lse_square_scale, softcap, scale,
        dhidden_ahead, dweight_ahead, dbias_ahead)
    if reduction != "none":
        loss, z_loss = loss.sum(), z_loss.sum()
        if reduction == "mean":
            n = n_valid.clamp(min=1)
            loss, z_loss = loss / n, z_loss / n
    return (loss, z_loss, _empty(hidden) if dh is None else dh, _empty(weight) if dw is None else dw,
            _empty(weight) if db is None else db)


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
      dhidden_ahead, dweight_ahead, dbias_ahead):
    f32 = torch.float32
    loss = hidden.new_empty(hidden.shape[:1] if reduction == "none" else (), dtype=f32)
    return (loss, torch.empty_like(loss), hidden.new_empty(hidden.shape if dhidden_ahead else (0,)),
            weight.new_empty(weight.shape if dweight_ahead else (0,)),
            weight.new_empty(weight.shape[:1] if dbias_ahead else (0,)))


@torch.library.custom_op("internlm_kernels::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, grad_scale: Tensor,
                             ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
                             need_dhidden: bool, need_dweight: bool, need_dbias: bool
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ_t grad_scale_t · loss_t (grad_scale fp32, 0-d or (N,)); empty where not needed."""
    from ..triton import cross_entropy as kernels

    _, _, dh, dw, db = kernels.linear_cross_entropy_chunked(
        hidden, weight, target, bias, ignore_index, label_smoothing, lse_square_scale, softcap, grad_scale,
        need_dhidden, need_dweight, need_dbias)
    return (_empty(hidden) if dh is None else dh, _empty(weight) if dw is None else dw,
            _empty(weight) if db is None else db)


@linear_cross_entropy_bwd.register_fake
def _(hidden, weight, target, bias, grad_scale, ignore_index, label_smoothing, lse_square_scale, softcap,
      need_dhidden, need_dweight, need_dbias):
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
     dhidden_ahead, dweight_ahead, dbias_ahead) = inputs
    _, z_loss, dh, dw, db = output
    ctx.mark_non_differentiable(z_loss, dh, dw, db)
    ctx.options = (ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
    need = ctx.needs_input_grad
    ctx.ahead = reduction != "none" and all(
        ready or not wanted for ready, wanted in ((dhidden_ahead, need[0]), (dweight_ahead, need[1]),
                                                   (dbias_ahead, need[3])))
    if ctx.ahead:
        ctx.save_for_backward(dh, dw, db)  # the inputs themselves are not kept alive
    else:
        ctx.save_for_backward(hidden, weight, target, bias)


def _eager(*tensors: Tensor) -> bool:
    """True when running eagerly on plain tensors (not traced into fake / functional tensors by a compiler)."""
    return not torch.compiler.is_compiling() and all(type(t) is Tensor for t in tensors)


def _backward(ctx, grad_loss, _grad_z_loss, _grad_dh, _grad_dw, _grad_db):
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
        hidden, weight, target, bias = ctx.saved_tensors
        scale = grad_loss
        if reduction == "mean":
            scale = scale / (target != ignore_index).sum().clamp(min=1)
        dh, dw, db = torch.ops.internlm_kernels.linear_cross_entropy_bwd(
            hidden, weight, target, bias, scale, ignore_index, label_smoothing, lse_square_scale, softcap,
            need_dh, need_dw, need_db and bias is not None)
        dh, dw, db = (dh if need_dh else None, dw if need_dw else None,
                      db if need_db and bias is not None else None)
    return dh, dw, None, db, None, None, None, None, None, None, None, None


torch.library.register_autograd("internlm_kernels::linear_cross_entropy_fwd", _backward,
                                setup_context=_setup_context)
