"""Tensor + sequence parallelism for InternLM2 through torch.distributed.tensor.parallel.

The plan (tp ranks on a 1-D mesh; T tokens per micro-batch, T divisible by tp):
    tok_embeddings      vocabulary-parallel (rows sharded), output reduce-scattered to token shards (T/tp, H)
    attention_norm, ffn_norm, norm      sequence parallel: each rank normalizes its T/tp tokens with the full
                        (replicated) weight; the weight's gradient is summed over the tp ranks
    attention           input all-gathered to all T tokens; wqkv column-parallel: InternLM2 packs wqkv per KV
                        group ([g query heads, k, v] x n_kv_heads), so a dim-0 shard is n_kv_heads/tp whole GQA
                        groups and each rank attends with its own heads; wo row-parallel, output reduce-scattered
    feed_forward        input all-gathered; w1, w3 column-parallel, w2 row-parallel, reduce-scattered
    output (the head)   vocabulary-parallel fused linear cross-entropy (vocab_parallel_ce.py): the final norm's
                        output is marked sequence-sharded and ``ik.fused_linear_cross_entropy`` dispatches on the
                        DTensor weight, so the model code is unchanged and no rank holds full logits
Every sharded weight is a DTensor whose global tensor is the HF tensor (wqkv stays packed), so state dicts and
torch.distributed.checkpoint files keep the HF layout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def check_tp(config, tp: int, key: str = "tp") -> None:
    """ValueError naming ``key`` when ``tp`` cannot split this InternLM2Config."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"{key} must be an int >= 1, got {tp!r}")
    for name in ("num_key_value_heads", "intermediate_size", "vocab_size"):
        if getattr(config, name) % tp:
            raise ValueError(f"{key} ({tp}) must divide {name} ({getattr(config, name)}): each rank owns whole "
                             f"{'GQA groups' if name == 'num_key_value_heads' else 'slices'}")


def _sum_grad_over(group):
    """A hook on the incoming gradient (before it accumulates into .grad, so accumulation stays local)."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad
    return hook


def parallelize_internlm2(model: nn.Module, tp_mesh) -> nn.Module:
    """Apply the plan above in place to an InternLM2ForCausalLM (or ForScore, without its head) on ``tp_mesh``."""
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
    parallelize_module(model, tp_mesh, plan)
    for layer in model.model.layers:
        layer.attention.n_heads //= tp
        layer.attention.n_kv_heads //= tp
    group = tp_mesh.get_group()
    norms = [m.weight for name, m in model.named_modules() if name.endswith("norm") and hasattr(m, "weight")]
    for weight in norms:
        weight.register_hook(_sum_grad_over(group))
    if hasattr(model, "output"):
        model.output.weight = nn.Parameter(distribute_tensor(model.output.weight.detach(), tp_mesh, [Shard(0)]))

    def tokens_sharded(module, args, out):
        return DTensor.from_local(out, tp_mesh, [Shard(0)], run_check=False)

    model.model.norm.register_forward_hook(tokens_sharded)
    model.model.register_forward_pre_hook(_check_tokens(tp))
    return model


def _check_tokens(tp: int):
    def hook(module, args):
        input_ids = args[0]
        if input_ids.shape[0] % tp:
            raise ValueError(f"tensor parallelism needs the tokens of a micro-batch ({input_ids.shape[0]}) to be "
                             f"divisible by tp ({tp}): sequence parallelism splits them evenly")
    return hook


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full plain tensor (DTensors gathered; collective on their meshes)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in model.state_dict().items()}
