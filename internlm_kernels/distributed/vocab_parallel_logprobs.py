"""Vocabulary-parallel fused linear log-probabilities: per-token log p(target) and entropy of
softmax(hidden @ W^T / tau) when each tensor-parallel rank holds a slice of the output head (vocabulary rows
[v0, v0 + V_r)) — the PPO actor's and reference's forward under tensor parallelism. No rank holds full logits; every
rank returns the log-probs of every token (the same values on each rank, as one process computes them).

For a chunk of token rows h (all tokens: gathered from the sequence-parallel shards), per rank:
    z = h @ W_r^T / tau                                    (rows, V_r) this rank's logits, fp32
    m = all_reduce_max(max_v z)                            the row max over the whole vocabulary
    s, z_t, a = all_reduce_sum(sum_v e, z[target] if the target is in this slice else 0, sum_v e z),  e = exp(z - m)
    lse = m + log s,   logprob = z_t - lse,   entropy = lse - a / s                 (0 where target == ignore_index)
Unlike the loss (vocab_parallel_ce.py), the output is per token, so its gradient is an arbitrary (T,) vector g (and
q for the entropy), known only in the backward. With p = exp(z - lse) and sum_pz = lse - entropy = sum_v p z:
    d logprob / dz_v = onehot(target)_v - p_v,      d entropy / dz_v = -p_v (z_v - sum_pz)
    dz = g onehot - p (g + q (z - sum_pz))                                             (rows, V_r), 0 on ignored rows
    dW_r = (dz / tau)^T h     this rank's rows only, no communication
    dh   = sum over ranks of (dz / tau) W_r                reduce-scattered (fp32) back to the sequence shards
The backward recomputes each chunk's logits from the saved gathered hidden states, (lse, sum_pz) per token and the
local head: communication is two all-reduces of (rows,)-sized vectors per chunk and one all-gather of the hidden
states in the forward, one reduce-scatter of their gradient in the backward.

The upstream gradients g, q are taken as this rank's own: every tensor-parallel rank computes the same loss from the
same (replicated) log-probs, so each holds the full gradient, and the ranks' contributions to dh are parts of one
sum over the vocabulary, never copies to average.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._collectives import reduce_scatter_flat
from .vocab_shards import check_shard_args, dtensor_shards, gather_rows, local_target

CHUNK_ROWS = 4096


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, group, vocab_start, temperature, ignore_index, sequence_parallel,
                chunk_rows):
        h = gather_rows(hidden, group) if sequence_parallel else hidden          # (T, H) every token
        T, vocab_local = h.shape[0], weight.shape[0]
        valid = target != ignore_index
        mine, index = local_target(target, valid, vocab_start, vocab_local)
        w32 = weight.float()
        lse = torch.empty(T, dtype=torch.float32, device=h.device)
        sum_pz = torch.empty(T, dtype=torch.float32, device=h.device)
        logp = torch.empty(T, dtype=torch.float32, device=h.device)
        for start in range(0, T, chunk_rows):
            rows = slice(start, min(start + chunk_rows, T))
            z = (h[rows].float() @ w32.T) / temperature                            # (rows, V_r)
            m = z.amax(dim=1) if vocab_local else torch.full((z.shape[0],), -math.inf, device=h.device)
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            e = torch.exp(z - m.unsqueeze(1))
            stats = torch.stack([e.sum(dim=1), z.gather(1, index[rows]).squeeze(1) * mine[rows], (e * z).sum(dim=1)])
            dist.all_reduce(stats, group=group)
            lse[rows] = m + torch.log(stats[0])
            sum_pz[rows] = stats[2] / stats[0]
            logp[rows] = stats[1] - lse[rows]
        zero = torch.zeros_like(logp)
        logp = torch.where(valid, logp, zero)
        entropy = torch.where(valid, lse - sum_pz, zero)
        ctx.save_for_backward(h, weight, target, lse, sum_pz)
        ctx.options = (group, vocab_start, temperature, ignore_index, sequence_parallel, chunk_rows,
                       hidden.shape, hidden.dtype)
        ctx.set_materialize_grads(False)     # an unused entropy leaves its gradient None: that term is skipped
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h, weight, target, lse, sum_pz = ctx.saved_tensors
        group, vocab_start, temperature, ignore_index, sequence_parallel, chunk_rows, shape, dtype = ctx.options
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none = (None,) * 7
        if (grad_logp is None and grad_entropy is None) or not (want_dh or want_dw):
            return (None, None) + none
        T, vocab_local = h.shape[0], weight.shape[0]
        valid = target != ignore_index
        mine, index = local_target(target, valid, vocab_start, vocab_local)
        g = torch.zeros(T, device=h.device) if grad_logp is None else grad_logp.float() * valid
        q = None if grad_entropy is None else grad_entropy.float() * valid
        w32 = weight.float()
        dh = torch.empty(T, h.shape[1], dtype=torch.float32, device=h.device) if want_dh else None
        dw = torch.zeros_like(w32) if want_dw else None
        for start in range(0, T, chunk_rows):
            rows = slice(start, min(start + chunk_rows, T))
            hc = h[rows].float()
            z = (hc @ w32.T) / temperature
            p = torch.exp(z - lse[rows].unsqueeze(1))
            coef = g[rows].unsqueeze(1)
            if q is not None:
                coef = coef + q[rows].unsqueeze(1) * (z - sum_pz[rows].unsqueeze(1))
            dz = -p * coef
            dz.scatter_add_(1, index[rows], (g[rows] * mine[rows]).unsqueeze(1))
            dz.div_(temperature)
            if want_dw:
                dw.addmm_(dz.T, hc)
            if want_dh:
                dh[rows] = dz @ w32
        if want_dh:
            if sequence_parallel:
                local = dh.new_empty(shape)
                reduce_scatter_flat(local, dh, group=group)
                dh = local
            else:
                dist.all_reduce(dh, group=group)
            dh = dh.to(dtype)
        return (dh, None if dw is None else dw.to(weight.dtype)) + none


def vocab_parallel_logprobs(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, group=None, *,
                            vocab_start: int, temperature: float = 1.0, ignore_index: int = -100,
                            sequence_parallel: bool = True, chunk_rows: int = CHUNK_ROWS
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob, entropy) of softmax(hidden @ W^T / temperature) per token, over a vocabulary split across the
    ranks of ``group`` (``reference.linear_logprobs`` of the full head).

    hidden: (T / tp, H) this rank's token rows (``sequence_parallel``, rank-major) or (T, H) on every rank;
    weight: (V_r, H) this rank's vocabulary rows, starting at ``vocab_start``; target: (T,) global class ids or
    ``ignore_index``, the same on every rank. Returns two (T,) float32 tensors, the same on every rank, 0 where the
    target is ``ignore_index``; gradients flow to hidden and weight through both.
    """
    check_shard_args(hidden, weight, target, group, sequence_parallel, chunk_rows)
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature <= 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return _VocabParallelLogprobs.apply(hidden, weight, target.long(), group, vocab_start, float(temperature),
                                        ignore_index, sequence_parallel, chunk_rows)


def dtensor_logprobs(hidden, weight, targets, temperature: float = 1.0, ignore_index: int = -100
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_linear_logprobs' DTensor path: ``weight`` a DTensor sharded on dim 0 (vocabulary) over a 1-D mesh,
    ``hidden`` (T, H) a DTensor sharded on dim 0 (tokens, sequence parallel) or replicated on the same mesh,
    ``targets`` (T,) plain (or a DTensor, gathered). Returns plain (T,) (logprob, entropy), the same on every rank."""
    local_hidden, local_weight, targets, group, vocab_start, sequence_parallel = dtensor_shards(
        hidden, weight, targets, "log-probs")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (tokens, H) for the vocabulary-parallel log-probs, got {tuple(hidden.shape)}")
    return vocab_parallel_logprobs(local_hidden, local_weight, targets.reshape(-1), group, vocab_start=vocab_start,
                                   temperature=temperature, ignore_index=ignore_index,
                                   sequence_parallel=sequence_parallel)
