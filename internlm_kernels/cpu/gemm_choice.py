"""Which CPU GEMM computes a (M, K) · (N, K)ᵀ product: oneDNN's inner product or ATen's ``mm`` (the BLAS torch was
built with, MKL in the PyPI wheels), chosen by measurement on the running CPU.

Neither wins everywhere. On an AMD EPYC (Zen 5) MKL does not take its AVX-512 path and oneDNN's JIT kernels are ~2×
faster for training-sized products; on Intel Xeons MKL does use AVX-512; and for the few-row products of a decode
step ATen's call is cheaper on either (docs/kernels/cpu.md). So the first product of each *shape class* in a process
runs both candidates on its own operands (one warm-up each, then ``_ROUNDS`` interleaved timed calls; the smaller
minimum wins) and the winner is cached for the process under (``cpu_id()``, torch threads, shape class). A
call is timed in the calling thread's CPU time when torch runs one thread: on a shared machine wall time also counts
the time the process waited for a core, which at a load of 4 on 2 cores swung single 2 ms calls by 2-3× and made the
choice a coin toss (a weight gradient class picked the copy-then-oneDNN path at 4.6 ms over ATen's 2.4 ms); with more
threads the work runs on the OpenMP team, not all in the caller, so wall time it is. The thread count is part of the
key because a GEMM's parallel split differs with it. A shape class is (M, N, K) each rounded up to a power of two,
plus whether each operand is contiguous (a transposed view takes a different kernel); the weight gradient dyᵀ·x is its own class (``product_tn``: oneDNN needs dyᵀ copied contiguous,
ATen's BLAS takes the transpose as a flag, so the copy is part of what is timed). The result is the same product either way, up to float32 summation order.

``INTERNLM_KERNELS_CPU_GEMM`` pins the choice for reproducibility (bit-identical runs across processes, e.g. the
test suite and multi-process equality checks): ``onednn``, ``aten``, or ``measure`` (the default). ``pin(mode)``
does the same in code; ``choices()`` returns what was measured (benchmarks record it).

Measured choices are also kept on disk, in ``INTERNLM_KERNELS_CPU_GEMM_CACHE`` (a JSON file; default
``$XDG_CACHE_HOME/internlm_kernels/cpu_gemm_choice.json``, ``~/.cache`` without XDG; ``off`` keeps them in the
process), keyed by torch version and the scope above: a later process on the same machine reuses them instead of
measuring again. That is what makes two runs of one seed train the same model: the two GEMMs round differently, and a
timing that picks one in one process and the other in the next gave the demo's pretraining different weights from
the 100th step on (losses equal to 5 digits there, and passkey retrieval at 1024 tokens of 17.5% and 100% for one
seed and config by the end). The first process to measure a class writes it; one that finds the class already on
disk takes that choice, even if its own timing would have differed.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import time
import warnings

import torch

ENV_VAR = "INTERNLM_KERNELS_CPU_GEMM"
CACHE_ENV_VAR = "INTERNLM_KERNELS_CPU_GEMM_CACHE"
MODES = ("measure", "onednn", "aten")
_ROUNDS = 5

_pinned: str | None = None
_cache: dict[tuple, str] = {}


def onednn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def aten(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(a, b, bias)


_IMPLS = {"onednn": onednn, "aten": aten}


# MKL and oneDNN choose their kernels from CPUID, not from ATen's capability. Where these variables cap them (with
# ATEN_CPU_CAPABILITY, a process then runs as on a narrower CPU: the Makefile's AVX2_ONLY), the products are other
# kernels, so a choice measured under the caps holds only under them.
LIBRARY_ISA_CAPS = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


@functools.cache
def cpu_id() -> tuple[str, str]:
    """(CPU model name, the ISA the process computes with: ATen's, then MKL's and oneDNN's caps where set): with the
    thread count, the scope a measured choice is valid for."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    caps = "".join(f" {var}={os.environ[var]}" for var in LIBRARY_ISA_CAPS if os.environ.get(var))
    return model, torch.backends.cpu.get_cpu_capability() + caps


def checked_pin(mode: str | None, modes: tuple) -> str | None:
    """``mode`` when it is one of ``modes`` or None (the argument of a ``pin``), else ValueError."""
    if mode is not None and mode not in modes:
        raise ValueError(f"mode must be one of {modes} or None, got {mode!r}")
    return mode


def resolved_mode(pinned: str | None, env_var: str, modes: tuple) -> str:
    """The pinned mode, else the environment's (``measure`` when unset), checked against ``modes``."""
    m = pinned or os.environ.get(env_var, "measure") or "measure"
    if m not in modes:
        raise ValueError(f"{env_var} must be one of {modes}, got {m!r}")
    return m


def pin(mode: str | None) -> None:
    """Force ``onednn`` / ``aten`` for every product, or ``measure``; None returns to the environment's setting."""
    global _pinned
    _pinned = checked_pin(mode, MODES)


def mode() -> str:
    return resolved_mode(_pinned, ENV_VAR, MODES)


def choices() -> dict[str, str]:
    """The measured choices of this process, as {"cpu | isa | threads | M×N×K layout": impl} (layout: c/t per
    operand for a·bᵀ, "tn" for the weight gradient aᵀ·b)."""
    def shape(k):
        if k[3] == "tn":
            return "x".join(map(str, k[4:7])) + " tn"
        return "x".join(map(str, k[3:6])) + f" a{'c' if k[6] else 't'}b{'c' if k[7] else 't'}"
    return {f"{k[0]} | {k[1]} | {k[2]} thread(s) | {shape(k)}": v for k, v in sorted(_cache.items(), key=str)}


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _scope() -> tuple:
    return (*cpu_id(), torch.get_num_threads())


def _time(fn, *args) -> float:
    """Seconds one call takes: the calling thread's CPU time with one torch thread, else wall time (module doc)."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    t0 = clock()
    fn(*args)
    return clock() - t0


def cache_file() -> str | None:
    """The file of measured choices (module doc), or None when ``INTERNLM_KERNELS_CPU_GEMM_CACHE=off``."""
    path = os.environ.get(CACHE_ENV_VAR, "")
    if path == "off":
        return None
    if path:
        return path
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "internlm_kernels", "cpu_gemm_choice.json")


def _file_key(key: tuple) -> str:
    return " | ".join(map(str, (torch.__version__, *key)))


def _read(path: str) -> dict[str, str]:
    """The file's choices; an unreadable or malformed file counts as empty (it is rewritten on the next measure)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    return {k: v for k, v in saved.items() if isinstance(k, str) and isinstance(v, str)}


def stored_choice(key: tuple, allowed) -> str | None:
    """The choice the file holds for ``key`` (a measured choice's cache key), if it is one of ``allowed``. Also
    the store of the CPU attention's choice (cpu/attention_choice.py)."""
    path = cache_file()
    name = _read(path).get(_file_key(key)) if path else None
    return name if name in allowed else None


def store_choice(key: tuple, name: str) -> None:
    path = cache_file()
    if path:
        _remember(path, _file_key(key), name)


def _remember(path: str, key: str, name: str) -> None:
    """Add one choice to the file, atomically (a temporary file renamed over it): a reader sees the old file or the
    new one. Two processes measuring at once may each write; the later rename keeps only its own new entry and the
    other one's is measured again by a later process."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        saved = _read(path)
        saved.setdefault(key, name)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".cpu_gemm_choice.")
        with os.fdopen(fd, "w") as f:
            json.dump(saved, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"internlm_kernels: could not write the measured GEMM choice to {path} ({e}); set "
                      f"{CACHE_ENV_VAR}=off to keep choices per process", stacklevel=3)


def _choose(key: tuple, impls: dict, *args) -> str:
    name = _cache.get(key)
    if name is None:
        name = stored_choice(key, impls)
        if name is None:
            best = {}
            for impl in impls.values():
                impl(*args)                                         # warm-up: oneDNN JITs its kernel here
            for _ in range(_ROUNDS):                                # interleaved, so machine load hits both
                for n, impl in impls.items():
                    best[n] = min(best.get(n, float("inf")), _time(impl, *args))
            name = min(best, key=best.get)
            store_choice(key, name)
        _cache[key] = name
    return name


def product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) · b (N, K)ᵀ (+ bias) through the chosen GEMM."""
    m = mode()
    if m != "measure":
        return _IMPLS[m](a, b, bias)
    key = (*_scope(), _bucket(a.shape[0]), _bucket(b.shape[0]), _bucket(a.shape[1]), a.is_contiguous(),
           b.is_contiguous())
    return _IMPLS[_choose(key, _IMPLS, a, b, bias)](a, b, bias)


def _onednn_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return onednn(a.t().contiguous(), b.t(), None)        # oneDNN's fast path wants the reduced-over rows of aᵀ


def _aten_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a.t(), b)                               # BLAS takes the transpose as a flag: no copy


_TN_IMPLS = {"onednn": _onednn_tn, "aten": _aten_tn}


def product_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (R, M)ᵀ · b (R, N) -> (M, N), the weight gradient dyᵀ x (a reduction over the R rows): oneDNN needs aᵀ made
    contiguous first, ATen's mm does not, so the copy is part of what is measured. Shape class ("tn", M, N, R)."""
    m = mode()
    if m != "measure":
        return _TN_IMPLS[m](a, b)
    key = (*_scope(), "tn", _bucket(a.shape[1]), _bucket(b.shape[1]), _bucket(a.shape[0]))
    return _TN_IMPLS[_choose(key, _TN_IMPLS, a, b)](a, b)
