"""Generic tensor + sequence parallel machinery for packed models (``input_ids`` (T,) with ``cu_seqlens``), on
torch.distributed.tensor.parallel. The plan of a particular model (which attribute is column- or row-parallel) lives
beside the model: ``models.tensor_parallel.parallelize_internlm2`` for InternLM2, built from these pieces:
    SequenceParallelRMSNorm / make_sequence_parallel   norms over this rank's T/tp tokens with the replicated
                        (plain-tensor) weight; its gradient is summed over the tp ranks by an autograd identity in
                        the norm's forward, so it survives FSDP2 (which re-creates the unsharded weight every
                        forward) and DDP-style replication
    register_token_padding   sequence parallelism splits the tokens evenly: a packed batch whose length is not a
                        multiple of tp gets one more document of ignored tokens (and a score model's output drops it)
    full_state_dict     every tensor gathered to a full plain tensor
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from ..nn import RMSNorm
from ..ops.rms_norm import rms_norm


class _SumGradOverGroup(torch.autograd.Function):
    """Identity on a weight in the forward; its gradient summed over ``group`` in the backward. Part of the
    autograd graph (not a hook on the parameter), so it holds for whatever tensor the module reads as its
    weight: FSDP2 swaps in a freshly gathered tensor every forward, where a hook on the original would be lost."""

    @staticmethod
    def forward(ctx, weight, group):
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SequenceParallelRMSNorm(RMSNorm):
    """An ``internlm_kernels.nn.RMSNorm`` whose input is this rank's T/tp tokens (sequence parallel): the same
    parameters and state dict, the weight replicated on the tp ranks, its gradient (a sum over tokens) summed over
    ``tp_group``. ``make_sequence_parallel`` turns a model's norms into it in place (``__class__``)."""
    tp_group = None

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        weight = _SumGradOverGroup.apply(self.weight, self.tp_group)
        return rms_norm(x, weight, self.eps, residual, prenorm, residual_in_fp32, self.offset, self.casting_mode)


def make_sequence_parallel(norms, tp_group) -> None:
    """Turn each ``internlm_kernels.nn.RMSNorm`` of ``norms`` into a ``SequenceParallelRMSNorm`` over
    ``tp_group``, in place (same parameters and state dict)."""
    for module in norms:
        if type(module) is not RMSNorm:
            raise NotImplementedError(f"sequence parallelism takes internlm_kernels.nn.RMSNorm norms, got "
                                      f"{type(module).__name__}")
        module.__class__ = SequenceParallelRMSNorm
        module.tp_group = tp_group


def register_token_padding(model: nn.Module, tp: int) -> None:
    """Pad every packed batch of ``model``'s forward to a multiple of ``tp`` tokens (hooks; see ``_pad_tokens``)."""
    pad, unpad = _pad_tokens(model, tp)
    model.register_forward_pre_hook(pad, with_kwargs=True)
    model.register_forward_hook(unpad)


def _pad_tokens(model: nn.Module, tp: int):
    """(forward pre-hook, forward hook): sequence parallelism splits the tokens evenly, so a batch whose token count
    T is not a multiple of tp gets one more document of pad tokens with label -100 (no loss, no attention to the
    real documents); the output then drops what belongs to that document: its per-token values, log-probs and
    losses (``loss_reduction="none"``), and its score (scores are read at each document's last token, and the pad
    document is a document).
    Packed (T,) input gains the document at the end of ``input_ids``; padded (B, S) input with ``attention_mask``
    gains it as row B (widened to ``pad`` columns if S is shorter), and T is the mask's sum, read on the host (as
    the model's own packing of a padded batch reads it)."""
    import inspect

    signature = inspect.signature(model.forward)
    real = {}    # the batch being run: (T, B) packed or (B, S) padded, and which (None: not padded)

    def pad_packed(a, ids, pad):
        T = ids.shape[0]
        cu = a.get("cu_seqlens")
        if cu is None:
            cu = torch.tensor([0, T], dtype=torch.int32, device=ids.device)
        a["input_ids"] = torch.cat([ids, ids.new_zeros(pad)])
        a["cu_seqlens"] = torch.cat([cu, cu.new_full((1,), T + pad)])
        if a.get("labels") is not None:
            a["labels"] = torch.cat([a["labels"], a["labels"].new_full((pad,), -100)])
        if a.get("position_ids") is not None:
            a["position_ids"] = torch.cat([a["position_ids"], a["position_ids"].new_zeros(pad)])
        return "packed", (T, cu.shape[0] - 1)

    def pad_padded(a, ids, pad):
        B, S = ids.shape
        width = max(S, pad)

        def grow(t, fill):                                     # (B, S) -> (B + 1, width)
            t = torch.nn.functional.pad(t, (0, width - S), value=fill)
            return torch.cat([t, t.new_full((1, width), fill)])
        mask = a.get("attention_mask")
        mask = grow(ids.new_ones(B, S) if mask is None else mask, 0)
        mask[B, :pad] = 1
        a["input_ids"], a["attention_mask"] = grow(ids, 0), mask
        if a.get("labels") is not None:
            a["labels"] = grow(a["labels"], -100)
        if a.get("position_ids") is not None:
            a["position_ids"] = grow(a["position_ids"], 0)
        return "padded", (B, S)

    def pad_hook(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        a = bound.arguments
        ids = a["input_ids"]
        real["shape"] = None
        if ids.dim() == 1:
            T = ids.shape[0]
        elif ids.dim() == 2:
            mask = a.get("attention_mask")
            T = ids.numel() if mask is None else int(mask.sum())
        else:
            raise ValueError("input_ids: tensor parallelism takes packed (T,) tokens with cu_seqlens or a padded "
                             "(B, S) batch")
        pad = -T % tp
        if pad == 0:
            return None
        real["shape"] = (pad_packed if ids.dim() == 1 else pad_padded)(a, ids, pad)
        if a.get("max_seqlen") is not None:
            a["max_seqlen"] = max(a["max_seqlen"], pad)
        return (), dict(a)

    def unpad_hook(module, args, out):
        shape, real["shape"] = real.get("shape"), None
        if shape is None:
            return None
        layout, (n, m) = shape
        per_token = (lambda t: t[:n]) if layout == "packed" else (lambda t: t[:n, :m])
        changes = {}
        for name in ("values", "logprobs", "loss"):
            t = getattr(out, name, None)
            if t is not None and t.dim() >= 1:
                changes[name] = per_token(t)
        if getattr(out, "scores", None) is not None:
            changes["scores"] = out.scores[:m if layout == "packed" else n]
        return dataclasses.replace(out, **changes)
    return pad_hook, unpad_hook


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full plain tensor (DTensors gathered; collective on their meshes)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in model.state_dict().items()}
