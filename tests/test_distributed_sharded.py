"""FSDP2 per block, tensor + sequence parallelism and DCP checkpoints across layouts, on real gloo ranks.

One 2-rank launch trains FSDP2, TP and ZeRO-2 and writes their checkpoints; the single-process checks (reference
runs, loading 2 -> 1, HF export) run in the test process."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distributed_harness import (
    CLIP,
    LR,
    STEPS,
    assert_close_run,
    float64_oracle,
    global_loss,
    micro_model,
    rank_batches,
    reference_run,
    run_ranks,
)
from torch.distributed.tensor import DTensor

import internlm_kernels as ik
from internlm_kernels.distributed import ZeroDataParallel
from internlm_kernels.distributed.fsdp import fsdp_mesh, fully_shard_blocks, no_sync
from internlm_kernels.distributed.tensor_parallel import full_state_dict
from models.tensor_parallel import internlm2_blocks, parallelize_internlm2


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _optimizer_moments(optim_state: dict) -> dict:
    return {f"{name}.{k}": _full(v).detach().clone() for name, s in optim_state["state"].items()
            for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")}


def _clip(model):
    ik.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], CLIP)


def _train(model, opt, rank, dp, sync_ctx, params_of, run_world, clip=_clip):
    """5 steps, 2 accumulated micro-steps; the gradient mean over dp ranks is done by the mode."""
    losses = []
    for step in range(STEPS):
        mine, total = rank_batches(step, rank if dp > 1 else 0, run_world)
        local = 0.0
        for i, (ids, cu) in enumerate(mine):
            with sync_ctx() if i < len(mine) - 1 else contextlib.nullcontext():
                loss = model(ids, cu, labels=ids, loss_reduction="sum").loss
                (loss * dp / total).backward()
            local += float(loss.detach())
        clip(model)
        opt.step()
        opt.zero_grad()
        losses.append((global_loss(local) / dist.get_world_size() * dp) / total)
    return losses, params_of(model)


def two_rank_cases(rank: int, world: int, out: str):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    results = {}
    # FSDP2, one unit per block, explicit prefetch; FusedAdamW and clip_grad_norm_ on DTensor parameters.
    model = micro_model()
    fully_shard_blocks(model, fsdp_mesh(), blocks=internlm2_blocks(model))
    opt = ik.FusedAdamW(model.parameters(), lr=LR, weight_decay=0.1)
    results["fsdp"] = _train(model, opt, rank, world, lambda: no_sync(model), full_state_dict, world)
    assert all(isinstance(p, DTensor) for p in model.parameters())

    # Tensor + sequence parallel over both ranks (dp = 1: both ranks see every micro-batch).
    model = parallelize_internlm2(micro_model(), init_device_mesh("cpu", (world,)))
    opt = ik.FusedAdamW(model.parameters(), lr=LR, weight_decay=0.1)
    results["tp"] = _train(model, opt, rank, 1, contextlib.nullcontext, full_state_dict, 1)
    results["tp_wqkv_local"] = model.model.layers[0].attention.wqkv.weight.to_local().detach().clone()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=os.path.join(out, "tp"))
    results["tp_moments"] = _optimizer_moments(osd)

    # ZeRO-2 over both ranks; its checkpoint loads into FSDP2 (zero2 -> fsdp) on the same ranks.
    zero = ZeroDataParallel(micro_model(), lr=LR, weight_decay=0.1, stage=2, bucket_numel=4000)
    results["zero2"] = _train(zero, zero.optimizer, rank, world, zero.no_sync,
                              lambda m: {k: v.clone() for k, v in m.state_dict().items()}, world,
                              clip=lambda m: m.clip_grad_norm_(CLIP))
    state = {"model": zero.state_dict(), "optimizer": zero.optimizer.state_dict()}
    dcp.save(state, checkpoint_id=os.path.join(out, "zero2"))
    results["zero2_moments"] = _optimizer_moments(state["optimizer"])

    fsdp = micro_model(seed=1)
    fully_shard_blocks(fsdp, fsdp_mesh(), blocks=internlm2_blocks(fsdp))
    fsdp_opt = ik.FusedAdamW(fsdp.parameters(), lr=LR, weight_decay=0.1)
    from torch.distributed.checkpoint.state_dict import set_state_dict

    msd, osd = get_state_dict(fsdp, fsdp_opt)
    dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=os.path.join(out, "zero2"))
    set_state_dict(fsdp, fsdp_opt, model_state_dict=msd, optim_state_dict=osd)
    results["fsdp_from_zero2"] = (full_state_dict(fsdp), _optimizer_moments(get_state_dict(fsdp, fsdp_opt)[1]))
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharded"))
    return run_ranks(two_rank_cases, 2, out), out


def test_fsdp_and_zero2_equal_single_process(two_ranks):
    results, _ = two_ranks
    want = reference_run(2)
    for r in results:
        assert_close_run(r["fsdp"], want, float64_oracle(2))
        assert_close_run(r["zero2"], want, float64_oracle(2))


def test_tensor_parallel_equals_single_process(two_ranks):
    results, _ = two_ranks
    want = reference_run(1)
    for r in results:
        assert_close_run(r["tp"], want, float64_oracle(1))
    # wqkv is split by KV group: rank r holds groups [r], i.e. rows [r * (g + 2) * D, (r + 1) * (g + 2) * D).
    full = results[0]["tp"][1]["model.layers.0.attention.wqkv.weight"]
    rows = full.shape[0] // 2
    assert torch.equal(torch.cat([results[0]["tp_wqkv_local"], results[1]["tp_wqkv_local"]]), full)
    assert results[1]["tp_wqkv_local"].shape[0] == rows


def test_zero2_checkpoint_loads_into_fsdp(two_ranks):
    results, _ = two_ranks
    for r in results:
        params, moments = r["fsdp_from_zero2"]
        zero_params = r["zero2"][1]
        assert all(torch.equal(params[k], zero_params[k]) for k in zero_params)
        assert moments.keys() == r["zero2_moments"].keys()
        assert all(torch.equal(moments[k], r["zero2_moments"][k]) for k in moments)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("layout", ["zero2", "tp"])
def test_two_rank_checkpoint_loads_in_one_process_and_exports(two_ranks, layout, tmp_path):
    """2 -> 1: the sharded DCP state loads into a plain model + FusedAdamW; the HF export loads in transformers'
    layout (wqkv packed as HF keeps it)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from models import InternLM2ForCausalLM

    results, out = two_ranks
    model = micro_model(seed=2)
    opt = ik.FusedAdamW(model.parameters(), lr=LR, weight_decay=0.1)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=os.path.join(out, layout))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    saved_params = results[0][layout][1]
    assert all(torch.equal(v, saved_params[k]) for k, v in model.state_dict().items())
    moments = _optimizer_moments(get_state_dict(model, opt)[1])
    assert all(torch.equal(moments[k], v) for k, v in results[0][f"{layout}_moments"].items())
    model.save_pretrained(str(tmp_path / "hf"))
    again = InternLM2ForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert all(torch.equal(v, saved_params[k]) for k, v in again.state_dict().items())


def test_tp_must_split_whole_kv_groups():
    from models import InternLM2Config
    from models.tensor_parallel import check_tp

    config = InternLM2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                             num_attention_heads=8, num_key_value_heads=2)
    check_tp(config, 2)
    with pytest.raises(ValueError, match=r"parallel\.tp \(4\) must divide num_key_value_heads \(2\)"):
        check_tp(config, 4, key="parallel.tp")
    with pytest.raises(ValueError, match="tp must be an int"):
        check_tp(config, 0)
