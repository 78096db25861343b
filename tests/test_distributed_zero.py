"""Hybrid ZeRO on real gloo ranks: every variant trains exactly like one process, and the recorded collective
schedule shows the overlap (reduce-scatter inside the backward, each gather waited at its bucket's first use,
buckets in forward use order)."""
from __future__ import annotations

import contextlib

import pytest
import torch
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

from internlm_kernels.distributed import ZeroDataParallel

# Forward use order of the micro model: the loss reads output.weight inside the root's forward, before any child.
FORWARD_ORDER = ["output.weight", "model.tok_embeddings.weight"] + [
    f"model.layers.{i}.{n}.weight" for i in range(2)
    for n in ("attention_norm", "attention.wqkv", "attention.wo", "ffn_norm", "feed_forward.w1", "feed_forward.w3",
              "feed_forward.w2")] + ["model.norm.weight"]


def zero_step(zero: ZeroDataParallel, step: int, rank: int, world: int) -> float:
    """One optimizer step over this rank's micro-batches; the global token-mean loss."""
    mine, total = rank_batches(step, rank, world)
    local = 0.0
    for i, (ids, cu) in enumerate(mine):
        with zero.no_sync() if i < len(mine) - 1 else contextlib.nullcontext():
            loss = zero(ids, cu, labels=ids, loss_reduction="sum").loss
            (loss * world / total).backward()
        local += float(loss.detach())
    zero.clip_grad_norm_(CLIP)
    zero.optimizer.step()
    return global_loss(local) / total


def train_zero(rank: int, world: int, **options):
    model = micro_model()
    zero = ZeroDataParallel(model, lr=LR, weight_decay=0.1, record_schedule=True, **options)
    losses = []
    for step in range(STEPS):
        losses.append(zero_step(zero, step, rank, world))
        if step == STEPS - 2:
            zero.schedule.events.clear()   # keep the last step (and the forward after the step before it)
    params = {k: v.clone() for k, v in zero.state_dict().items()}
    return (losses, params), zero.schedule.events, zero.buckets


CASES = {
    "zero1": dict(stage=1, bucket_numel=4000),
    "zero1_blocking": dict(stage=1, bucket_numel=4000, overlap=False),
    "zero2": dict(stage=2, bucket_numel=4000),
    "zero2_one_bucket": dict(stage=2, bucket_numel=1 << 20),
}


def frozen_stays_put(rank: int, world: int) -> bool:
    """A frozen parameter gets no bucket: weight decay never touches it, it stays equal on every rank."""
    model = micro_model()
    model.model.norm.weight.requires_grad_(False)
    before = model.model.norm.weight.detach().clone()
    zero = ZeroDataParallel(model, lr=LR, weight_decay=0.1)
    ids, cu = rank_batches(0, rank, world)[0][0]
    zero(ids, cu, labels=ids).loss.backward()
    zero.optimizer.step()
    zero.wait_for_parameters()
    return "model.norm.weight" not in sum(zero.buckets, []) and torch.equal(model.model.norm.weight, before)


def bf16_checkpoint_round_trip(rank: int, world: int, out: str) -> bool:
    """bf16 parameters: the fp32 master shards are saved (master_param) and restored exactly, into another stage,
    not re-derived from the rounded parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    def masters(zero):
        return {k: v["master_param"].full_tensor() for k, v in zero.optimizer.state_dict()["state"].items()}

    zero = ZeroDataParallel(micro_model().bfloat16(), lr=LR, weight_decay=0.1, stage=2, bucket_numel=4000)
    for step in range(2):
        ids, cu = rank_batches(step, rank, world)[0][0]
        zero(ids, cu, labels=ids).loss.backward()
        zero.optimizer.step()
    dcp.save({"model": zero.state_dict(), "optimizer": zero.optimizer.state_dict()}, checkpoint_id=out)
    other = ZeroDataParallel(micro_model(seed=5).bfloat16(), lr=LR, weight_decay=0.1, stage=1)
    state = {"model": other.state_dict(), "optimizer": other.optimizer.state_dict()}
    assert all(isinstance(v["master_param"], DTensor) for v in state["optimizer"]["state"].values())
    dcp.load(state, checkpoint_id=out)
    other.optimizer.load_state_dict(state["optimizer"])
    want, got = masters(zero), masters(other)
    rounded = any(not torch.equal(w, w.bfloat16().float()) for w in want.values())   # masters carry more bits
    return rounded and all(torch.equal(want[k], got[k]) for k in want) and all(
        torch.equal(a, b) for a, b in zip(zero.state_dict().values(), other.state_dict().values()))


def two_rank_cases(rank: int, world: int, out: str):
    results = {name: train_zero(rank, world, **opts) for name, opts in CASES.items()}
    results["frozen"] = frozen_stays_put(rank, world)
    results["bf16_checkpoint"] = bf16_checkpoint_round_trip(rank, world, out)
    return results


def hybrid_case(rank: int, world: int, checkpoint: str):
    """Hybrid training, then 1 -> 4: a single-process DCP checkpoint loaded into ZeRO-2 sharded over 4 ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    trained = train_zero(rank, world, stage=2, shard_size=2, bucket_numel=4000)
    zero = ZeroDataParallel(micro_model(seed=3), lr=LR, weight_decay=0.1, stage=2, bucket_numel=4000)
    state = {"model": zero.state_dict(), "optimizer": zero.optimizer.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    zero.optimizer.load_state_dict(state["optimizer"])
    moments = {f"{n}.{k}": v.full_tensor() for n, s in zero.optimizer.state_dict()["state"].items()
               for k, v in s.items() if isinstance(v, DTensor)}
    masters_match = all(torch.equal(slot.local_view(b.master, zero.shard),
                                    slot.param.detach()[slice(*slot.local_rows(zero.shard))])
                        for b in zero._buckets for slot in b.slots)
    loaded = {k: v.clone() for k, v in zero.state_dict().items()}
    # Training goes on from the loaded state (the first backward rebuilds the buckets in forward order, moving it).
    resumed = (zero_step(zero, STEPS, rank, world), {k: v.clone() for k, v in zero.state_dict().items()})
    return trained, (loaded, moments, masters_match, resumed)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(two_rank_cases, 2, str(tmp_path_factory.mktemp("zero_bf16")))


def test_zero_modes_equal_single_process(two_ranks):
    want = reference_run(2)
    for name in CASES:
        for rank in range(2):
            run, _, buckets = two_ranks[rank][name]
            assert_close_run(run, want, float64_oracle(2))
            assert [n for b in buckets for n in b] == FORWARD_ORDER, name
    on, off = two_ranks[0]["zero1"][0], two_ranks[0]["zero1_blocking"][0]
    assert on[0] == off[0]   # overlap changes when collectives run, not what they compute
    assert all(torch.equal(on[1][k], off[1][k]) for k in on[1])


def test_frozen_parameter_is_left_alone(two_ranks):
    assert all(r["frozen"] for r in two_ranks)


def test_bf16_master_shards_survive_a_checkpoint(two_ranks):
    assert all(r["bf16_checkpoint"] for r in two_ranks)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_hybrid_shard_groups_and_one_to_four_resharding(tmp_path):
    """4 ranks, shard groups of 2 (reduce-scatter inside a group, all-reduce of the shards across groups) train
    like one process; a checkpoint of one process loads into 4 shards."""
    want, saved_optimizer, (next_loss, next_params) = reference_run(4, checkpoint=str(tmp_path / "one"))
    results = run_ranks(hybrid_case, 4, str(tmp_path / "one"))
    for (run, events, _), (params, moments, masters_match, resumed) in results:
        assert_close_run(run, want, float64_oracle(4))
        assert events and any(e.kind == "all_reduce" for e in events)
        assert all(torch.equal(v, want[1][k]) for k, v in params.items())
        assert all(torch.equal(moments[f"{n}.{k}"], s[k]) for n, s in saved_optimizer["state"].items()
                   for k in ("exp_avg", "exp_avg_sq"))
        assert masters_match   # the fp32 master shards follow the loaded parameters
        assert_close_run(([resumed[0]], resumed[1]), ([next_loss], next_params), float64_oracle(4, STEPS + 1), STEPS + 1)


def test_schedule_overlaps_and_follows_forward_order(two_ranks):
    _, events, buckets = two_ranks[0]["zero1"]
    n = len(buckets)
    assert n >= 4
    kinds = [e.kind for e in events]
    # The last step's final micro-step: its first reduce-scatter is issued while gradients are still arriving.
    last_end = max(i for i, k in enumerate(kinds) if k == "backward_end")
    first_rs = kinds.index("reduce_scatter")
    assert first_rs < last_end
    assert any(k == "grad" for k in kinds[first_rs:last_end]), "reduce-scatter issued only after the backward"
    # Buckets reduce in reverse forward order (backward order) and gather in forward order.
    assert [e.bucket for e in events if e.kind == "reduce_scatter"] == list(range(n - 1, -1, -1))
    step_at = kinds.index("step")
    gathers = [e.bucket for e in events[step_at:] if e.kind == "all_gather"]
    assert gathers == list(range(n))
    # The forward of the step before (events before the step): each gather waited right before its first use.
    waits = [i for i in range(step_at) if kinds[i] == "wait_all_gather"]
    assert [events[i].bucket for i in waits] == list(range(n))
    for i in waits:
        b = events[i].bucket
        assert events[i + 1].kind == "use" and events[i + 1].bucket == b and events[i + 1].where == events[i].where
        assert not any(e.kind == "use" and e.bucket == b for e in events[:i]), f"bucket {b} used before its wait"


def test_blocking_mode_reduces_after_backward(two_ranks):
    _, events, _ = two_ranks[0]["zero1_blocking"]
    kinds = [e.kind for e in events]
    last_end = max(i for i, k in enumerate(kinds) if k == "backward_end")
    assert kinds.index("reduce_scatter") > last_end
    assert "wait_all_gather" in kinds[kinds.index("step"):]


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="torch.distributed"):
        ZeroDataParallel(micro_model())
