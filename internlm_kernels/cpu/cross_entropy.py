"""Fused linear + cross-entropy on CPU: oneDNN matmuls, the softmax gradient computed in the forward.

Same math as internlm_kernels/triton/cross_entropy.py (see its docstring): for logits z = x Wᵀ (+ b) (softcapped:
c·tanh(z_raw / c)), lse = log Σ exp z, p = softmax z,
    loss_t = (1 - ε)(lse_t - z_ty) + ε (lse_t - mean_v z_tv) + λ lse_t²          (0 where y_t = ignore_index)
    dloss_t/dz_tv = p_tv (1 + 2λ lse_t) - ε / V - (1 - ε)·[v = y_t]
With token scaling (Liger's ``use_token_scaling``) loss_t, its z-loss and its gradient are multiplied by
p_ty = exp(z_ty - lse_t), taken as a constant.
Rows are processed in chunks of at most ``LOGITS_CHUNK_ELEMENTS`` logits. For reduction mean/sum the gradients
(for an upstream grad of 1) are computed chunk by chunk in the forward, while each chunk's logits exist, and the
backward only scales them; reduction none keeps the inputs and recomputes per chunk with the per-token upstream
grad. The matmuls go through oneDNN (internlm_kernels/cpu/linear.py). float32 tensors (``DTYPES``).
"""
from __future__ import annotations

import torch

from .linear import inner_product, weight_grad

DTYPES = (torch.float32,)
# 16 MiB of float32 logits per chunk: one chunk for the demo (2048 tokens × 272), ~45 rows at vocab 92544.
LOGITS_CHUNK_ELEMENTS = 1 << 22


def _chunks(hidden, weight, bias, target, options, grad_scale, need):
    """Loss and z-loss per token; gradients (dh, dW, db) of Σ_t grad_scale_t · loss_t for those in ``need``."""
    ignore_index, eps, lam, softcap, token_scaling = options
    N, V = hidden.shape[0], weight.shape[0]
    loss = hidden.new_empty(N)
    z_loss = hidden.new_empty(N)
    dh = hidden.new_empty(hidden.shape) if need[0] else None
    dw = torch.zeros_like(weight) if need[1] else None
    db = torch.zeros_like(bias) if need[2] else None
    rows = max(1, LOGITS_CHUNK_ELEMENTS // V)
    for start in range(0, N, rows):
        stop = min(start + rows, N)
        h, t = hidden[start:stop], target[start:stop]
        z = inner_product(h, weight, bias)                                      # (rows, V) fp32
        if softcap > 0:
            z = z.div_(softcap).tanh_()                                         # tanh(z_raw / c), kept for dz_raw
            capped = z * softcap
        else:
            capped = z
        lse = torch.logsumexp(capped, dim=-1)
        valid = t != ignore_index
        safe = torch.where(valid, t, 0)[:, None]
        z_target = capped.gather(1, safe).squeeze(1)
        row_loss = (1.0 - eps) * (lse - z_target)
        if eps > 0:
            row_loss += eps * (lse - capped.mean(dim=-1))
        row_z = lam * lse.square() if lam > 0 else torch.zeros_like(lse)
        validf = valid.to(z.dtype)
        if token_scaling:
            validf = validf * torch.exp(z_target - lse)   # p_ty as a per-row factor on loss, z-loss and gradient
        torch.mul(row_loss + row_z, validf, out=loss[start:stop])
        torch.mul(row_z, validf, out=z_loss[start:stop])
        if not any(need):
            continue
        dz = capped.sub_(lse[:, None]).exp_()                                  # p, in the logits' buffer
        if lam > 0:
            dz.mul_((1.0 + 2.0 * lam * lse)[:, None])
        if eps > 0:
            dz.sub_(eps / V)
        dz.scatter_add_(1, safe, torch.full_like(safe, eps - 1.0, dtype=dz.dtype))
        scale = validf * (grad_scale if grad_scale.dim() == 0 else grad_scale[start:stop])
        dz.mul_(scale[:, None])
        if softcap > 0:
            dz.mul_(1.0 - z.square())                                           # dz_raw = dz · (1 - tanh²)
        if need[0]:
            dh[start:stop] = inner_product(dz, weight.t())
        if need[1]:
            dw += weight_grad(dz, h)
        if need[2]:
            db += dz.sum(0)
    return loss, z_loss, (dh, dw, db)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, reduction, label_smoothing, lse_square_scale,
                softcap, token_scaling=False):
        options = (ignore_index, label_smoothing, lse_square_scale, softcap, token_scaling)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        ctx.ahead = reduction != "none"
        n_valid = (target != ignore_index).sum().clamp(min=1).to(hidden.dtype)
        scale = (1.0 / n_valid) if reduction == "mean" else torch.ones((), dtype=hidden.dtype)
        loss, z_loss, grads = _chunks(hidden, weight, bias, target, options, scale,
                                      need if ctx.ahead else (False, False, False))
        if ctx.ahead:
            ctx.save_for_backward(*grads)
            loss, z_loss = loss.sum(), z_loss.sum()
            if reduction == "mean":
                loss, z_loss = loss / n_valid, z_loss / n_valid
        else:
            ctx.save_for_backward(hidden, weight, target, bias)
            ctx.options, ctx.need = options, need
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    def backward(ctx, dloss, _dz_loss):
        if ctx.ahead:
            grads = [None if g is None else g * dloss for g in ctx.saved_tensors]
        else:
            hidden, weight, target, bias = ctx.saved_tensors
            _, _, grads = _chunks(hidden, weight, bias, target, ctx.options, dloss, ctx.need)
        dh, dw, db = grads
        return dh, dw, None, db, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, lse_square_scale,
                         softcap, token_scaling=False):
    """(loss, z_loss) as reference.linear_cross_entropy; hidden (N, H), target (N,)."""
    return LinearCrossEntropyFunction.apply(hidden, weight, target, bias, ignore_index, reduction,
                                            float(label_smoothing), float(lse_square_scale), float(softcap),
                                            bool(token_scaling))
