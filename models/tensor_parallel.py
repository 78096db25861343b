"""InternLM2's tensor + sequence parallel plan and its block list: the model's attribute names, kept beside the model;
the generic machinery (sequence-parallel norms, token padding, the vocabulary-parallel loss) is the kernel library's
(``internlm_kernels.distributed``).

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

from torch import nn

from internlm_kernels.distributed.tensor_parallel import make_sequence_parallel, register_token_padding


def internlm2_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an InternLM2 causal LM or score model (``model.model.layers``): the FSDP2 units
    (``internlm_kernels.distributed.fsdp.fully_shard_blocks(model, mesh, blocks=...)``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("model has no model.layers ModuleList (not an InternLM2 model)")
    return list(layers)


def check_tp(config, tp: int, key: str = "tp") -> None:
    """ValueError naming ``key`` when ``tp`` cannot split this InternLM2Config."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"{key} must be an int >= 1, got {tp!r}")
    for name in ("num_key_value_heads", "intermediate_size", "vocab_size"):
        if getattr(config, name) % tp:
            raise ValueError(f"{key} ({tp}) must divide {name} ({getattr(config, name)}): each rank owns whole "
                             f"{'GQA groups' if name == 'num_key_value_heads' else 'slices'}")


def parallelize_internlm2(model: nn.Module, tp_mesh) -> nn.Module:
    """Apply the plan above in place to an InternLM2ForCausalLM or InternLM2ForScore on ``tp_mesh`` (a
    1-D mesh, or the "tp" dimension of an ``internlm_kernels.distributed.parallel_mesh``: data parallelism over
    the other dimensions is then applied on top, e.g. ``fully_shard_blocks(model, data_parallel_mesh(mesh),
    blocks=internlm2_blocks(model))``)."""
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
    make_sequence_parallel([m for name, m in model.named_modules() if name.endswith("norm")], tp_mesh.get_group())
    if hasattr(model, "output"):
        model.output.weight = nn.Parameter(distribute_tensor(model.output.weight.detach(), tp_mesh, [Shard(0)]))

    def tokens_sharded(module, args, out):
        return DTensor.from_local(out, tp_mesh, [Shard(0)], run_check=False)

    model.model.norm.register_forward_hook(tokens_sharded)
    register_token_padding(model, tp)
    return model
