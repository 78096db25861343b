"""flash-attn's packed entry points and its padding helpers, as thin adapters over our attention.

  flash_attn_qkvpacked_func(qkv (B, S, 3, H, D), ...)                          -> (B, S, H, D)
  flash_attn_kvpacked_func(q (B, Sq, Hq, D), kv (B, Sk, 2, Hkv, D), ...)        -> (B, Sq, Hq, D)
  flash_attn_varlen_qkvpacked_func(qkv (total, 3, H, D), cu_seqlens, max_seqlen, ...)
  flash_attn_varlen_kvpacked_func(q (total_q, Hq, D), kv (total_k, 2, Hkv, D), cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, ...)
  unpad_input(hidden_states (B, S, ...), attention_mask (B, S))
      -> (hidden_states (total, ...), indices, cu_seqlens, max_seqlen_in_batch, seqused)
  pad_input(hidden_states (total, ...), indices, batch, seqlen) -> (B, S, ...), zeros at padding

Each packed function unbinds the packed tensor (views, no copy) and calls ``flash_attn_func`` /
``flash_attn_varlen_func`` with the same keyword options (dropout_p, softmax_scale, causal, window_size, softcap,
alibi_slopes, deterministic, return_attn_probs); autograd returns the gradient in the packed layout, as flash-attn
does. ``unpad_input`` reads the sequence lengths on the host (``max_seqlen_in_batch`` is a Python int, as in
flash-attn): call it once per batch, not per layer.
"""
from __future__ import annotations

import torch

from ..checks import check_tensor
from .attention import flash_attn_func, flash_attn_varlen_func


def _unbind_packed(name: str, packed: torch.Tensor, ndim: int, parts: int) -> tuple[torch.Tensor, ...]:
    check_tensor(name, packed, ndim=ndim)
    if packed.shape[-3] != parts:
        raise ValueError(f"{name} must hold {parts} tensors on dim -3, got shape {tuple(packed.shape)}")
    return packed.unbind(-3)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_qkvpacked_func: q, k, v packed as qkv (B, S, 3, H, D)."""
    q, k, v = _unbind_packed("qkv", qkv, 5, 3)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_kvpacked_func: q (B, Sq, Hq, D), k and v packed as kv (B, Sk, 2, Hkv, D)."""
    k, v = _unbind_packed("kv", kv, 5, 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn.flash_attn_varlen_qkvpacked_func: qkv (total, 3, H, D) over the sequences of cu_seqlens."""
    q, k, v = _unbind_packed("qkv", qkv, 4, 3)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_varlen_kvpacked_func: q (total_q, Hq, D), kv (total_k, 2, Hkv, D)."""
    k, v = _unbind_packed("kv", kv, 4, 2)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """flash_attn.bert_padding.unpad_input: the tokens of (B, S, ...) hidden_states where the (B, S) mask is set,
    packed in row order. Returns (hidden_states (total, ...), indices (total,) int64 into the flattened B·S tokens,
    cu_seqlens (B + 1,) int32, max_seqlen_in_batch int, seqused (B,) int32)."""
    if unused_mask is not None:
        raise NotImplementedError("unused_mask: tokens kept but not attended are not supported; pass None")
    check_tensor("hidden_states", hidden_states)
    check_tensor("attention_mask", attention_mask, ndim=2, device=hidden_states.device)
    if hidden_states.dim() < 2 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but hidden_states' (batch, seqlen) "
                         f"is {tuple(hidden_states.shape[:2])}")
    mask = attention_mask.bool()
    seqlens = mask.sum(dim=-1, dtype=torch.int32)
    indices = mask.reshape(-1).nonzero().reshape(-1)
    cu_seqlens = torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    return hidden_states.reshape(-1, *hidden_states.shape[2:])[indices], indices, cu_seqlens, max_seqlen, seqlens


def pad_input(hidden_states, indices, batch, seqlen):
    """flash_attn.bert_padding.pad_input: scatter (total, ...) rows back to (batch, seqlen, ...), zeros elsewhere."""
    check_tensor("hidden_states", hidden_states)
    check_tensor("indices", indices, dtypes=(torch.int64, torch.int32), ndim=1, device=hidden_states.device)
    if indices.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} entries but hidden_states has {hidden_states.shape[0]} rows")
    rest = hidden_states.shape[1:]
    out = hidden_states.new_zeros(batch * seqlen, *rest).index_copy(0, indices.long(), hidden_states)
    return out.reshape(batch, seqlen, *rest)
