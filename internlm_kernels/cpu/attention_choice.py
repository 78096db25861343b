"""Which CPU attention computes a float32 call of the cpu backend: the extension's blocked kernels (cpu/attention.py)
or ATen's CPU flash kernel (SDPA per document, ``ops.attention_cpu.sdpa_per_document``), chosen by measurement on the
running CPU.

On the development machine (AMD EPYC, Zen 5) the kernels ran the tiny preset's shapes 1.5-2x faster than ATen's
flash kernel, forward and backward, under AVX-512 and under ATEN_CPU_CAPABILITY=avx2 (docs/results.md). ATen's
kernel multiplies its blocks with the BLAS torch was built with (MKL in the PyPI wheels), which takes its AVX-512
path on Intel Xeons and not on that AMD CPU (docs/kernels/cpu.md), so the margin elsewhere is not known. As for the
GEMMs (cpu/gemm_choice.py), the first call of each *shape class* in a process times both on its own operands (one
warm-up each, then ``_ROUNDS`` interleaved calls; forward and backward when the call records gradients, else the
forward; the calling thread's CPU time at one torch thread, wall time with more) and caches the faster for the
process under (``gemm_choice.cpu_id()``, torch threads, shape class). A shape class: head dim, query and KV heads, causal,
whether gradients are recorded, and the number of tokens and of documents, each rounded up to a power of two.

``INTERNLM_KERNELS_CPU_ATTENTION`` pins the choice: ``kernels``, ``sdpa``, or ``measure`` (the default); ``pin(mode)``
does the same in code; ``choices()`` returns what was measured (benchmarks record it). Measured choices are kept in
the GEMM choices' file (``INTERNLM_KERNELS_CPU_GEMM_CACHE``, cpu/gemm_choice.py) under an "attention" key, so later
processes on the machine take them without timing and two runs of one seed compute the same attention.
"""
from __future__ import annotations

from typing import Callable

import torch

from .gemm_choice import _bucket, _time, checked_pin, cpu_id, resolved_mode, store_choice, stored_choice

ENV_VAR = "INTERNLM_KERNELS_CPU_ATTENTION"
MODES = ("measure", "kernels", "sdpa")
_ROUNDS = 3

_pinned: str | None = None
_cache: dict[tuple, str] = {}


def pin(mode: str | None) -> None:
    """Force ``kernels`` / ``sdpa`` for every call, or ``measure``; None returns to the environment's setting."""
    global _pinned
    _pinned = checked_pin(mode, MODES)


def mode() -> str:
    return resolved_mode(_pinned, ENV_VAR, MODES)


def choices() -> dict[str, str]:
    """The measured choices of this process, as {"cpu | isa | threads | class": "kernels" or "sdpa"}."""
    def shape(k):
        d, hq, hkv, causal, grad, total, docs = k[3:]
        return (f"d{d} {hq}/{hkv} heads {'causal' if causal else 'full'} {'fwd+bwd' if grad else 'fwd'} "
                f"<={total} tokens in <={docs} docs")
    return {f"{k[0]} | {k[1]} | {k[2]} thread(s) | {shape(k)}": v for k, v in sorted(_cache.items(), key=str)}


def _measure(impls: dict[str, Callable], q, k, v, grad: bool) -> str:
    if grad:
        leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
        dout = torch.ones_like(q)
        calls = {n: (lambda f=f: torch.autograd.grad(f(*leaves), leaves, dout)) for n, f in impls.items()}
    else:
        args = tuple(t.detach() for t in (q, k, v))
        calls = {n: (lambda f=f: f(*args)) for n, f in impls.items()}
    best = {}
    for call in calls.values():
        call()                                                      # warm-up: first-touch of buffers
    for _ in range(_ROUNDS):                                        # interleaved, so machine load hits both
        for n, call in calls.items():
            best[n] = min(best.get(n, float("inf")), _time(call))
    return min(best, key=best.get)


def use_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_docs: int, causal: bool, grad: bool,
                kernels: Callable, sdpa: Callable) -> bool:
    """Whether ``kernels(q, k, v)`` (rather than ``sdpa(q, k, v)``, the same attention over ``n_docs`` documents)
    runs this call, which records gradients if ``grad``."""
    m = mode()
    if m != "measure":
        return m == "kernels"
    key = (*cpu_id(), torch.get_num_threads(), q.shape[2], q.shape[1], k.shape[1], causal, grad, _bucket(q.shape[0]),
           _bucket(n_docs))
    name = _cache.get(key)
    if name is None:
        name = stored_choice(("attention", *key), ("kernels", "sdpa"))
        if name is None:
            name = _measure({"kernels": kernels, "sdpa": sdpa}, q, k, v, grad)
            store_choice(("attention", *key), name)
        _cache[key] = name
    return name == "kernels"
