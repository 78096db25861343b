"""Which CPU GEMM computes a (M, K) · (N, K)ᵀ product: oneDNN's inner product or ATen's ``mm`` (the BLAS torch was
built with, MKL in the PyPI wheels), chosen by measurement on the running CPU.

Neither wins everywhere. On an AMD EPYC (Zen 5) MKL does not take its AVX-512 path and oneDNN's JIT kernels are ~2×
faster for training-sized products; on Intel Xeons MKL does use AVX-512; and for the few-row products of a decode
step ATen's call is cheaper on either (docs/kernels/cpu.md). So the first product of each *shape class* in a process
runs both candidates on its own operands (one warm-up each, then ``_ROUNDS`` interleaved timed calls; the smaller
minimum wins) and the winner is cached for the process under (CPU model, ATen ISA, shape class). A shape class is
(M, N, K) each rounded up to a power of two, plus whether each operand is contiguous (a transposed view takes a
different kernel). The result is the same product either way, up to float32 summation order.

``INTERNLM_KERNELS_CPU_GEMM`` pins the choice for reproducibility (bit-identical runs across processes, e.g. the
test suite and multi-process equality checks): ``onednn``, ``aten``, or ``measure`` (the default). ``pin(mode)``
does the same in code; ``choices()`` returns what was measured (benchmarks record it).
"""
from __future__ import annotations

import functools
import os
import time

import torch

ENV_VAR = "INTERNLM_KERNELS_CPU_GEMM"
MODES = ("measure", "onednn", "aten")
_ROUNDS = 3

_pinned: str | None = None
_cache: dict[tuple, str] = {}


def onednn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def aten(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(a, b, bias)


_IMPLS = {"onednn": onednn, "aten": aten}


@functools.cache
def cpu_id() -> tuple[str, str]:
    """(CPU model name, the ISA ATen dispatches to): the scope a measured choice is valid for."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return model, torch.backends.cpu.get_cpu_capability()


def pin(mode: str | None) -> None:
    """Force ``onednn`` / ``aten`` for every product, or ``measure``; None returns to the environment's setting."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    global _pinned
    _pinned = mode


def mode() -> str:
    m = _pinned or os.environ.get(ENV_VAR, "measure") or "measure"
    if m not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {MODES}, got {m!r}")
    return m


def choices() -> dict[str, str]:
    """The measured choices of this process, as {"cpu | isa | M×N×K contiguity": impl}."""
    return {" | ".join([*k[:2], "x".join(map(str, k[2:5])) + f" a{'c' if k[5] else 't'}b{'c' if k[6] else 't'}"]): v
            for k, v in sorted(_cache.items())}


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _time(fn, a, b, bias) -> float:
    t0 = time.perf_counter()
    fn(a, b, bias)
    return time.perf_counter() - t0


def product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) · b (N, K)ᵀ (+ bias) through the chosen GEMM."""
    m = mode()
    if m != "measure":
        return _IMPLS[m](a, b, bias)
    key = (*cpu_id(), _bucket(a.shape[0]), _bucket(b.shape[0]), _bucket(a.shape[1]), a.is_contiguous(),
           b.is_contiguous())
    name = _cache.get(key)
    if name is None:
        best = {}
        for impl in _IMPLS.values():
            impl(a, b, bias)                                        # warm-up: oneDNN JITs its kernel here
        for _ in range(_ROUNDS):                                    # interleaved, so machine load hits both
            for n, impl in _IMPLS.items():
                best[n] = min(best.get(n, float("inf")), _time(impl, a, b, bias))
        name = _cache[key] = min(best, key=best.get)
    return _IMPLS[name](a, b, bias)
