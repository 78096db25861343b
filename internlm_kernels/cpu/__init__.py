"""CPU implementations that are torch compositions rather than compiled C++: oneDNN matmuls through ATen, and
custom autograd Functions with hand-written backwards (fewer, larger ops than the reference's autograd graph)."""
from __future__ import annotations

from ..backend import requested


def runs_here(op: str, supported: bool, what: str) -> bool:
    """Whether the chosen cpu backend of ``op`` runs this call: True when ``supported``; else False under ``auto``
    (the caller runs the reference), and NotImplementedError naming ``what`` when cpu was forced."""
    if supported:
        return True
    if requested(op) != "auto":
        raise NotImplementedError(f"{op}: the cpu backend does not support {what}; use the reference backend")
    return False
