"""KV-cache generation for RLHF rollouts and demos.

One call: the cache for every layer is allocated once, (layers, 2, B, P + max_new_tokens, Hkv, D) with P the
longest prompt, and never reallocated. Sequence b keeps its tokens at cache rows 0..len_b-1 (no left padding).

- Prefill: the prompts are packed (T,) with cu_seqlens and run through the model's ordinary packed forward (the
  varlen attention kernel, positions restarting per prompt); each layer writes its rotated k and v into the cache.
  The output head runs only at each prompt's last token.
- Decode: one token per sequence. Each layer rotates the new q and k at the sequence's own position
  (``seqlen_offsets`` per sequence), writes k and v at that position, and attends over the cache with torch's
  scaled_dot_product_attention and a length mask (the varlen kernel needs each sequence's keys contiguous in
  one packed tensor, which a per-sequence cache row is not). Only the first P + step + 1 cache rows are read.
- Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / temperature), restricted to the smallest
  set of most likely tokens whose probability reaches top_p (top-p / nucleus), sampled with ``generator``.
- A sequence stops after producing a stop token (kept in its output) or max_new_tokens; the loop ends when all have
  stopped. Finished sequences keep running in the batch (their tokens are discarded), so shapes never change.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import internlm_kernels as ik

from .context import PackedContext
from .packing import PackedInputs


class KVCache:
    """Rotated keys and values of every layer: ``kv[layer, 0 | 1]`` is (B, max_len, Hkv, D)."""

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        # Zeroed, not empty: masked-out rows still enter SDPA's product with the probabilities (0 · NaN = NaN).
        self.kv = torch.zeros(num_layers, 2, batch, max_len, num_kv_heads, head_dim, dtype=dtype, device=device)
        self._rows: torch.Tensor | None = None   # (T,) prefill: the sequence of each packed token
        self._cols: torch.Tensor | None = None   # (T,) prefill: its position in that sequence

    def set_prefill(self, cu_seqlens: torch.Tensor) -> None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        self._rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        self._cols = torch.arange(self._rows.numel(), device=lengths.device) - cu_seqlens[:-1].long()[self._rows]

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (T, Hkv, D) of the packed prompts."""
        self.kv[layer, 0, self._rows, self._cols] = k
        self.kv[layer, 1, self._rows, self._cols] = v


class DecodeContext:
    """Rotary and attention for one new token per sequence at ``positions`` (B,), over the cache."""

    def __init__(self, cache: KVCache, positions: torch.Tensor, visible: int, cos: torch.Tensor, sin: torch.Tensor):
        self.cache = cache
        self.positions = positions                                    # (B,) int64: where the new token goes
        self.offsets = positions.to(torch.int32)
        self.visible = visible                                        # cache rows that may hold keys
        self.cos, self.sin = cos, sin
        key_pos = torch.arange(visible, device=positions.device)
        self.mask = (key_pos[None, :] <= positions[:, None])[:, None, None, :]   # (B, 1, 1, visible)
        self.batch_index = torch.arange(positions.numel(), device=positions.device)

    def qkv(self, wqkv_out: torch.Tensor, n_kv_heads: int, head_dim: int):
        """wqkv output (B, F) of the new tokens -> q (B, Hq, D), k and v (B, Hkv, D), rotated at each position."""
        q, k, v = ik.qkv_rotary(wqkv_out.unsqueeze(1), self.cos, self.sin, n_kv_heads, head_dim,
                                seqlen_offsets=self.offsets)
        return q[:, 0], k[:, 0], v[:, 0]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, D), new k/v (B, Hkv, D) -> (B, Hq, D)."""
        kv = self.cache.kv[layer]
        kv[0, self.batch_index, self.positions] = k
        kv[1, self.batch_index, self.positions] = v
        keys = kv[0, :, : self.visible].transpose(1, 2)              # (B, Hkv, visible, D)
        values = kv[1, :, : self.visible].transpose(1, 2)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=self.mask,
                                             enable_gqa=True)         # (B, Hq, 1, D)
        return out.squeeze(2)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) float32 -> tokens (B,): greedy at temperature 0, else top-p sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Drop a token when the tokens ranked above it already reach top_p; the most likely one always stays.
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    choice = torch.multinomial(sorted_probs.masked_fill(outside, 0.0), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def _check_args(prompts, max_new_tokens, temperature, top_p, stop_token_ids, vocab_size: int) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not p:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids")
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in p):
            raise ValueError(f"prompts[{i}] must hold ints in [0, vocab_size={vocab_size})")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature == 0 and top_p != 1.0:
        raise ValueError("top_p applies to sampling; with temperature=0 (greedy decoding) leave top_p at 1.0")
    if not all(isinstance(t, int) for t in stop_token_ids):
        raise ValueError(f"stop_token_ids must be ints, got {stop_token_ids!r}")


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             stop_token_ids=(2, 92542), generator: torch.Generator | None = None) -> list[list[int]]:
    """See the module docstring. ``generator`` must live on the model's device. Returns the new tokens only."""
    config = model.config
    stop_token_ids = tuple(stop_token_ids)
    _check_args(prompts, max_new_tokens, temperature, top_p, stop_token_ids, config.vocab_size)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    weight = model.output.weight
    device = weight.device
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)              # (B,)
    longest = int(max(len(p) for p in prompts))
    cache = KVCache(config.num_hidden_layers, B, longest + max_new_tokens, config.num_key_value_heads,
                    config.head_dim, weight.dtype, device)

    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)   # (T,)
    cu_seqlens = F.pad(lengths.cumsum(0).to(torch.int32), (1, 0))
    cache.set_prefill(cu_seqlens)
    packed = PackedInputs(ids, cu_seqlens, longest, None, None, None)
    hidden = model.model(ids, PackedContext(packed, model.model.rotary, cache))   # (T, hidden)
    logits = model.output(hidden[cu_seqlens[1:].long() - 1]).float()             # (B, V)

    stop = torch.tensor(stop_token_ids, dtype=torch.long, device=device)
    new_tokens = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = sample(logits, float(temperature), float(top_p), generator)        # (B,)
        new_tokens[:, step] = token.masked_fill(done, -1)
        done |= torch.isin(token, stop)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        positions = lengths + step                                                 # where `token` goes
        visible = longest + step + 1
        cos, sin = model.model.rotary(visible, device)
        hidden = model.model(token, DecodeContext(cache, positions, visible, cos, sin))   # (B, hidden)
        logits = model.output(hidden).float()
    return [[t for t in row if t >= 0] for row in new_tokens.tolist()]
