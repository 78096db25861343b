"""The attention of InternLM2's remote-code model (``trust_remote_code=True``) on our kernels.

The remote ``InternLM2Attention`` owns a packed ``wqkv`` (rows grouped per KV head: g query heads, one key head,
one value head) and ``wo``, and is called by its decoder layer as ``attention(hidden_states, attention_mask,
position_ids, past_key_value, output_attentions, use_cache, ...) -> (out, attn_weights, present)``. Its mask is what
the remote model built for its configured implementation: a 4-D additive (B, 1, Sq, Sk) causal mask (eager, sdpa),
the 2-D padding mask (flash_attention_2) or None.

Our forward splits and rotates q/k in one kernel (``ik.qkv_rotary``) with RoPE tables from the model's config
(theta, linear or dynamic NTK scaling, as the remote rotary classes compute them) read at each token's position,
then runs ``flash_attn_varlen_func``: over the valid tokens of each row when the mask shows padding, else over the
runs of consecutive ``position_ids`` (padding-free packing: each document attends only to itself). With a KV cache
(generation) or ``output_attentions`` the remote forward runs unchanged (with our RoPE when ``rope`` is patched).
"""
from __future__ import annotations

import torch

from .._tensor_cache import PerTensorCache
from ..nn import RotaryEmbedding
from ..ops.attention import flash_attn_func, flash_attn_varlen_func
from ..ops.rotary import qkv_rotary
from .transformers import _segments, _varlen_padded

# transformers builds the mask anew for each forward (nothing modifies it in place): identity reuse is safe.
_padding_cache = PerTensorCache("InternLM2 padding mask", capturable=False, reuse_inference=True, size=4)


def _padding_mask(attention_mask: torch.Tensor | None, key_len: int) -> torch.Tensor | None:
    """The (B, key_len) bool key mask when the remote mask shows padding, else None (one device sync per mask)."""
    if attention_mask is None:
        return None

    def compute():
        if attention_mask.dim() == 2:
            keep = attention_mask[:, -key_len:].bool()
        else:  # (B, 1, Sq, Sk): the last query row sees every valid key (causal), padded keys are masked in all rows
            row = attention_mask[:, 0, -1, :key_len]
            keep = row if row.dtype == torch.bool else row == 0
        return None if bool(keep.all()) else keep
    return _padding_cache.get((attention_mask,), (key_len,), compute)


def _rope_tables(self, seqlen: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rope = getattr(self, "_ik_rope", None)
    if rope is None:
        config = self.config
        # The remote config's rope_scaling ({"type": "linear" | "dynamic", "factor": f}); transformers 5 folds it
        # into rope_parameters (rope_type "default" when unscaled, rope_theta inside).
        scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
        theta = getattr(config, "rope_theta", None) or scaling.get("rope_theta", 10000.0)
        kind = scaling.get("type") or scaling.get("rope_type")
        rope = RotaryEmbedding(self.head_dim, theta=float(theta), scaling_type=None if kind == "default" else kind,
                               scaling_factor=float(scaling.get("factor", 1.0)),
                               max_position_embeddings=config.max_position_embeddings)
        self._ik_rope = rope
    return rope(seqlen, device)


def make_attention_forward(original):
    """InternLM2Attention.forward on our kernels; ``original`` (the remote forward) serves the KV-cache path."""
    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        if past_key_value is not None or use_cache or output_attentions:
            return original(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_value=past_key_value, output_attentions=output_attentions, use_cache=use_cache,
                            **kwargs)
        return _attention(self, hidden_states, attention_mask, position_ids)
    forward._ik_original = original
    return forward


def _attention(self, hidden_states, attention_mask, position_ids):
    """hidden_states (B, S, hidden) -> (wo(attention), None, None)."""
    B, S, _ = hidden_states.shape
    n_kv, D = self.num_key_value_heads, self.head_dim
    cos, sin = _rope_tables(self, max(S, self.config.max_position_embeddings), hidden_states.device)
    wqkv_out = self.wqkv(hidden_states)
    if position_ids is None:
        q, k, v = qkv_rotary(wqkv_out, cos, sin, n_kv, D)
    else:
        # One table row per token (its position), read by the packed (B·S) sequence at positions 0..B·S-1.
        pos = position_ids.expand(B, S).reshape(-1)
        q, k, v = qkv_rotary(wqkv_out.reshape(1, B * S, -1), cos[pos], sin[pos], n_kv, D)
    q, k, v = q.view(B, S, -1, D), k.view(B, S, n_kv, D), v.view(B, S, n_kv, D)
    kw = dict(causal=True, softmax_scale=D ** -0.5)
    keep = _padding_mask(attention_mask, S)
    if keep is not None:
        out = _varlen_padded(q, k, v, keep, **kw)
    elif position_ids is None:
        out = flash_attn_func(q, k, v, **kw)
    else:  # documents = runs of consecutive positions; cached per position_ids tensor (one sync per forward)
        cu = _segments(position_ids, B)
        out = flash_attn_varlen_func(q.reshape(B * S, -1, D), k.reshape(B * S, n_kv, D), v.reshape(B * S, n_kv, D),
                                     cu, cu, S, S, **kw)
    return self.wo(out.reshape(B, S, -1)), None, None
