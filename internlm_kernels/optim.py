"""FusedAdamW and fused gradient-norm clipping (drop-in for torch.optim.AdamW and clip_grad_norm_)."""
from __future__ import annotations

import torch

from . import reference
from .backend import choose


class FusedAdamW(torch.optim.Optimizer):
    """AdamW with torch.optim.AdamW's defaults, state layout and step semantics.

    ``master_weights=True`` keeps a float32 copy of each bf16/fp16 parameter (state ``master_param``) and
    float32 moments; the step updates the master copy and writes the rounded value into the parameter.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, master_weights=False):
        if not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        master_weights=master_weights)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("FusedAdamW does not support sparse gradients")
                state = self.state[p]
                master = group["master_weights"] and p.dtype in (torch.float16, torch.bfloat16)
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    src = p.detach().float() if master else p.detach()
                    if master:
                        state["master_param"] = src.clone()
                    state["exp_avg"] = torch.zeros_like(src, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(src, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(src, memory_format=torch.preserve_format)
                choose("adamw", p.device)
                state["step"] += 1
                target = state["master_param"] if master else p
                reference.adamw_step(target, p.grad.to(target.dtype), state["exp_avg"], state["exp_avg_sq"],
                                     int(state["step"].item()), group["lr"], beta1, beta2, group["eps"],
                                     group["weight_decay"], group["maximize"], state.get("max_exp_avg_sq"))
                if master:
                    p.copy_(target)
        return loss


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None) -> torch.Tensor:
    """Scale gradients so their total norm is at most ``max_norm``; returns the total norm (as torch's)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    choose("grad_norm", grads[0].device)
    norm = reference.total_norm(grads, float(norm_type)).to(grads[0].device)
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                           "so it cannot be clipped. To disable this error and scale the gradients by the non-finite "
                           "norm anyway, set `error_if_nonfinite=False`")
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return norm
