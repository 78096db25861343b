"""Test setup: CPU runs execute the Triton kernels under the Triton interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, at the top of
the first file pytest imports. On a CUDA machine (`pytest -m gpu`) the interpreter stays off.
"""
from __future__ import annotations

import os

import pytest
import torch

ON_GPU_RUN = torch.cuda.is_available()
if not ON_GPU_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One GEMM for every cpu product in every test process (internlm_kernels/cpu/gemm_choice.py): a measured choice could
# differ between the processes of a multi-process equality check or a resume. tests/test_gemm_choice.py covers the rest.
os.environ.setdefault("INTERNLM_KERNELS_CPU_GEMM", "onednn")
# Measured choices stay in the process (tests/test_gemm_choice.py covers the file): a test never writes ~/.cache.
os.environ.setdefault("INTERNLM_KERNELS_CPU_GEMM_CACHE", "off")
# Likewise one CPU attention (internlm_kernels/cpu/attention_choice.py): the extension's kernels where they run.
os.environ.setdefault("INTERNLM_KERNELS_CPU_ATTENTION", "kernels")
# Under pytest-xdist every worker gets one thread: two workers with two OpenMP threads each on two cores spin-wait
# on each other and run many times slower.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def _patch_interpreter_bf16_dot() -> None:
    """Work around the Triton interpreter's bf16 dot (triton-lang/triton#11584, present in Triton 3.6).

    The interpreter stores bfloat16 as uint16 and its ``create_dot`` hands those raw bit patterns to
    ``np.matmul``, so a bf16 ``tl.dot`` returns values around 1e10. We convert bf16 operands to float32
    before the product, which is what the hardware does (bf16 inputs, fp32 accumulation). Only the
    interpreter is patched; GPU runs are untouched, and bf16 kernels are still tested on CPU through this.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, "_ik_bf16_dot_patched", False):
        return
    original = builder_cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def as_f32(h):
                if h.dtype.scalar != tl.bfloat16:
                    return h.data.astype(np.float32)
                return interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)

            out = np.matmul(as_f32(a), as_f32(b)).astype(d.data.dtype) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot
    builder_cls._ik_bf16_dot_patched = True


_patch_interpreter_bf16_dot()


def _patch_interpreter_scalar_index() -> None:
    """Work around the Triton interpreter's scalar ``__index__`` under NumPy >= 2.4 (triton-lang/triton#9171).

    The interpreter holds a scalar kernel argument as a one-element 1-D array and converts it with ``int(array)``,
    which NumPy 2.4 rejects, so ``for i in range(0, n)`` over a runtime ``n`` fails. We convert through a 0-d
    reshape, which is the upstream fix. Only the interpreter is patched.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    if getattr(interpreter, "_ik_scalar_index_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._ik_scalar_index_patched = True


_patch_interpreter_scalar_index()


def pytest_collection_modifyitems(config, items):
    if ON_GPU_RUN:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: runs in benchmarks/gpu_check.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None, atol: float | None = None,
                 msg: str = "") -> None:
    """Compare with the project's dtype tolerances (fp32/fp64 ~1e-5 relative, fp16/bf16 ~1e-2); NaN never passes."""
    assert not torch.isnan(actual).any(), f"NaN in result {msg}"
    if rtol is None or atol is None:
        low = actual.dtype in (torch.float16, torch.bfloat16) or expected.dtype in (torch.float16, torch.bfloat16)
        rtol = rtol if rtol is not None else (1e-2 if low else 1e-5)
        atol = atol if atol is not None else (1e-2 if low else 1e-5)
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol, msg=msg or None)


def oracle_leaf(t: torch.Tensor, kernel_dtype: torch.dtype) -> torch.Tensor:
    """A fresh leaf of ``t`` for the reference side of a comparison: float64 when the kernel under test runs in
    float32 (so the oracle's own rounding is negligible at the 1e-5 tolerance), else t's own dtype (the reference
    computes in float32 and rounds its outputs like the fp16/bf16 kernels)."""
    return t.detach().to(torch.float64 if kernel_dtype == torch.float32 else t.dtype).requires_grad_(True)


@pytest.fixture
def threads(request):
    """torch's thread count set to the test's indirect parameter while it runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
