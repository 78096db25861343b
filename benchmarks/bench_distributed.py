"""Data-parallel modes on >= 2 GPUs (NCCL), all in one run on the same cards: our hybrid ZeRO-1/2 with overlap on
and off, beside FSDP2 (``fully_shard`` per block with explicit prefetch) and torch DDP.

Per mode: the median optimizer-step time (2 accumulated micro-steps of ``TOKENS`` tokens per GPU, bf16 parameters,
FusedAdamW with fp32 masters, grad clipping), tokens/s over all GPUs, MFU against the card's dense bf16 peak, and
the *exposed communication*: step time minus the time of the same per-GPU work on one GPU without any collective
(measured on rank 0 in the same run). Skipped with fewer than 2 GPUs; docs/distributed.md has the computed
(not measured) volumes these figures are to be read against.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import statistics
import tempfile
import time

import pytest
import torch

from benchmarks.common import OURS, card_name

MODES = ("zero1", "zero2", "zero2-blocking", "fsdp2", "ddp")
PEERS = {"fsdp2": "torch-fsdp2", "ddp": "torch-ddp"}
# A ~0.6B InternLM2 (the 7B's shape, fewer and narrower layers) so that the whole file fits its time limit.
MODEL = dict(vocab_size=92544, hidden_size=1536, intermediate_size=5376, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4)
TOKENS, SEQ, MICRO_STEPS, WARMUP, STEPS = 8192, 4096, 2, 2, 5

_results: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(dev):
    from models import InternLM2Config, InternLM2ForCausalLM

    torch.manual_seed(0)
    with torch.device(dev):
        model = InternLM2ForCausalLM(InternLM2Config(**MODEL))
    return model.to(torch.bfloat16)


def _wrap(mode: str, model, world: int):
    """(module to call, optimizer, no_sync context factory, clip function)"""
    import internlm_kernels as ik
    from internlm_kernels.distributed import ZeroDataParallel
    from internlm_kernels.distributed.fsdp import fsdp_mesh, fully_shard_blocks, no_sync
    from models.tensor_parallel import internlm2_blocks

    opts = dict(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    if mode.startswith("zero"):
        zero = ZeroDataParallel(model, stage=int(mode[4]), overlap=not mode.endswith("blocking"), **opts)
        return zero, zero.optimizer, zero.no_sync, lambda: zero.clip_grad_norm_(1.0)
    if mode == "fsdp2":
        fully_shard_blocks(model, fsdp_mesh(None, "cuda"), blocks=internlm2_blocks(model))
        opt = ik.FusedAdamW(model.parameters(), master_weights=True, **opts)
        return model, opt, lambda: no_sync(model), lambda: ik.clip_grad_norm_(model.parameters(), 1.0)
    opt = ik.FusedAdamW(model.parameters(), master_weights=True, **opts)
    clip = lambda: ik.clip_grad_norm_(model.parameters(), 1.0)  # noqa: E731
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
        return ddp, opt, ddp.no_sync, clip
    return model, opt, contextlib.nullcontext, clip                    # "compute": one GPU, no collective


def _time_steps(module, opt, sync, clip, dev) -> float:
    ids = torch.randint(0, MODEL["vocab_size"], (TOKENS,), device=dev)
    cu = torch.arange(0, TOKENS + 1, SEQ, dtype=torch.int32, device=dev)
    times = []
    for step in range(WARMUP + STEPS):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(MICRO_STEPS):
            with sync() if i < MICRO_STEPS - 1 else contextlib.nullcontext():
                module(ids, cu, labels=ids).loss.backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), device_id=dev)
    results = {}
    for mode in MODES:
        module, opt, sync, clip = _wrap(mode, _build(dev), world)
        results[mode] = _time_steps(module, opt, sync, clip, dev)
        del module, opt
        torch.cuda.empty_cache()
        dist.barrier()
    if rank == 0:
        module, opt, sync, clip = _wrap("compute", _build(dev), 1)
        results["compute"] = _time_steps(module, opt, sync, clip, dev)
        torch.save(results, os.path.join(out, "results.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _measure() -> dict:
    if not _results:
        import torch.multiprocessing as mp

        world = min(torch.cuda.device_count(), 8)
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(_worker, args=(world, _free_port(), out), nprocs=world, start_method="spawn")
            _results.update(torch.load(os.path.join(out, "results.pt")), world=world)
    return _results


@pytest.mark.parametrize("mode", MODES)
def test_step(benchmark, mode):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs >= 2 GPUs (NCCL data parallel)")
    from models import InternLM2Config
    from train.metrics import peak_tflops

    r = _measure()
    world, ms = r["world"], r[mode]
    tokens = world * MICRO_STEPS * TOKENS
    flops = MICRO_STEPS * TOKENS * InternLM2Config(**MODEL).flops_per_token(SEQ)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)   # the figure comes from the spawned ranks
    peak = peak_tflops(torch.cuda.get_device_name())
    benchmark.extra_info.update(
        group=f"data-parallel step, {world} GPUs, {MICRO_STEPS}x{TOKENS} tokens/GPU", impl=PEERS.get(mode, OURS),
        metric="tokens/s", value=tokens / (ms * 1e-3), ms=ms, card=card_name(), mode=mode,
        exposed_comm_ms=ms - r["compute"], compute_only_ms=r["compute"],
        mfu=flops / (ms * 1e-3) / (peak * 1e12) if peak else None)
