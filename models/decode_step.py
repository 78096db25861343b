"""One decode step of the whole layer stack on CPU as one function over plain ATen calls: the generator's CPU path.

A decode step of a small model on CPU is host time and memory traffic around small GEMMs. The generic path walks
the modules, builds a decode context, and makes one ``ik.flash_attn_with_kvcache`` call per layer that re-validates
its arguments, rotates q/k, gathers the cos/sin rows, and gathers every row's pages to full capacity into a
(B, S, Hkv, D) tensor that SDPA then reads transposed. Here:

* **Keys and values per slot**, ``k[layer, slot]`` a (Hkv, S_max, D) block: SDPA reads the first S keys of the live
  slots as a view in its own (B, Hkv, S, D) layout, with no gather (on the development machine a strided
  (B, S, Hkv, D) input made the decode attention ~1.5× slower, and the per-layer page gathers cost as much again).
  The paged pool keeps the page bookkeeping (admission by free pages) and holds no data on this path.
* **Per step, once for all layers**: pos_b = cache_seqlens[b] (the new token's position); the cos/sin rows at pos_b
  with rotate-half's sign folded into sin (out = x·[c, c] + roll(x, D/2)·[-s, s]); the flat index of (b, h, pos_b)
  for the append; S = max_b(pos_b + 1); a mask j <= pos_b only when the rows' lengths differ.
* **Per layer**: h += attn; x = rmsnorm(h); qkv = x Wqkvᵀ; q and k rotated in one pass; k, v appended
  (index_copy_); SDPA (ATen's CPU flash kernel, GQA without repeating K/V); wo; rmsnorm; w2(silu(w1 x) · w3 x). GEMMs
  go through ``internlm_kernels.cpu.gemm_choice.product`` (oneDNN or ATen's BLAS, whichever measured faster here).

The weights are read from the model's parameters at every step (no copies), so a PPO update of the policy is seen by
the next rollout. Same math as the model's packed forward up to float32 summation order; float32 only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from internlm_kernels.cpu.gemm_choice import product


class CpuDecodeStep:
    """The per-slot KV cache of ``max_batch`` slots × ``max_seq_len`` positions, the prefill's writer into it, and the
    decode step (``logits``)."""

    def __init__(self, model, max_batch: int, max_seq_len: int, cos: torch.Tensor, sin: torch.Tensor):
        config = model.config
        self.model = model
        self.n_kv, self.head_dim = config.num_key_value_heads, config.head_dim
        self.group = config.num_attention_heads // config.num_key_value_heads
        self.hidden = config.hidden_size
        self.half = self.head_dim // 2
        self.cos2 = torch.cat([cos, cos], dim=-1)                               # (positions, D)
        self.sin2 = torch.cat([-sin, sin], dim=-1)
        self.max_seq_len = max_seq_len
        shape = (config.num_hidden_layers, max_batch, self.n_kv, max_seq_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=torch.float32)
        self.v = torch.zeros(shape, dtype=torch.float32)
        self.eps = [(layer.attention_norm.eps, layer.ffn_norm.eps) for layer in model.model.layers]
        self.final_eps = model.model.norm.eps

    def writer(self, slots: list[int], lengths: list[int]) -> _SlotPrefillWriter:
        """The cache the prefill of prompts of ``lengths`` tokens, packed in this order, into ``slots`` writes to."""
        return _SlotPrefillWriter(self, slots, lengths)

    def logits(self, rows: int, tokens: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
        """Logits (rows, V) of the next token of rows 0..rows-1 of the generator's fixed buffers (rows: a batch
        bucket); the new token's k/v are appended at the row's cache length (the caller advances cache_seqlens).
        Only the rows up to the last live one run (a live row has cache length >= 1, a free one 0; the bucket
        exists for CUDA graphs, and on CPU every padded row would cost its share of each GEMM); the others' logits
        are 0."""
        lengths = cache_seqlens[:rows]
        live = lengths.nonzero()                                        # CPU tensors: no device sync
        n = int(live[-1]) + 1 if live.numel() else 1
        out = self.step(tokens[:n], lengths[:n])
        if n == rows:
            return out
        return torch.cat([out, out.new_zeros(rows - n, out.shape[1])])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
        """tokens (B,), cache_seqlens (B,) of slots 0..B-1 -> logits (B, V) float32."""
        B, D, n_kv, g = tokens.shape[0], self.head_dim, self.n_kv, self.group
        pos = cache_seqlens.long()                                              # (B,)
        cos = self.cos2.index_select(0, pos).view(B, 1, 1, D)    # index_select: several times cheaper than t[idx]
        sin = self.sin2.index_select(0, pos).view(B, 1, 1, D)
        S_max = self.max_seq_len
        # Flat index of (slot b, kv head h, position pos_b) in a layer's (max_batch · Hkv · S_max, D) view.
        append_at = ((torch.arange(B)[:, None] * n_kv + torch.arange(n_kv)) * S_max + pos[:, None]).flatten()
        longest, shortest = int(pos.max()) + 1, int(pos.min()) + 1
        visible = None
        if shortest != longest:
            visible = (torch.arange(longest)[None, :] <= pos[:, None]).view(B, 1, 1, longest)

        m = self.model.model
        h = F.embedding(tokens, m.tok_embeddings.weight)                        # (B, hidden)
        residual = None
        for i, layer in enumerate(m.layers):
            eps_attn, eps_ffn = self.eps[i]
            residual = h if residual is None else residual + h
            x = F.rms_norm(residual, (self.hidden,), layer.attention_norm.weight, eps_attn)
            att = layer.attention
            qkv = product(x, att.wqkv.weight).view(B, n_kv, g + 2, D)          # per KV group: g q heads, k, v
            qk = qkv[:, :, : g + 1]
            qk = qk * cos + qk.roll(self.half, dims=-1) * sin                   # rotated q heads and k
            k_cache, v_cache = self.k[i], self.v[i]                            # (max_batch, Hkv, S_max, D)
            k_cache.view(-1, D).index_copy_(0, append_at, qk[:, :, g].reshape(B * n_kv, D))
            v_cache.view(-1, D).index_copy_(0, append_at, qkv[:, :, g + 1].reshape(B * n_kv, D))
            q = qk[:, :, :g].reshape(B, n_kv * g, 1, D)
            out = F.scaled_dot_product_attention(q, k_cache[:B, :, :longest], v_cache[:B, :, :longest],
                                                 attn_mask=visible, enable_gqa=g > 1)
            h = product(out.view(B, n_kv * g * D), att.wo.weight)
            residual = residual + h
            x = F.rms_norm(residual, (self.hidden,), layer.ffn_norm.weight, eps_ffn)
            ff = layer.feed_forward
            a = F.silu(product(x, ff.w1.weight)).mul_(product(x, ff.w3.weight))
            h = product(a, ff.w2.weight)
        x = F.rms_norm(residual + h, (self.hidden,), m.norm.weight, self.final_eps)
        return product(x, self.model.output.weight)


class _SlotPrefillWriter:
    """The cache a PackedContext hands each layer's rotated k/v (T, Hkv, D) to: packed token t (prompt p, position
    j) goes to k[layer, slot_p, :, j]."""

    def __init__(self, step: CpuDecodeStep, slots: list[int], lengths: list[int]):
        self.step = step
        self.slots = torch.repeat_interleave(torch.tensor(slots), torch.tensor(lengths))          # (T,)
        self.positions = torch.cat([torch.arange(n) for n in lengths])                         # (T,)

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.step.k[layer][self.slots, :, self.positions] = k
        self.step.v[layer][self.slots, :, self.positions] = v
