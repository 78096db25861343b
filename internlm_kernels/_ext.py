"""Loads the compiled extension internlm_kernels._C and says why a native backend cannot run."""
from __future__ import annotations

import functools


@functools.cache
def load():
    """The extension module, or raise ImportError with how to build it."""
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(
            "internlm_kernels._C is not built: install the package with `pip install -e .` "
            f"(see README.md, 'Build'). Import error: {e}") from e
    return _C


def why_unavailable(kind: str) -> str | None:
    """None if the extension can run `kind` ('cpu' or 'cuda') kernels, else the reason."""
    try:
        C = load()
    except ImportError as e:
        return str(e)
    if kind == "cuda":
        if not C.built_with_cuda():
            return "the extension was built without CUDA (no nvcc found at build time)"
        err = C.cuda_device_error()
        if err:
            return err
    return None
