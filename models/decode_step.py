"""One decode step of the whole layer stack on CPU as one function over plain ATen calls: the generator's CPU path.

A decode step of a small model on CPU is host time (each ATen call costs a few µs whatever its size) and memory
traffic around small GEMMs, so the step is written to make as few calls as it can:

* **Keys and values per slot**, ``k[layer, slot]`` a (Hkv, S_max, D) block: attention reads the first S keys of the
  live slots as a view, with no gather. The paged pool keeps the page bookkeeping (admission by free pages) and holds
  no data on this path.
* **Decode weights** (``DecodeWeights``), rebuilt from the model's parameters at every prefill (so a weight change
  between calls — a PPO update, in place or through raw pointers — reaches the next call): each product's weight
  transposed to (K, N) for ``mm``/``addmm`` (no per-call transpose; on the development machine ~20% faster than
  ``F.linear`` for the 1-64-row products here), with
  - each RMSNorm's weight folded into the columns of the product after it: rmsnorm(x)·w · Wᵀ = r(x)x · (W·diag w)ᵀ,
  - the softmax scale D^-1/2 folded into the query rows (rotation is linear, so it commutes),
  - the rotation folded into the QKV product: rotate-half is a fixed permutation of each head's rows, so one GEMM
    against [Wqkv; P·Wqk] gives q, k, v and rot(q), rot(k); rotated = qk·[c, c] + rot(qk)·[-s, s] (two calls),
  - w1 and w3 as one (H, 2I) product; the residual adds fused into the wo and w2 products (``addmm``).
* **Per step, once for all layers**: the cos/sin rows at pos_b = cache_seqlens[b]; the flat index of (b, h, pos_b)
  for the append; each row's key count pos_b + 1.
* **Per layer** (~13 calls): x = r(h)·h (one call of the extension's norm kernel, ``cpu.rms_norm.rms_scaled``);
  a = x·Waᵀ; q, k rotated; k, v appended (index_copy_); attention of each
  row's g query heads per KV head over its own pos_b + 1 keys of the slot's cache, in one call of the extension's
  decode attention kernel (``internlm_kernels.cpu.decode_attention``: K and V read once per KV head, exact softmax
  in float32, no mask, output in the (B, Hq·D) layout wo reads); h = addmm(h, o, Wo); x = r(h)·h;
  h = addmm(h, silu(a1)·a3, W2) (silu(a1)·a3 one call of its SwiGLU kernel, ``cpu.swiglu.silu_mul_packed``).
* Without the extension (or for a head dim it has no kernel for) the attention is ATen's: scores q·Kᵀ (bmm, GQA as
  (B·Hkv, g, D) × (B·Hkv, D, S) over S = max_b(pos_b + 1) keys: no K/V repeat), an additive mask (0 / -inf for
  j > pos_b, built once per step) only when the rows' lengths differ, softmax, ·V (bmm).

Same math as the model's packed forward up to float32 summation order; float32 only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from internlm_kernels.cpu import decode_attention
from internlm_kernels.cpu.gemm_choice import product
from internlm_kernels.cpu.rms_norm import rms_scaled
from internlm_kernels.cpu.rotary import rotate_heads
from internlm_kernels.cpu.swiglu import silu_mul_packed


class DecodeWeights:
    """The model's weights in the decode step's layout (module doc): per layer (Wa, Wo, W13, W2) as (K, N), and the
    head (H, V) with the final norm folded in."""

    def __init__(self, model):
        config = model.config
        n_kv, D = config.num_key_value_heads, config.head_dim
        g = config.num_attention_heads // n_kv
        m = model.model
        with torch.no_grad():
            self.embedding = m.tok_embeddings.weight.detach()
            self.layers = []
            for layer in m.layers:
                att, ff = layer.attention, layer.feed_forward
                hidden = att.wqkv.weight.shape[1]
                scale = hidden ** 0.5                                   # rms_scaled's missing factor
                w = (att.wqkv.weight * (layer.attention_norm.weight * scale)).view(n_kv, g + 2, D, hidden)
                w[:, :g] *= D ** -0.5
                rot = w[:, : g + 1].roll(D // 2, dims=2)                    # each head's rows [D/2:], [:D/2]
                wa = torch.cat([w.reshape(-1, hidden), rot.reshape(-1, hidden)]).t().contiguous()
                w13 = torch.cat([ff.w1.weight, ff.w3.weight]).mul_(layer.ffn_norm.weight * scale).t().contiguous()
                self.layers.append((wa, att.wo.weight.t().contiguous(), w13, ff.w2.weight.t().contiguous()))
            self.head = (model.output.weight * (m.norm.weight * m.norm.weight.shape[0] ** 0.5)).t().contiguous()


def _prompt_heads(t: torch.Tensor, token_rows: torch.Tensor | None, P: int, n: int) -> torch.Tensor:
    """Rows ``token_rows`` (None: all) of t (T, Hkv, [g,] D), the P prompts of n tokens each, as (P, heads, n, D)."""
    t = t if token_rows is None else t.index_select(0, token_rows)
    return t.reshape(P, n, -1, t.shape[-1]).transpose(1, 2)


class CpuDecodeStep:
    """The per-slot KV cache of ``max_batch`` slots × ``max_seq_len`` positions, the prefill into it (``prefill``) and
    the decode step (``logits``)."""

    def __init__(self, model, max_batch: int, max_seq_len: int, cos: torch.Tensor, sin: torch.Tensor):
        config = model.config
        self.model = model
        self.n_kv, self.head_dim = config.num_key_value_heads, config.head_dim
        self.group = config.num_attention_heads // config.num_key_value_heads
        self.cos, self.sin = cos, sin                                           # (positions, D / 2)
        self.cos2 = torch.cat([cos, cos], dim=-1)                               # (positions, D)
        self.sin2 = torch.cat([-sin, sin], dim=-1)
        self.max_seq_len = max_seq_len
        shape = (config.num_hidden_layers, max_batch, self.n_kv, max_seq_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=torch.float32)
        self.v = torch.zeros(shape, dtype=torch.float32)
        hidden = config.hidden_size                                              # rms_scaled takes H·eps
        self.eps = [(hidden * layer.attention_norm.eps, hidden * layer.ffn_norm.eps) for layer in model.model.layers]
        self.final_eps = hidden * model.model.norm.eps
        # Flat index of (slot b, kv head h, position 0) in a layer's (max_batch · Hkv · S_max, D) view.
        self.row_base = (torch.arange(max_batch)[:, None] * self.n_kv + torch.arange(self.n_kv)) * max_seq_len
        self.weights: DecodeWeights | None = None
        # The decode attention kernel where the extension has one for this head dim, else bmm / softmax / bmm.
        self.attention_kernel = decode_attention.runs(self.head_dim)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, slots: list[int], lengths: list[int]) -> torch.Tensor:
        """Run prompts packed in ``ids`` (T,) (``lengths`` tokens each, in this order) into ``slots``: their k/v go
        to the slots' caches at positions 0..len-1; returns the logits (n, V) at each prompt's last token. The same
        calls as ``step`` with T rows, causal attention per group of equal-length prompts (one SDPA call per group
        and layer), the products of T rows through ``gemm_choice.product`` (oneDNN or ATen, measured: at thousands
        of rows oneDNN was 10-20% faster on the development machine), and the last layer's wo and MLP only at the
        prompts' last tokens. A prefill is where new requests start, so the decode weights are rebuilt here (module doc)."""
        self.weights = W = DecodeWeights(self.model)
        T, D, n_kv, g = ids.shape[0], self.head_dim, self.n_kv, self.group
        f_qkv = n_kv * (g + 2) * D
        lengths_t = torch.tensor(lengths)
        ends = lengths_t.cumsum(0)
        length_of = torch.repeat_interleave(lengths_t, lengths_t)                                # (T,)
        positions = torch.arange(T) - torch.repeat_interleave(ends - lengths_t, lengths_t)       # (T,)
        slot_of = torch.repeat_interleave(torch.tensor(slots), lengths_t)                       # (T,)
        cos = self.cos.index_select(0, positions)                                               # (T, D / 2)
        sin = self.sin.index_select(0, positions)
        append_at = (self.row_base.index_select(0, slot_of) + positions[:, None]).flatten()
        groups: dict[int, list[int]] = {}                       # prompt length -> indices of the prompts
        for p, n in enumerate(lengths):
            groups.setdefault(n, []).append(p)
        # Per group: token rows of its P prompts (P·L,) in prompt order (None: every row, in order), and P.
        rows = {n: (None if len(groups) == 1 else (length_of == n).nonzero().squeeze(1), len(ps))
                for n, ps in groups.items()}

        last = ends - 1
        h = W.embedding.index_select(0, ids)
        for i, (wa, wo, w13, w2) in enumerate(W.layers):
            eps_attn, eps_ffn = self.eps[i]
            # q, k, v only (not the rot(q), rot(k) columns the step folds in: at T rows they cost more FLOPs than the
            # two calls they save), then the rotation as one C++ loop over the q and k heads.
            qkv = product(rms_scaled(h, eps_attn), wa[:, :f_qkv].t()).view(T, n_kv, g + 2, D)
            qk = torch.empty(T, n_kv, g + 1, D)
            rotate_heads(qk, qkv[:, :, : g + 1], cos, sin, 1.0)
            k_cache, v_cache = self.k[i], self.v[i]
            k_cache.view(-1, D).index_copy_(0, append_at, qk[:, :, g].reshape(T * n_kv, D))
            v_cache.view(-1, D).index_copy_(0, append_at, qkv[:, :, g + 1].reshape(T * n_kv, D))
            out = torch.empty(T, n_kv * g * D) if len(rows) > 1 else None    # one group's output is used as it is
            for n, (token_rows, P) in rows.items():
                # A prompt's keys are its own tokens' (a prefill starts at position 0): this layer's k and v
                # rows, not a gather from the cache.
                q = _prompt_heads(qk[:, :, :g], token_rows, P, n)
                keys, values = _prompt_heads(qk[:, :, g], token_rows, P, n), _prompt_heads(qkv[:, :, g + 1], token_rows, P, n)
                o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=1.0, enable_gqa=g > 1)
                o = o.transpose(1, 2).reshape(P * n, n_kv * g * D)
                if token_rows is None:                                   # its rows are all, in order
                    out = o
                else:
                    out.index_copy_(0, token_rows, o)
            if i == len(W.layers) - 1:          # past the last attention only the prompts' last tokens matter
                h, out = h.index_select(0, last), out.index_select(0, last)
            h = h + product(out, wo.t())
            a = product(rms_scaled(h, eps_ffn), w13.t())
            h = h + product(silu_mul_packed(a), w2.t())
        return torch.mm(rms_scaled(h, self.final_eps), W.head)

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
        if self.weights is None:                # a step before any prefill (the generator always prefills first)
            self.weights = DecodeWeights(self.model)
        W = self.weights
        B, D, n_kv, g = tokens.shape[0], self.head_dim, self.n_kv, self.group
        f_qkv = n_kv * (g + 2) * D
        pos = cache_seqlens.long()                                              # (B,)
        cos = self.cos2.index_select(0, pos).view(B, 1, 1, D)    # index_select: several times cheaper than t[idx]
        sin = self.sin2.index_select(0, pos).view(B, 1, 1, D)
        append_at = (self.row_base[:B] + pos[:, None]).flatten()               # (slot b, kv head h, pos_b)
        if self.attention_kernel:
            n_keys = pos + 1                                                    # keys 0..pos_b of each row
            out = torch.empty(B, n_kv * g * D)        # each layer's attention output, consumed by its wo product
        else:
            lo, hi = torch.aminmax(pos)
            shortest, longest = int(lo) + 1, int(hi) + 1
            mask = None
            if shortest != longest:                                             # (B·Hkv, 1, S): 0 or -inf
                hidden = torch.arange(longest)[None, :] > pos[:, None]
                mask = torch.zeros(B, longest).masked_fill_(hidden, float("-inf")).repeat_interleave(n_kv, 0)[:, None]

        h = W.embedding.index_select(0, tokens)                                 # (B, hidden): the residual stream
        for i, (wa, wo, w13, w2) in enumerate(W.layers):
            eps_attn, eps_ffn = self.eps[i]
            a = torch.mm(rms_scaled(h, eps_attn), wa)                          # (B, qkv | rot(qk))
            qkv = a[:, :f_qkv].view(B, n_kv, g + 2, D)                          # per KV group: g q heads, k, v
            qk = (qkv[:, :, : g + 1] * cos).addcmul_(a[:, f_qkv:].view(B, n_kv, g + 1, D), sin)
            k_cache, v_cache = self.k[i], self.v[i]                            # (max_batch, Hkv, S_max, D)
            k_cache.view(-1, D).index_copy_(0, append_at, qk[:, :, g].reshape(B * n_kv, D))
            v_cache.view(-1, D).index_copy_(0, append_at, qkv[:, :, g + 1].reshape(B * n_kv, D))
            if self.attention_kernel:                                           # q: (B, Hkv, g, D), scaled
                decode_attention.decode_attention(qk[:, :, :g], k_cache, v_cache, n_keys, 1.0, out, check=i == 0)
            else:
                q = qk[:, :, :g].reshape(B * n_kv, g, D)                        # a view: (B·Hkv, g, D), scaled
                keys = k_cache[:B, :, :longest].reshape(B * n_kv, longest, D).transpose(1, 2)
                scores = torch.bmm(q, keys) if mask is None else torch.baddbmm(mask, q, keys)
                out = torch.bmm(scores.softmax(-1), v_cache[:B, :, :longest].reshape(B * n_kv, longest, D))
            h = torch.addmm(h, out.view(B, n_kv * g * D), wo)
            a = torch.mm(rms_scaled(h, eps_ffn), w13)                          # (B, w1 x | w3 x)
            h = torch.addmm(h, silu_mul_packed(a), w2)
        return torch.mm(rms_scaled(h, self.final_eps), W.head)
