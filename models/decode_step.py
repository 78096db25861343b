"""One decode step of the whole layer stack on CPU as one function over plain ATen calls: the generator's CPU path.

A decode step of a small model on CPU is mostly host time: the generic path walks the modules, builds a decode
context, and makes one ``ik.flash_attn_with_kvcache`` call per layer that re-validates its arguments, rotates q/k,
gathers the cos/sin rows and the page indices, and gathers every row's cache to its full capacity. Here everything
that is the same for all layers is computed once per step:

    pos_b = cache_seqlens[b]                      the new token's position in row b
    cos/sin rows at pos_b, broadcast over heads   (B, 1, 1, D), with rotate-half's sign folded into sin
    slot_b = block_table[b, pos_b // ps] · ps + pos_b mod ps     where row b's new k/v go (flat pool index)
    S = max_b(pos_b + 1)                           the keys any row can see: the pages up to the longest row
    visible[b, j] = j <= pos_b                     (B, 1, 1, S), only when the rows' lengths differ

and each layer is: h += attn; x = rmsnorm(h); qkv = x Wqkvᵀ; q, k rotated in one pass (rotate-half:
x·cos + roll(x, D/2)·sin±); k, v written at slot_b (index_copy_); SDPA (ATen's CPU flash kernel, GQA without
repeating K/V) over the gathered pages; wo; rmsnorm; w2(silu(w1 x) · w3 x). GEMMs go through
``internlm_kernels.cpu.linear.matmul`` (oneDNN or ATen's BLAS, whichever measured faster for the shape here).

The weights are read from the model's parameters at every step (no copies), so a PPO update of the policy is seen by
the next rollout. Same math as the model's packed forward up to float32 summation order; float32 only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from internlm_kernels.cpu.gemm_choice import product


class CpuDecodeStep:
    """``step(tokens, block_table, cache_seqlens)`` -> logits (B, V) float32 of the next token of each row; the new
    token's k/v are appended to the pool at the row's cache length (the caller advances cache_seqlens)."""

    def __init__(self, model, pool, cos: torch.Tensor, sin: torch.Tensor):
        config = model.config
        self.model, self.pool = model, pool
        self.n_kv, self.head_dim = config.num_key_value_heads, config.head_dim
        self.group = config.num_attention_heads // config.num_key_value_heads
        self.hidden = config.hidden_size
        self.page_size = pool.page_size
        half = self.head_dim // 2
        # Rotate-half as a roll: out = x·[c, c] + roll(x, D/2)·[-s, s] (roll(x) = [x₂, x₁]).
        self.cos2 = torch.cat([cos, cos], dim=-1)                              # (positions, D)
        self.sin2 = torch.cat([-sin, sin], dim=-1)
        self.half = half
        n_layers, n_pages, ps, n_kv, d = pool.k.shape
        self.k_flat = pool.k.view(n_layers, n_pages * ps, n_kv, d)             # views: writes land in the pool
        self.v_flat = pool.v.view(n_layers, n_pages * ps, n_kv, d)
        self.eps = [(layer.attention_norm.eps, layer.ffn_norm.eps) for layer in model.model.layers]
        self.final_eps = model.model.norm.eps

    def logits(self, rows: int, tokens: torch.Tensor, block_table: torch.Tensor,
               cache_seqlens: torch.Tensor) -> torch.Tensor:
        """Logits (rows, V) of rows 0..rows-1 of the generator's fixed buffers (rows: a batch bucket). Only the rows
        up to the last live one run (a live row has cache length >= 1, a free one 0; the bucket exists for CUDA
        graphs, and on CPU every padded row would cost its share of each GEMM); the others' logits are 0."""
        live = int(torch.count_nonzero(cache_seqlens[:rows]))
        n = rows if live == rows else int(cache_seqlens[:rows].nonzero()[-1]) + 1
        out = self.step(tokens[:n], block_table[:n], cache_seqlens[:n])
        if n == rows:
            return out
        return torch.cat([out, out.new_zeros(rows - n, out.shape[1])])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
        B, ps, D, n_kv, g = tokens.shape[0], self.page_size, self.head_dim, self.n_kv, self.group
        pos = cache_seqlens.long()                                             # (B,)
        cos = self.cos2.index_select(0, pos).view(B, 1, 1, D)       # index_select: ~5x cheaper than t[idx] here
        sin = self.sin2.index_select(0, pos).view(B, 1, 1, D)
        pages_of_row = block_table.long()
        slot = pages_of_row.gather(1, (pos // ps)[:, None]).squeeze(1) * ps + pos % ps
        # CPU tensors: reading the longest row is a memory read, not a device sync.
        longest, shortest = int(pos.max()) + 1, int(pos.min()) + 1
        n_pages = -(-longest // ps)
        pages = pages_of_row[:, :n_pages].flatten()                             # (B · n_pages,)
        # Keys 0..longest-1 of the gathered pages; a mask only when the rows' lengths differ.
        visible = None
        if shortest != longest:
            visible = (torch.arange(longest)[None, :] <= pos[:, None]).view(B, 1, 1, longest)

        m = self.model.model
        h = F.embedding(tokens, m.tok_embeddings.weight)                       # (B, hidden)
        residual = None
        for i, layer in enumerate(m.layers):
            eps_attn, eps_ffn = self.eps[i]
            residual = h if residual is None else residual + h
            x = F.rms_norm(residual, (self.hidden,), layer.attention_norm.weight, eps_attn)
            att = layer.attention
            qkv = product(x, att.wqkv.weight).view(B, n_kv, g + 2, D)        # per KV group: g q heads, k, v
            qk = qkv[:, :, : g + 1]
            qk = qk * cos + qk.roll(self.half, dims=-1) * sin                   # rotated q heads and k
            v = qkv[:, :, g + 1]
            self.k_flat[i].index_copy_(0, slot, qk[:, :, g])
            self.v_flat[i].index_copy_(0, slot, v)
            keys = self.pool.k[i].index_select(0, pages).view(B, -1, n_kv, D)[:, :longest].transpose(1, 2)
            values = self.pool.v[i].index_select(0, pages).view(B, -1, n_kv, D)[:, :longest].transpose(1, 2)
            q = qk[:, :, :g].reshape(B, n_kv * g, 1, D)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=g > 1)
            h = product(out.view(B, n_kv * g * D), att.wo.weight)
            residual = residual + h
            x = F.rms_norm(residual, (self.hidden,), layer.ffn_norm.weight, eps_ffn)
            ff = layer.feed_forward
            a = F.silu(product(x, ff.w1.weight)).mul_(product(x, ff.w3.weight))
            h = product(a, ff.w2.weight)
        x = F.rms_norm(residual + h, (self.hidden,), m.norm.weight, self.final_eps)
        return product(x, self.model.output.weight)
