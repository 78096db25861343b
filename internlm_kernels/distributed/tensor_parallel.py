"""Tensor + sequence parallelism for InternLM2 through torch.distributed.tensor.parallel.

The plan (tp ranks on a 1-D mesh; T packed tokens per micro-batch, padded to a multiple of tp with one document
of ignored tokens when needed):
    tok_embeddings      vocabulary-parallel (rows sharded), output reduce-scattered to token shards (T/tp, H)
    attention_norm, ffn_norm, norm      sequence parallel: each rank normalizes its T/tp tokens with the full
                        (replicated, plain-tensor) weight; the weight's gradient is summed over the tp ranks by an
                        autograd identity in the norm's forward (SequenceParallelRMSNorm), so it survives FSDP2
                        (which re-creates the unsharded weight every forward) and DDP-style replication
    attention           input all-gathered to all T tokens; wqkv column-parallel: InternLM2 packs wqkv per KV
                        group ([g query heads, k, v] x n_kv_heads), so a dim-0 shard is n_kv_heads/tp whole GQA
                        groups and each rank attends with its own heads; wo row-parallel, output reduce-scattered
    feed_forward        input all-gathered; w1, w3 column-parallel, w2 row-parallel, reduce-scattered
    output (the head)   vocabulary-parallel fused linear cross-entropy (vocab_parallel_ce.py): the final norm's
                        output is marked sequence-sharded and ``ik.fused_linear_cross_entropy`` dispatches on the
                        DTensor weight, so the model code is unchanged and no rank holds full logits
    score_head          (InternLM2ForScore) replicated, a plain tensor: its input is all-gathered to all T tokens,
                        so every rank computes the same values and scores and the same head gradient (no reduction;
                        the all-gather's backward hands each rank its token slice of the identical input gradient);
                        the padding document's value and score are dropped from the output
Every sharded weight is a DTensor whose global tensor is the HF tensor (wqkv stays packed), so state dicts and
torch.distributed.checkpoint files keep the HF layout.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from ..nn import RMSNorm
from ..ops.rms_norm import rms_norm


def check_tp(config, tp: int, key: str = "tp") -> None:
    """ValueError naming ``key`` when ``tp`` cannot split this InternLM2Config."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"{key} must be an int >= 1, got {tp!r}")
    for name in ("num_key_value_heads", "intermediate_size", "vocab_size"):
        if getattr(config, name) % tp:
            raise ValueError(f"{key} ({tp}) must divide {name} ({getattr(config, name)}): each rank owns whole "
                             f"{'GQA groups' if name == 'num_key_value_heads' else 'slices'}")


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
    ``tp_group``. ``parallelize_internlm2`` turns the model's norms into it in place (``__class__``)."""
    tp_group = None

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        weight = _SumGradOverGroup.apply(self.weight, self.tp_group)
        return rms_norm(x, weight, self.eps, residual, prenorm, residual_in_fp32, self.offset, self.casting_mode)


def parallelize_internlm2(model: nn.Module, tp_mesh) -> nn.Module:
    """Apply the plan above in place to an InternLM2ForCausalLM or InternLM2ForScore on ``tp_mesh`` (a
    1-D mesh, or the "tp" dimension of a ``mesh.parallel_mesh``: data parallelism over the other dimensions is
    then applied on top, e.g. ``fully_shard_blocks(model, data_parallel_mesh(mesh))``)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    check_tp(model.config, tp)
    tokens_to_all = dict(desired_input_layouts=(Replicate(),), use_local_output=True)
    plan = {
        "model.tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0)),
        "model.layers.*.attention": PrepareModuleInput(input_layouts=(Shard(0), None),
                                                       desired_input_layouts=(Replicate(), None),
                                                       use_local_output=True),
        "model.layers.*.attention.wqkv": ColwiseParallel(),
        "model.layers.*.attention.wo": RowwiseParallel(output_layouts=Shard(0)),
        "model.layers.*.feed_forward": PrepareModuleInput(input_layouts=(Shard(0),), **tokens_to_all),
        "model.layers.*.feed_forward.w1": ColwiseParallel(),
        "model.layers.*.feed_forward.w3": ColwiseParallel(),
        "model.layers.*.feed_forward.w2": RowwiseParallel(output_layouts=Shard(0)),
    }
    if hasattr(model, "score_head"):
        plan["score_head"] = PrepareModuleInput(input_layouts=(Shard(0),), **tokens_to_all)
    parallelize_module(model, tp_mesh, plan)
    for layer in model.model.layers:
        layer.attention.n_heads //= tp
        layer.attention.n_kv_heads //= tp
    for name, module in model.named_modules():
        if name.endswith("norm"):
            if type(module) is not RMSNorm:
                raise NotImplementedError(f"{name}: sequence parallelism takes internlm_kernels.nn.RMSNorm norms, "
                                          f"got {type(module).__name__}")
            module.__class__ = SequenceParallelRMSNorm
            module.tp_group = tp_mesh.get_group()
    if hasattr(model, "output"):
        model.output.weight = nn.Parameter(distribute_tensor(model.output.weight.detach(), tp_mesh, [Shard(0)]))

    def tokens_sharded(module, args, out):
        return DTensor.from_local(out, tp_mesh, [Shard(0)], run_check=False)

    model.model.norm.register_forward_hook(tokens_sharded)
    pad, unpad = _pad_tokens(model, tp)
    model.register_forward_pre_hook(pad, with_kwargs=True)
    model.register_forward_hook(unpad)
    return model


def _pad_tokens(model: nn.Module, tp: int):
    """(forward pre-hook, forward hook): sequence parallelism splits the tokens evenly, so a packed batch whose
    length is not a multiple of tp gets one more document of pad tokens with label -100 (no loss, no attention to
    the real documents); a score model's output then drops that document's values and score (scores are read at
    each document's last token, and the pad document is a document)."""
    import inspect

    signature = inspect.signature(model.forward)
    real = {}    # the batch being run: its unpadded token count T and document count B (None: not padded)

    def pad_hook(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        a = bound.arguments
        ids = a["input_ids"]
        if ids.dim() != 1:
            raise ValueError("input_ids: tensor parallelism takes packed (T,) tokens with cu_seqlens")
        T = ids.shape[0]
        pad = -T % tp
        real["shape"] = None
        if pad == 0:
            return None
        cu = a.get("cu_seqlens")
        if cu is None:
            cu = torch.tensor([0, T], dtype=torch.int32, device=ids.device)
        a["input_ids"] = torch.cat([ids, ids.new_zeros(pad)])
        a["cu_seqlens"] = torch.cat([cu, cu.new_full((1,), T + pad)])
        if a.get("labels") is not None:
            a["labels"] = torch.cat([a["labels"], a["labels"].new_full((pad,), -100)])
        if a.get("position_ids") is not None:
            a["position_ids"] = torch.cat([a["position_ids"], a["position_ids"].new_zeros(pad)])
        if a.get("max_seqlen") is not None:
            a["max_seqlen"] = max(a["max_seqlen"], pad)
        real["shape"] = (T, cu.shape[0] - 1)
        return (), dict(a)

    def unpad_hook(module, args, out):
        shape, real["shape"] = real.get("shape"), None
        if shape is None or not hasattr(out, "scores"):
            return None
        T, B = shape
        return dataclasses.replace(out, values=out.values[:T], scores=out.scores[:B])
    return pad_hook, unpad_hook


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full plain tensor (DTensors gathered; collective on their meshes)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in model.state_dict().items()}
