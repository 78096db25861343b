"""CPU implementations that are torch compositions rather than compiled C++: oneDNN matmuls through ATen, and
custom autograd Functions with hand-written backwards (fewer, larger ops than the reference's autograd graph)."""
from __future__ import annotations

import torch

from .. import _ext
from ..backend import requested


def plain(*tensors) -> bool:
    """True when every given tensor (None is skipped) is a plain torch.Tensor: the cpu paths call ATen / oneDNN ops
    that tensor subclasses such as DTensor (FSDP2, tensor parallelism) have no rules for, so those run the reference."""
    return all(t is None or type(t) in _PLAIN for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)   # a DTensor parameter's type is DTensor, not Parameter


def runs_here(op: str, supported: bool, what: str) -> bool:
    """Whether the chosen cpu backend of ``op`` runs this call: True when ``supported``; else False under ``auto``
    (the caller runs the reference), and NotImplementedError naming ``what`` when cpu was forced."""
    if supported:
        return True
    if requested(op) != "auto":
        raise NotImplementedError(f"{op}: the cpu backend does not support {what}; use the reference backend")
    return False


def extension_runs() -> bool:
    """Whether the extension's CPU kernels run here: it is built, and torch.compile is not tracing (it traces the
    ATen composition each kernel replaces, which Inductor fuses)."""
    return not torch.compiler.is_compiling() and _ext.why_unavailable("cpu") is None
