"""Input checks of the public ops, public for code that builds on them (models, trainers, serving code).

Every failed check raises ValueError naming the argument. There are two kinds:

* metadata checks (type, dtype, rank, shape, device): always run; they cost no device work;
* value checks (what a tensor holds: cu_seqlens start at 0, never decrease and end at the row count; cross-entropy
  targets are classes or ignore_index; rotary positions stay inside the cos/sin tables). Reading a CUDA tensor's
  values is a device→host sync that drains the GPU queue, so on CUDA they run only when the debug switch is on:
  ``INTERNLM_KERNELS_DEBUG=1`` in the environment, or ``debug_checks(True)`` in code (``with debug_checks(): ...``
  for a block). CPU tensors are always checked (reading them waits for nothing). Value checks never run while
  torch.compile traces or a CUDA graph is captured: there are no values to read then.

Without the switch, bad values on CUDA are the caller's contract, as in flash-attn (which checks none): a
cu_seqlens that does not describe the packed tensor makes the kernels read and write outside it.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from ._tensor_cache import PerTensorCache, capturing

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

DEBUG_ENV_VAR = "INTERNLM_KERNELS_DEBUG"

_debug_override: bool | None = None   # set by debug_checks; None: the environment decides


def debug_checks_enabled() -> bool:
    """Whether value checks run on CUDA tensors: as ``debug_checks`` last set it, else the environment variable
    INTERNLM_KERNELS_DEBUG (1/true/yes/on)."""
    if _debug_override is None:
        return os.environ.get(DEBUG_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")
    return _debug_override


class debug_checks:
    """Turn value checks on CUDA tensors on (or off) for the whole process: ``debug_checks(True)`` from now on, or
    ``with debug_checks(): ...`` for a block (the previous setting comes back when it ends)."""

    def __init__(self, enabled: bool = True):
        global _debug_override
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be a bool, got {enabled!r}")
        self._previous = _debug_override
        _debug_override = enabled

    def __enter__(self) -> debug_checks:
        return self

    def __exit__(self, *exc) -> None:
        global _debug_override
        _debug_override = self._previous


def records_grad(*tensors) -> bool:
    """Whether a call on ``tensors`` (None allowed) records gradients: grad mode is on and one of them requires grad.
    Ops that have no backward refuse such calls, and measured choices are keyed by it (forward alone or with
    backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def reads_values(t: torch.Tensor) -> bool:
    """Whether a value check may read ``t`` now: CPU tensors always, other devices under the debug switch; never
    while tracing or capturing a CUDA graph (and never meta tensors, which hold no values)."""
    if torch.compiler.is_compiling() or t.is_meta:   # is_meta / is_cpu: no torch.device object built per call
        return False
    if t.is_cpu:
        return True
    return debug_checks_enabled() and not capturing((t,))


def check_tensor(name: str, t, *, dtypes: Iterable[torch.dtype] | None = None, ndim: int | Iterable[int] | None = None,
                 device: torch.device | None = None) -> None:
    """``t`` is a tensor with one of ``dtypes``, ``ndim`` dims and on ``device`` (each when given)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


# A model passes the same cu_seqlens to every layer: a CPU one is checked once, not once per layer.
_checked_cu_seqlens = PerTensorCache("cu_seqlens value check", capturable=False)


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> None:
    """cu_seqlens: int32, 1-D, on ``device``; its values (see ``reads_values``) start at 0, never decrease and end at
    ``total``."""
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of int32, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 (as flash-attn), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the inputs are on {device}")
    if not reads_values(cu):
        return

    def check_values():
        first, last = int(cu[0]), int(cu[-1])
        if first != 0:
            raise ValueError(f"{name} must start at 0, got {first}")
        if bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name} must be non-decreasing (sorted cumulative lengths), got {cu.tolist()[:16]}")
        if last != total:
            raise ValueError(f"{name} ends at {last} but the packed tensor has {total} rows")

    _checked_cu_seqlens.get((cu,), total, check_values)
