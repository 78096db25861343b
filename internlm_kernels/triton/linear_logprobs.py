"""Fused linear log-probabilities and entropy: Triton row kernel and the chunked driver (no autograd here).

For hidden x (N, H), weight W (V, H), targets y (N,) and temperature T, the scaled logits of token t are
z_t = (W x_t) / T, lse_t = log Σ_v exp(z_tv), p_tv = exp(z_tv - lse_t), and

    logprob_t = z_ty - lse_t                    d logprob_t / dz_tv = [v = y_t] - p_tv
    entropy_t = lse_t - Σ_v p_tv z_tv           d entropy_t / dz_tv = -p_tv (z_tv - Σ_u p_tu z_tu)

(both 0 for tokens whose target is ignore_index). With upstream grads g (log-probs) and e (entropies) the logits get
dL/d(W x)_tv = (g_t ([v = y_t] - p_tv) - e_t p_tv (z_tv - E_t)) / T, E_t = Σ p z. The (N, V) logits are never stored
whole: as in the fused linear cross-entropy (triton/cross_entropy.py, whose chunk sizing this module shares), tokens
run in chunks whose logits live in one reused buffer. The forward keeps only lse and E per token (2 floats); the
backward recomputes each chunk's logits, overwrites them in place with dL/dlogits and runs the two matmuls
dx = dlogits W, dW += dlogitsᵀ x.

Row kernel, pass 1: online max / Σ exp / Σ exp·z over the vocab in blocks (the Σ exp·z term is rescaled with the sum
when the max moves), giving lse and E = Σ exp(z - m) z / Σ exp(z - m). Pass 2 (backward only) writes the gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cross_entropy import MAX_BLOCK_V, chunk_rows
from .flash_decode import launches_on_input_device


@triton.jit
def _logprob_rows_kernel(
    logits_ptr,         # (rows, V) raw logits W x of this chunk (input dtype); overwritten with dL/dlogits (BACKWARD)
    logits_row_stride,  # elements between rows
    target_ptr,         # (rows,) int32/int64 target, or ignore_index
    logp_ptr,           # (rows,) fp32 out: log-prob of the target (forward)
    entropy_ptr,        # (rows,) fp32 out: entropy (forward)
    stats_ptr,          # (rows, 2) fp32: lse and E = Σ p z of the scaled logits (written forward, read backward)
    grad_logp_ptr,      # (rows,) fp32 upstream grad of the log-probs (BACKWARD)
    grad_ent_ptr,       # (rows,) fp32 upstream grad of the entropies (BACKWARD and HAS_ENTROPY_GRAD)
    V,                  # vocab size
    ignore_index,
    inv_temperature,    # 1 / T
    BLOCK_V: tl.constexpr,
    BACKWARD: tl.constexpr,          # False: pass 1 (log-prob, entropy, stats); True: pass 2 (gradient in place)
    HAS_ENTROPY_GRAD: tl.constexpr,  # the entropy's upstream grad is not known to be zero
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = target != ignore_index
    # Out-of-range targets are rejected by the public function; clamping keeps a bad one from reading out of bounds.
    safe_target = tl.where(valid & (target >= 0) & (target < V), target, 0)
    cols = tl.arange(0, BLOCK_V)
    if not BACKWARD:
        m = tl.full((), -float("inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        sz = tl.zeros((), tl.float32)         # Σ exp(z - m) z
        n_cols = tl.where(valid, V, 0)        # ignored rows skip the vocab
        for start in range(0, n_cols, BLOCK_V):
            mask = start + cols < V
            z = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
            z_m = tl.where(mask, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z_m, 0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z_m - m_new)
            s = s * alpha + tl.sum(e, 0)
            sz = sz * alpha + tl.sum(tl.where(mask, e * z, 0.0), 0)
            m = m_new
        safe_s = tl.where(valid, s, 1.0)
        lse = tl.where(valid, m + tl.log(safe_s), 0.0)
        mean_z = tl.where(valid, sz / safe_s, 0.0)
        z_target = tl.load(row_ptr + safe_target).to(tl.float32) * inv_temperature
        tl.store(logp_ptr + row, tl.where(valid, z_target - lse, 0.0))
        tl.store(entropy_ptr + row, tl.where(valid, lse - mean_z, 0.0))
        tl.store(stats_ptr + 2 * row, lse)
        tl.store(stats_ptr + 2 * row + 1, mean_z)
    else:
        lse = tl.load(stats_ptr + 2 * row)
        mean_z = tl.load(stats_ptr + 2 * row + 1)
        g = tl.load(grad_logp_ptr + row)
        eg = 0.0
        if HAS_ENTROPY_GRAD:
            eg = tl.load(grad_ent_ptr + row)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            z = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
            p = tl.exp(z - lse)
            d = -g * p
            if HAS_ENTROPY_GRAD:
                d -= eg * p * (z - mean_z)
            d = tl.where(start + cols == safe_target, d + g, d)
            d = tl.where(valid, d * inv_temperature, 0.0)  # a select: exp() of an ignored row may be inf
            tl.store(row_ptr + start + cols, d.to(logits_ptr.dtype.element_ty), mask=mask)


def _rows(logits: torch.Tensor, target: torch.Tensor, logp: torch.Tensor, entropy: torch.Tensor,
          stats: torch.Tensor, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, ignore_index: int,
          temperature: float, backward: bool) -> None:
    rows, V = logits.shape
    if rows == 0:
        return
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    _logprob_rows_kernel[(rows,)](
        logits, logits.stride(0), target, logp, entropy, stats,
        grad_logp if grad_logp is not None else stats, grad_entropy if grad_entropy is not None else stats,
        V, ignore_index, 1.0 / temperature,
        BLOCK_V=block_v, BACKWARD=backward, HAS_ENTROPY_GRAD=grad_entropy is not None,
        num_warps=8 if block_v >= 2048 else 4)


@launches_on_input_device
def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, temperature: float,
                        ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob (N,), entropy (N,), stats (N, 2) = (lse, Σ p z)) in fp32, chunk by chunk."""
    N, _ = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    entropy = torch.empty(N, device=dev, dtype=torch.float32)
    stats = torch.empty((N, 2), device=dev, dtype=torch.float32)
    rows = chunk_rows(N, V, hidden.element_size())
    buf = torch.empty((min(rows, N), V), device=dev, dtype=hidden.dtype)  # (rows, V), reused by every chunk
    for start in range(0, N, rows):
        end = min(N, start + rows)
        logits = buf[: end - start]
        torch.mm(hidden[start:end], weight.t(), out=logits)
        _rows(logits, target[start:end], logp[start:end], entropy[start:end], stats[start:end], None, None,
              ignore_index, temperature, backward=False)
    return logp, entropy, stats


@launches_on_input_device
def linear_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
                        grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, temperature: float,
                        ignore_index: int, need_dhidden: bool, need_dweight: bool
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of Σ_t (grad_logp_t · logprob_t + grad_entropy_t · entropy_t) for hidden and weight (input dtype;
    dW accumulated across chunks in the weight's dtype, as the fused cross-entropy does)."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    dhidden = torch.empty((N, H), device=dev, dtype=dt) if need_dhidden else None
    dweight = torch.zeros((V, H), device=dev, dtype=dt) if need_dweight else None
    rows = chunk_rows(N, V, hidden.element_size())
    buf = torch.empty((min(rows, N), V), device=dev, dtype=dt)
    for start in range(0, N, rows):
        end = min(N, start + rows)
        x = hidden[start:end]
        logits = buf[: end - start]
        torch.mm(x, weight.t(), out=logits)
        _rows(logits, target[start:end], stats, stats, stats[start:end], grad_logp[start:end],
              grad_entropy[start:end] if grad_entropy is not None else None, ignore_index, temperature,
              backward=True)
        if dhidden is not None:
            torch.mm(logits, weight, out=dhidden[start:end])
        if dweight is not None:
            dweight.addmm_(logits.t(), x)
    return dhidden, dweight
