"""Forward contexts: what every layer asks of the forward it runs in (rotary and attention).

The layers call ``ctx.qkv(...)`` and ``ctx.attend(...)`` and nothing else, so one trunk serves training and
scoring over packed tokens (``PackedContext``, also the prefill of generation) and one-token decoding over a KV
cache (``models.serving.PagedDecodeContext``; on CPU in float32 ``models.decode_step`` runs the decode itself).
"""
from __future__ import annotations

from typing import Protocol

import torch

import internlm_kernels as ik

from .packing import PackedInputs


class ForwardContext(Protocol):
    def qkv(self, wqkv_out: torch.Tensor, n_kv_heads: int,
            head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """wqkv output (N, (Hq + 2 Hkv) · D) -> q (N, Hq, D), k and v (N, Hkv, D), q and k rotated."""
        ...

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (N, Hq, D), k/v (N, Hkv, D) of layer ``layer_idx`` -> attention output (N, Hq, D)."""
        ...


class PackedContext:
    """What every layer needs for a packed forward. ``cache`` (prefill) receives each layer's rotated k and v."""

    def __init__(self, packed: PackedInputs, rotary: ik.nn.RotaryEmbedding, cache=None):
        self.cu_seqlens = packed.cu_seqlens
        self.max_seqlen = packed.max_seqlen
        self.cache = cache
        device = packed.input_ids.device
        if packed.positions is None:
            # Dynamic NTK: the base follows the longest sequence of the batch (HF: the sequence length).
            self.cos, self.sin = rotary(max(self.max_seqlen, 1), device)
            self.per_token = False
        else:
            seq_len = int(packed.positions.max()) + 1 if packed.positions.numel() else 1
            cos, sin = rotary(seq_len, device)
            self.cos, self.sin = cos[packed.positions], sin[packed.positions]   # (T, D/2): row i is token i
            self.per_token = True

    def qkv(self, wqkv_out: torch.Tensor, n_kv_heads: int, head_dim: int):
        """wqkv output (T, (Hq + 2 Hkv) · D) -> rotated q (T, Hq, D), rotated k and v (T, Hkv, D), one pass."""
        if self.per_token:
            # One "sequence" of T tokens at positions 0..T-1 reading the per-token tables = explicit positions.
            q, k, v = ik.qkv_rotary(wqkv_out.unsqueeze(0), self.cos, self.sin, n_kv_heads, head_dim)
            return q[0], k[0], v[0]
        return ik.qkv_rotary(wqkv_out, self.cos, self.sin, n_kv_heads, head_dim, cu_seqlens=self.cu_seqlens,
                             max_seqlen=self.max_seqlen)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D), causal within each sequence."""
        if self.cache is not None:
            self.cache.write_prefill(layer_idx, k, v)
        return ik.flash_attn_varlen_func(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen,
                                         self.max_seqlen, causal=True)
