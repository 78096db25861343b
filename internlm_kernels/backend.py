"""Which implementation of an op runs for a given tensor.

Backends:
  reference  plain torch (internlm_kernels/reference.py): the spec, runs anywhere
  triton     Triton kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (the test setup)
  cuda       the compiled extension's CUDA kernels (internlm_kernels._C)
  cpu        CPU kernels: the compiled extension's C++/OpenMP kernels (internlm_kernels._C) for adamw and
             grad_norm; for attention, ATen's CPU flash kernel (torch SDPA) run per document; for linear,
             oneDNN's inner product (internlm_kernels/cpu/linear.py); torch compositions with hand-written
             backwards for rms_norm, swiglu, rotary and the linear cross-entropy (internlm_kernels/cpu/)
  auto       CUDA tensors: the compiled CUDA kernel where the op has one, else Triton (a fixed order, not a
             measurement: nothing has been timed on a GPU yet);
             CPU tensors: the C++ kernel where one exists, else the reference.

Choose with the environment variable INTERNLM_KERNELS_BACKEND, either one name for every op
(``triton``) or per-op entries (``attention=triton,adamw=cpu``, with ``*=...`` for the rest), or in code
with ``use_backend("triton")`` / ``use_backend(rms_norm="reference")``. A forced backend that cannot run
an op on the given tensors raises ``BackendUnavailable`` with the reason; it never falls back silently.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")

# Implementations each op has, and what `auto` picks on each device (first available wins).
OPS: dict[str, tuple[str, ...]] = {
    "attention": ("reference", "triton", "cpu"),
    "rms_norm": ("reference", "triton", "cpu"),
    "swiglu": ("reference", "triton", "cpu"),
    "rotary": ("reference", "triton", "cpu"),
    "linear_cross_entropy": ("reference", "triton", "cpu"),
    "linear": ("reference", "cpu"),
    "kvcache": ("reference", "triton", "cpu"),
    "linear_logprobs": ("reference", "triton"),
    "adamw": ("reference", "cpu", "cuda"),
    "grad_norm": ("reference", "cpu", "cuda"),
}
# The model's dense projections: a default such as use_backend("triton") forces the library's kernels, which
# linear has none of (its reference is torch's GEMM), so it stays on auto unless named (``linear=...``).
WILDCARD_OPTIONAL = ("linear",)
# Ops whose cpu/cuda implementations live in the compiled extension.
NATIVE_OPS = ("adamw", "grad_norm")
_AUTO = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

ENV_VAR = "INTERNLM_KERNELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this op on these tensors."""


_local = threading.local()


@functools.lru_cache(maxsize=16)   # requested() parses the environment's spec on every op call; callers never mutate
def _parse(spec: str) -> dict[str, str]:
    spec = spec.strip()
    if not spec:
        return {}
    if "=" not in spec:
        choice = {"*": spec}
    else:
        choice = {}
        for item in spec.split(","):
            if not item.strip():
                continue
            op, _, name = item.partition("=")
            choice[op.strip()] = name.strip()
    for op, name in choice.items():
        if name not in BACKENDS:
            raise ValueError(f"{ENV_VAR}: unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
        if op != "*" and op not in OPS:
            raise ValueError(f"{ENV_VAR}: unknown op {op!r} (ops: {', '.join(OPS)})")
    return choice


def _default_for(op: str, name: str) -> str:
    """What a default (``*``) entry asks of ``op``: the name itself, except for the ops in WILDCARD_OPTIONAL,
    which stay on auto under a default they have no implementation of."""
    return "auto" if op in WILDCARD_OPTIONAL and name not in OPS[op] else name


def requested(op: str) -> str:
    """The backend asked for ``op`` by use_backend() or the environment ('auto' when nothing was asked)."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}")
    for choice in reversed(getattr(_local, "stack", [])):
        if op in choice:
            return choice[op]
        if "*" in choice:
            return _default_for(op, choice["*"])
    choice = _parse(os.environ.get(ENV_VAR, ""))
    return choice[op] if op in choice else _default_for(op, choice.get("*", "auto"))


def triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(op: str, name: str, device: torch.device) -> str | None:
    """None when backend `name` can run `op` on `device`, else the reason it cannot."""
    if name == "reference":
        return None
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if not triton_runs_on(device):
            return f"Triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to interpret on CPU)"
        return None
    if name in ("cuda", "cpu"):
        if device.type != name:
            return f"the {name} backend needs {name} tensors (got {device.type})"
        if op == "linear":
            from .cpu import linear

            return linear.available()
        if op not in NATIVE_OPS:
            return None
        from . import _ext

        return _ext.why_unavailable(name)
    return f"unknown backend {name!r}"


def available(op: str, device: torch.device | str) -> tuple[str, ...]:
    """The implementations of ``op`` that can run on ``device`` here."""
    device = torch.device(device)
    return tuple(name for name in OPS[op] if _why_not(op, name, device) is None)


# What choose() returned, by (op, device type, requested backend, TRITON_INTERPRET when triton is asked for on a
# non-CUDA device): for the ops outside NATIVE_OPS nothing else enters the answer, and choose() runs on every op call.
# Native ops ask the compiled extension, which is not memoized here; refusals (BackendUnavailable) are never stored.
_choices: dict[tuple[str, str, str, str | None], str] = {}


def choose(op: str, device: torch.device | str) -> str:
    """The implementation of ``op`` that runs for tensors on ``device``."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    want = requested(op)
    interpret = os.environ.get("TRITON_INTERPRET") if want == "triton" and device_type != "cuda" else None
    key = (op, device_type, want, interpret)
    name = _choices.get(key)
    if name is None:
        name = _choose(op, torch.device(device_type), want)
        if op not in NATIVE_OPS:
            _choices[key] = name
    return name


def _choose(op: str, device: torch.device, want: str) -> str:
    have = OPS[op]
    if want == "auto":
        for name in _AUTO.get(device.type, ("reference",)):
            if name in have and _why_not(op, name, device) is None:
                return name
        return "reference"
    if want not in have:
        raise BackendUnavailable(
            f"{op}: backend {want!r} was forced but {op} has no {want} implementation (it has: {', '.join(have)})")
    why = _why_not(op, want, device)
    if why is not None:
        raise BackendUnavailable(f"{op}: backend {want!r} was forced but cannot run: {why}")
    return want


@contextlib.contextmanager
def use_backend(default: str | None = None, **per_op: str) -> Iterator[None]:
    """Force backends inside a ``with`` block: ``use_backend("triton")`` or ``use_backend(adamw="cpu")``."""
    choice = dict(per_op)
    if default is not None:
        choice["*"] = default
    _parse(",".join(f"{k}={v}" for k, v in choice.items()))  # validates names
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(choice)
    try:
        yield
    finally:
        stack.pop()
