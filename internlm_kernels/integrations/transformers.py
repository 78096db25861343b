"""Hugging Face transformers integration: ``attn_implementation="internlm_kernels"``.

    from internlm_kernels.integrations import transformers as ik_hf
    ik_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="internlm_kernels")

``register()`` adds ``attention_forward`` to transformers' AttentionInterface and, under the same name, transformers'
own ``flash_attention_mask`` to the AttentionMaskInterface: like flash-attn, our kernel needs no dense mask, only
the 2-D padding mask when there is padding (None otherwise). ``attention_forward`` then picks, per call:

  * ``cu_seq_lens_q/k`` given (transformers' FlashAttentionKwargs): varlen over them, as given;
  * a 2-D padding mask: the valid tokens of each row are gathered into one packed sequence per row (queries aligned
    to the end of the keys, as with a KV cache), attended with the varlen kernel and scattered back (0 at padding);
  * ``position_ids`` restarting inside a row (several documents packed into one row, as in padding-free training):
    each run of consecutive positions is one sequence;
  * otherwise every row is one sequence: ``flash_attn_func`` on (B, S, H, D).
The index lists and cu_seqlens built from the mask or the position_ids are cached per tensor (also under
``torch.inference_mode()``), so their device sync happens once per forward, not once per layer.
"""
from __future__ import annotations

import torch

from .._tensor_cache import PerTensorCache
from ..ops.attention import flash_attn_func, flash_attn_varlen_func
from .patch import SUPPORTED, patch, unpatch  # noqa: F401  (model patching: ik.integrations.transformers.patch)

NAME = "internlm_kernels"


def register(name: str = NAME) -> None:
    """Make ``attn_implementation=name`` available to transformers models (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)


# The index lists and cu_seqlens built from position_ids or the padding mask need nonzero() (a device sync), so they
# are built once per forward, not once per layer. transformers builds these tensors anew for every forward and
# never modifies them in place, so under inference_mode (no version counter) they are reused on identity alone.
# Under CUDA graph capture they are refused: nonzero() cannot be recorded.
_segments_cache = PerTensorCache("position_ids → cu_seqlens", capturable=False, reuse_inference=True, size=4)
_padding_cache = PerTensorCache("padding mask → unpadded indices", capturable=False, reuse_inference=True, size=4)


def _segments(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """cu_seqlens (int32) of the runs of consecutive positions in each row of (batch or 1, S) position_ids, over the
    flattened batch · S tokens."""
    def compute():
        pos = position_ids.expand(batch, -1)
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1                      # (batch, S) a document starts here
        idx = starts.reshape(-1).nonzero().reshape(-1)
        return torch.cat((idx, idx.new_tensor([pos.numel()]))).to(torch.int32)
    return _segments_cache.get((position_ids,), batch, compute)


def _unpadding(attention_mask: torch.Tensor, Sq: int, Sk: int):
    """Token indices and cu_seqlens of the valid queries and keys of a (B, >= Sk) padding mask whose last Sk columns
    are the keys and last Sq columns the queries: (idx_q, cu_q, idx_k, cu_k)."""
    def compute():
        mask_k = attention_mask[:, -Sk:].bool()
        mask_q = mask_k[:, -Sq:]
        zero = torch.zeros(1, dtype=torch.int32, device=attention_mask.device)
        return (mask_q.reshape(-1).nonzero().reshape(-1), torch.cat((zero, mask_q.sum(1).cumsum(0).to(torch.int32))),
                mask_k.reshape(-1).nonzero().reshape(-1), torch.cat((zero, mask_k.sum(1).cumsum(0).to(torch.int32))))
    return _padding_cache.get((attention_mask,), (Sq, Sk), compute)


def _varlen_padded(q, k, v, attention_mask, **kw):
    """Attention over the valid tokens of each padded row. q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), attention_mask
    (B, Sk) bool with the queries at its last Sq columns."""
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    idx_q, cu_q, idx_k, cu_k = _unpadding(attention_mask, Sq, Sk)
    out = flash_attn_varlen_func(q.reshape(B * Sq, Hq, D)[idx_q], k.reshape(B * Sk, *k.shape[2:])[idx_k],
                                 v.reshape(B * Sk, *v.shape[2:])[idx_k], cu_q, cu_k, Sq, Sk, **kw)
    return out.new_zeros(B * Sq, Hq, D).index_copy(0, idx_q, out).reshape(B, Sq, Hq, D)


def _given(hint, default):
    # `hint or default` would read a tensor hint (a device sync); hints are passed through unread.
    return default if hint is None else hint


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
                      s_aux: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) -> ((B, Sq, Hq, D), None)."""
    if s_aux is not None:
        raise NotImplementedError("s_aux (attention sinks) is not supported by the internlm_kernels attention")
    if kwargs.get("output_attentions", False):
        raise NotImplementedError("output_attentions=True: flash attention never forms the attention weights")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be the 2-D padding mask of the '{NAME}' mask function, got shape "
                         f"{tuple(attention_mask.shape)} (register() the mask function with the attention)")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))              # (B, S, H, D)
    B, Sq = q.shape[:2]
    Sk = k.shape[1]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = (-1, -1)
    if sliding_window is not None and Sk > sliding_window:
        # transformers counts the current token in the window (as its flash-attention path does)
        window = (sliding_window - 1, sliding_window - 1)
    kw = dict(dropout_p=dropout, softmax_scale=scaling, causal=causal, window_size=window, softcap=softcap or 0.0)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        out = flash_attn_varlen_func(q.reshape(B * Sq, *q.shape[2:]), k.reshape(B * Sk, *k.shape[2:]),
                                     v.reshape(B * Sk, *v.shape[2:]), cu_q.to(torch.int32), cu_k.to(torch.int32),
                                     _given(kwargs.get("max_length_q"), Sq), _given(kwargs.get("max_length_k"), Sk),
                                     **kw)
        return out.reshape(B, Sq, *out.shape[1:]), None
    if attention_mask is not None:
        return _varlen_padded(q, k, v, attention_mask, **kw), None
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and Sq == Sk and Sq > 1:
        cu = _segments(position_ids, B)
        out = flash_attn_varlen_func(q.reshape(B * Sq, *q.shape[2:]), k.reshape(B * Sk, *k.shape[2:]),
                                     v.reshape(B * Sk, *v.shape[2:]), cu, cu, Sq, Sk, **kw)
        return out.reshape(B, Sq, *out.shape[1:]), None
    return flash_attn_func(q, k, v, **kw), None
