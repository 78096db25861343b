"""Tensor x data parallelism on a 2-D layout: 4 real gloo ranks, tp = 2 inside each of 2 data-parallel groups.

One 4-rank launch trains the micro model as FSDP2 + TP (torchtitan's 2-D layout), as replicated data
parallelism + TP (FSDP2's replicate layout: what ``mode = "ddp"`` runs with tp > 1), as ZeRO-2 + TP
(InternEvo's layout) and hybrid ZeRO-1 + TP (shard groups of one data-parallel rank), saves the FSDP2 + TP and ZeRO-2 + TP runs through DCP, loads the ZeRO-2 + TP checkpoint into
FSDP2 + TP, and records which batches each rank saw. The single-process checks (reference run, loading the 2-D
checkpoints in one process, HF export) run in the test process."""
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
    micro_model,
    rank_batches,
    reference_run,
    run_ranks,
)
from torch.distributed.tensor import DTensor

import internlm_kernels as ik
from internlm_kernels.distributed import ZeroDataParallel
from internlm_kernels.distributed.fsdp import fully_shard_blocks, no_sync
from internlm_kernels.distributed.mesh import data_parallel_mesh, parallel_mesh
from internlm_kernels.distributed.tensor_parallel import full_state_dict
from models.tensor_parallel import internlm2_blocks, parallelize_internlm2

TP, DP = 2, 2


def _optimizer_moments(optim_state: dict) -> dict:
    return {f"{name}.{k}": (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for name, s in optim_state["state"].items() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")}


def _clip(model):
    ik.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], CLIP)


def _train_2d(model, opt, dp_rank: int, dp_group, sync=None, clip=_clip):
    """5 steps of 2 accumulated micro-steps on this data-parallel rank's batches (the tp peers take the same);
    FSDP2 / ZeRO average the gradients over the data-parallel ranks, so each loss is pre-scaled by dp / N."""
    sync = sync or (lambda: no_sync(model))
    losses, seen = [], []
    for step in range(STEPS):
        mine, total = rank_batches(step, dp_rank, DP)
        seen.append(torch.cat([ids for ids, _ in mine]))
        local = torch.zeros((), dtype=torch.float64)
        for i, (ids, cu) in enumerate(mine):
            with sync() if i < len(mine) - 1 else contextlib.nullcontext():
                loss = model(ids, cu, labels=ids, loss_reduction="sum").loss
                (loss * DP / total).backward()
            local += loss.detach().double()
        clip(model)
        opt.step()
        opt.zero_grad()
        dist.all_reduce(local, group=dp_group)
        losses.append(float(local) / total)
    return (losses, full_state_dict(model)), seen   # ZeroDataParallel.state_dict waits for its gathers


def four_rank_cases(rank: int, world: int, out: str):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    results = {}
    dp_group = dist.new_subgroups_by_enumeration([[d * TP + t for d in range(DP)] for t in range(TP)])[0]
    for name, shard_size in (("fsdp_tp", None), ("replicate_tp", 1)):
        mesh = parallel_mesh(TP, shard_size)
        model = parallelize_internlm2(micro_model(), mesh["tp"])
        fully_shard_blocks(model, data_parallel_mesh(mesh), blocks=internlm2_blocks(model),
                           reshard_after_forward=shard_size != 1)
        opt = ik.FusedAdamW(model.parameters(), lr=LR, weight_decay=0.1)
        results[name], results[f"{name}_seen"] = _train_2d(model, opt, rank // TP, dp_group)
        results[f"{name}_placements"] = {n: tuple(map(str, p.placements)) for n, p in model.named_parameters()}
        if name == "fsdp_tp":
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=os.path.join(out, name))
            results[f"{name}_moments"] = _optimizer_moments(osd)

    # ZeRO-2 + TP: the data-parallel ranks of each tp position shard the tp shards' optimizer state and gradients.
    mesh = parallel_mesh(TP)
    zero = ZeroDataParallel(parallelize_internlm2(micro_model(), mesh["tp"]), lr=LR, weight_decay=0.1, stage=2,
                            bucket_numel=4000, mesh=mesh)
    results["zero2_tp"], results["zero2_tp_seen"] = _train_2d(zero, zero.optimizer, rank // TP, dp_group,
                                                              sync=zero.no_sync,
                                                              clip=lambda m: m.clip_grad_norm_(CLIP))
    state = {"model": zero.state_dict(), "optimizer": zero.optimizer.state_dict()}
    dcp.save(state, checkpoint_id=os.path.join(out, "zero2_tp"))
    results["zero2_tp_moments"] = _optimizer_moments(state["optimizer"])
    # ... and its checkpoint loads into FSDP2 + TP (the same 2-D layout of every tensor).
    mesh = parallel_mesh(TP)
    tp_model = parallelize_internlm2(micro_model(seed=1), mesh["tp"])
    fsdp = fully_shard_blocks(tp_model, data_parallel_mesh(mesh), blocks=internlm2_blocks(tp_model))
    fsdp_opt = ik.FusedAdamW(fsdp.parameters(), lr=LR, weight_decay=0.1)
    msd, osd = get_state_dict(fsdp, fsdp_opt)
    dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=os.path.join(out, "zero2_tp"))
    set_state_dict(fsdp, fsdp_opt, model_state_dict=msd, optim_state_dict=osd)
    results["fsdp_tp_from_zero2_tp"] = (full_state_dict(fsdp), _optimizer_moments(get_state_dict(fsdp, fsdp_opt)[1]))

    # Hybrid ZeRO-1 + TP: shard groups of one data-parallel rank, the reduced shards all-reduced across the two
    # replica groups (overlap off: the same numbers, blocking collectives).
    mesh = parallel_mesh(TP, shard_size=1)
    zero = ZeroDataParallel(parallelize_internlm2(micro_model(), mesh["tp"]), lr=LR, weight_decay=0.1, stage=1,
                            mesh=mesh, overlap=False)
    results["zero1_tp_hybrid"], results["zero1_tp_hybrid_seen"] = _train_2d(
        zero, zero.optimizer, rank // TP, dp_group, sync=zero.no_sync, clip=lambda m: m.clip_grad_norm_(CLIP))
    return results


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("two_d"))
    return run_ranks(four_rank_cases, TP * DP, out, timeout=240), out


@pytest.mark.parametrize("name", ["fsdp_tp", "replicate_tp", "zero2_tp", "zero1_tp_hybrid"])
def test_tp_x_dp_equals_single_process(four_ranks, name):
    results, _ = four_ranks
    want = reference_run(DP)
    for r in results:
        assert_close_run(r[name], want, float64_oracle(DP))
    # tp peers (ranks 2d, 2d + 1) saw the same batches, the two data-parallel groups different ones
    seen = [r[f"{name}_seen"] for r in results]
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))
    assert not torch.equal(seen[0][0], seen[2][0])
    if name.startswith("zero"):
        return
    # 2-D parameters: wqkv sharded over tp (by KV group) and over dp, wo row-parallel; norms over dp only
    # (FSDP2 shards a tp shard again on dim 0: _StridedShard; the replicate layout adds a replicated dim).
    placements = results[0][f"{name}_placements"]
    replicated = ("R",) if name == "replicate_tp" else ()
    assert placements["model.layers.0.attention.wqkv.weight"] == (*replicated, "_S(0, 2)", "S(0)")
    assert placements["model.layers.0.attention.wo.weight"] == (*replicated, "S(0)", "S(1)")
    assert placements["model.layers.0.ffn_norm.weight"] == (*replicated, "S(0)")


def test_zero2_tp_checkpoint_loads_into_fsdp_tp(four_ranks):
    results, _ = four_ranks
    for r in results:
        params, moments = r["fsdp_tp_from_zero2_tp"]
        assert params.keys() == r["zero2_tp"][1].keys()
        assert all(torch.equal(params[k], v) for k, v in r["zero2_tp"][1].items())
        assert moments.keys() == r["zero2_tp_moments"].keys()
        assert all(torch.equal(moments[k], v) for k, v in r["zero2_tp_moments"].items())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("name", ["fsdp_tp", "zero2_tp"])
def test_tp_x_dp_checkpoint_loads_in_one_process_and_exports(four_ranks, tmp_path, name):
    """2-D (dp 2 x tp 2) -> 1 process: model and optimizer state through DCP, then an HF export that loads back."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from models import InternLM2ForCausalLM

    results, out = four_ranks
    model = micro_model(seed=2)
    opt = ik.FusedAdamW(model.parameters(), lr=LR, weight_decay=0.1)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=os.path.join(out, name))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    saved_params = results[0][name][1]
    assert all(torch.equal(v, saved_params[k]) for k, v in model.state_dict().items())
    moments = _optimizer_moments(get_state_dict(model, opt)[1])
    assert moments.keys() == results[0][f"{name}_moments"].keys()
    assert all(torch.equal(moments[k], v) for k, v in results[0][f"{name}_moments"].items())
    model.save_pretrained(str(tmp_path / "hf"))
    again = InternLM2ForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert all(torch.equal(v, saved_params[k]) for k, v in again.state_dict().items())
