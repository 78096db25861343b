"""Shared benchmark plumbing: timing that is right on GPU and CPU, and the record the summary table reads.

Every benchmark is a pytest-benchmark test. Ours and each peer are separate parametrizations of the same
test, so they are measured in the same run on the same card. Each test calls ``record(...)``, which stores in
``benchmark.extra_info``: group (what is being compared: op, shape, dtype, pass), impl (ours is
``internlm_kernels``), metric (``TFLOP/s``, ``GB/s``, ``tokens/s`` ...), value, ms, and the card's name.
``benchmarks/summarize.py`` turns the JSON of a run into one table with ratios against each peer.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

OURS = "internlm_kernels"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def card_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def cpu_info() -> dict[str, str]:
    """What a CPU figure depends on beyond the code: the CPU model, the ISA ATen dispatches to
    (``ATEN_CPU_CAPABILITY`` lowers it), and the cpu GEMM and attention modes with what they measured
    (internlm_kernels/cpu/gemm_choice.py, attention_choice.py). Empty on a GPU run."""
    if torch.cuda.is_available():
        return {}
    from internlm_kernels.cpu import attention_choice, gemm_choice

    model, isa = gemm_choice.cpu_id()
    info = {"cpu_model": model, "isa": isa, "gemm_mode": gemm_choice.mode(), "attention_mode": attention_choice.mode()}
    for name, module in (("gemm_choices", gemm_choice), ("attention_choices", attention_choice)):
        if module.choices():
            info[name] = "; ".join(f"{k.split(' | ', 2)[-1]}={v}" for k, v in module.choices().items())
    return info


def time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of ``fn()``; CUDA work is synchronized (triton.testing.do_bench on GPU)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def time_ms_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 2, reps: int = 15) -> dict[str, float]:
    """Median milliseconds of each CPU callable, measured in alternating rounds (the order flips every round), so
    that load from other processes on a shared machine falls on every implementation alike."""
    return {name: wall for name, (wall, _cpu) in time_interleaved(fns, warmup, reps).items()}


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 2,
                     reps: int = 15) -> dict[str, tuple[float, float]]:
    """As ``time_ms_interleaved``, each callable's (median wall ms, median process CPU ms). The CPU time leaves out
    the time the process waited for a core, which on a loaded machine is most of the wall time; with one torch
    thread it is the work of the call, with more it also counts OpenMP threads spin-waiting."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        for name in (names if i % 2 == 0 else names[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in names}


def record(benchmark, fn: Callable[[], object], *, group: str, impl: str, metric: str,
           work: float, unit_scale: float = 1e-9, ms: float | None = None, **extra) -> float:
    """Time ``fn`` (via pytest-benchmark for its own report, and ``time_ms`` for the figure) and record it.

    ``work`` is the amount per call in base units (FLOPs for TFLOP/s with unit_scale 1e-12, bytes for GB/s
    with 1e-9, tokens for tokens/s with 1). ``ms``: the figure when the caller measured it already (e.g. with
    ``time_ms_interleaved``, beside the peer). Returns the value in ``metric`` units.
    """
    if ms is None:
        ms = time_ms(fn)
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    value = work * unit_scale / (ms * 1e-3)
    benchmark.extra_info.update(group=group, impl=impl, metric=metric, value=value, ms=ms, card=card_name(),
                                **cpu_info(), **extra)
    return value


def peer_available(name: str) -> bool:
    """Whether an optional peer library imports here (Liger is installed only on GPU machines)."""
    try:
        __import__(name)
    except Exception:
        return False
    return True
