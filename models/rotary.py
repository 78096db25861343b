"""RoPE cos/sin tables for InternLM2, cached per device.

The table is a pure function of (theta, scaling, head_dim, length) built by ``rotary_cos_sin`` of
internlm_kernels (the same builder the rotary kernel is tested against): inv_freq_i = base^(-2i/D), linear scaling
divides positions by the factor, and dynamic NTK raises the base once a sequence is longer than
max_position_embeddings: base = theta · (factor · L / max_pos − (factor − 1))^(D / (D − 2)).

Which L: as HF InternLM2 computes it from the sequence length, L is the longest sequence of the batch (packed: the
longest document; explicit position ids: the largest position + 1; decoding: the longest cached sequence + 1), so
every token of a batch uses one base. Up to max_position_embeddings the base is theta and one table (grown by
doubling) serves every length; beyond it the table depends on L and is rebuilt when L changes.
"""
from __future__ import annotations

import torch

from internlm_kernels.reference import rotary_cos_sin

from .config import InternLM2Config


class RotaryTables:
    """cos/sin tables (rows, head_dim / 2) float32; not module state, so checkpoints carry none of it."""

    def __init__(self, config: InternLM2Config):
        scaling = config.rope_scaling or {}
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling_type = scaling.get("type")
        self.factor = scaling.get("factor", 1.0)
        self.max_position_embeddings = config.max_position_embeddings
        self._tables: dict[torch.device, tuple[bool, int, torch.Tensor, torch.Tensor]] = {}

    def _ntk(self, seq_len: int) -> bool:
        return self.scaling_type == "dynamic" and seq_len > self.max_position_embeddings

    def _build(self, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_cos_sin(rows, self.head_dim, self.theta, self.scaling_type, self.factor,
                              self.max_position_embeddings, device=device, dtype=torch.float32)

    def tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin with at least ``seq_len`` rows, for a batch whose longest sequence is ``seq_len``."""
        device = torch.device(device)
        ntk = self._ntk(seq_len)
        cached = self._tables.get(device)
        if cached is not None:
            was_ntk, rows, cos, sin = cached
            if ntk == was_ntk and (rows == seq_len if ntk else rows >= seq_len):
                return cos, sin
        if ntk:
            rows = seq_len
        else:
            rows = 1 << max(seq_len - 1, 0).bit_length()                  # next power of two
            if self.scaling_type == "dynamic":                              # stay on the un-scaled base
                rows = min(rows, self.max_position_embeddings)
        cos, sin = self._build(rows, device)
        self._tables[device] = (ntk, rows, cos, sin)
        return cos, sin
