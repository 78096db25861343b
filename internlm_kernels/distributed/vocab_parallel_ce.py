"""Vocabulary-parallel fused linear cross-entropy: each tensor-parallel rank holds a slice of the output head
(vocabulary rows [v0, v0 + V_r)) and no rank ever holds the full logits.

For a chunk of token rows h (all tokens: gathered from the sequence-parallel shards):
    z = h @ W_r^T                                          (rows, V_r) this rank's logits, fp32
    m = all_reduce_max(max_v z)                            the row max over the whole vocabulary
    s, z_t = all_reduce_sum(sum_v exp(z - m), z[target] if the target is in this slice else 0)
    loss = m + log s - z_t                                 (0 where target == ignore_index)
The gradients are computed in the same pass (the logits exist only one chunk at a time, as in ops/cross_entropy):
    dz = (exp(z - m) / s - onehot_r(target)) * w           w = 1 / n_valid (mean) or 1 (sum); 0 on ignored rows
    dW_r = dz^T h        (this rank's rows only, no communication)
    dh   = sum over ranks of dz W_r                        reduce-scattered back to the sequence shards
and the backward scales them by the upstream gradient. Two all-reduces of (rows,) vectors per chunk, one
all-gather of the hidden states and one reduce-scatter of their gradient per call.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._collectives import reduce_scatter_flat
from .vocab_shards import check_shard_args, dtensor_shards, gather_rows, local_target

CHUNK_ROWS = 4096


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, group, vocab_start, ignore_index, reduction, sequence_parallel,
                chunk_rows):
        h = gather_rows(hidden, group) if sequence_parallel else hidden          # (T, H) every token
        T, vocab_local = h.shape[0], weight.shape[0]
        valid = target != ignore_index
        mine, index = local_target(target, valid, vocab_start, vocab_local)       # index: (T, 1) into this slice
        row_weight = valid.float()
        if reduction == "mean":
            row_weight = row_weight / valid.sum().clamp(min=1)
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w32 = weight.float()
        losses = torch.empty(T, dtype=torch.float32, device=h.device)
        dh = torch.empty(T, h.shape[1], dtype=torch.float32, device=h.device) if want_dh else None
        dw = torch.zeros_like(w32) if want_dw else None
        for start in range(0, T, chunk_rows):
            rows = slice(start, min(start + chunk_rows, T))
            hc = h[rows].float()
            z = hc @ w32.T                                                          # (rows, V_r)
            m = z.amax(dim=1) if vocab_local else torch.full((hc.shape[0],), -math.inf, device=h.device)
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            e = torch.exp(z - m.unsqueeze(1))
            stats = torch.stack([e.sum(dim=1), z.gather(1, index[rows]).squeeze(1) * mine[rows]])
            dist.all_reduce(stats, group=group)
            sum_exp, target_logit = stats[0], stats[1]
            losses[rows] = (m + torch.log(sum_exp) - target_logit) * valid[rows]
            if want_dh or want_dw:
                dz = e / sum_exp.unsqueeze(1)
                dz.scatter_add_(1, index[rows], -mine[rows].float().unsqueeze(1))
                dz.mul_(row_weight[rows].unsqueeze(1))
                if want_dw:
                    dw.addmm_(dz.T, hc)
                if want_dh:
                    dh[rows] = dz @ w32
        if want_dh:
            dh = dh.to(hidden.dtype)
            if sequence_parallel:
                local = dh.new_empty(hidden.shape)
                reduce_scatter_flat(local, dh, group=group)
                dh = local
            else:
                dist.all_reduce(dh, group=group)
        ctx.save_for_backward(dh if want_dh else None, dw.to(weight.dtype) if want_dw else None)
        loss = losses.sum()
        return loss / valid.sum().clamp(min=1) if reduction == "mean" else loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        g = grad_loss.float()
        return (None if dh is None else dh * g.to(dh.dtype), None if dw is None else dw * g.to(dw.dtype),
                None, None, None, None, None, None, None)


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, group=None, *,
                                 vocab_start: int, ignore_index: int = -100, reduction: str = "mean",
                                 sequence_parallel: bool = True, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Cross-entropy of hidden @ W^T over a vocabulary split across the ranks of ``group``.

    hidden: (T / tp, H) this rank's token rows (``sequence_parallel``, rank-major) or (T, H) on every rank;
    weight: (V_r, H) this rank's vocabulary rows, starting at ``vocab_start``; target: (T,) global class ids or
    ``ignore_index``, the same on every rank. Returns the loss (fp32 scalar, the same on every rank) for
    reduction "mean" (over non-ignored targets) or "sum".
    """
    if reduction not in ("mean", "sum"):
        raise NotImplementedError(f"reduction={reduction!r}: the vocabulary-parallel loss takes 'mean' or 'sum'")
    check_shard_args(hidden, weight, target, group, sequence_parallel, chunk_rows)
    return _VocabParallelCE.apply(hidden, weight, target, group, vocab_start, ignore_index, reduction,
                                  sequence_parallel, chunk_rows)


def dtensor_cross_entropy(hidden, weight, target, ignore_index: int = -100, reduction: str = "mean",
                          **unsupported) -> torch.Tensor:
    """fused_linear_cross_entropy's DTensor path: ``weight`` a DTensor sharded on dim 0 (vocabulary) over a 1-D
    mesh, ``hidden`` a DTensor sharded on dim 0 (tokens, sequence parallel) or replicated, on the same mesh."""
    for name, value in unsupported.items():
        if value:
            raise NotImplementedError(f"{name}: the vocabulary-parallel loss does not take it")
    local_hidden, local_weight, target, group, vocab_start, sequence_parallel = dtensor_shards(
        hidden, weight, target, "loss")
    return vocab_parallel_cross_entropy(local_hidden.reshape(-1, hidden.shape[-1]), local_weight, target.reshape(-1),
                                        group, vocab_start=vocab_start, ignore_index=ignore_index,
                                        reduction=reduction, sequence_parallel=sequence_parallel)
