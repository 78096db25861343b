"""The compiled extension internlm_kernels._C: import, build flavour, CUDA errors without a device, work lists."""
import os
import shutil

import pytest
import torch

from internlm_kernels import _ext, optim
from internlm_kernels.backend import choose

C = _ext.load()
NO_DEVICE = not torch.cuda.is_available()


def _nvcc_at_build() -> bool:
    """The build (CMakeLists.txt) compiles CUDA when nvcc is found, unless INTERNLM_KERNELS_CUDA=OFF."""
    found = shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")
    return found and os.environ.get("INTERNLM_KERNELS_CUDA", "AUTO").upper() != "OFF"


def test_extension_imports_and_reports_cuda_build():
    assert C.__name__ == "internlm_kernels._C"
    assert C.built_with_cuda() == _nvcc_at_build()
    assert set(C.dtype_codes()) == {"float32", "float16", "bfloat16"}
    assert set(C.norm_kinds()) == {"l1", "l2", "inf", "p"}


def test_cpu_backend_is_available_under_auto():
    assert _ext.why_unavailable("cpu") is None
    assert choose("adamw", "cpu") == "cpu"
    assert choose("grad_norm", "cpu") == "cpu"


@pytest.mark.skipif(not NO_DEVICE, reason="checks the error raised on machines without a CUDA device")
def test_cuda_device_error_without_device():
    err = C.cuda_device_error()
    if C.built_with_cuda():
        assert err.startswith("no CUDA device: cudaGetDeviceCount")
    else:
        assert "built without CUDA" in err
    assert _ext.why_unavailable("cuda") == err


@pytest.mark.skipif(not NO_DEVICE, reason="checks the error raised on machines without a CUDA device")
@pytest.mark.parametrize("call", [
    lambda: C.adamw_cuda(0, 0, 0, 64, 0, 0, False, False, (1.0, 0.1, 0.999, 0.001, 1.0, -1e-3, 1e-8, 1.0), 0, 0),
    lambda: C.grad_norm_cuda(0, 0, 0, 64, 1, 2.0, 0, 0, 0, 0),
    lambda: C.grad_scale_cuda(0, 0, 0, 64, 0, 1.0, 0, 0),
], ids=["adamw", "grad_norm", "grad_scale"])
def test_cuda_entry_points_raise_clear_error_without_device(call):
    # Checked before anything touches the (null) addresses.
    with pytest.raises(RuntimeError, match="no CUDA device|built without CUDA"):
        call()


def test_row_layouts_match_the_python_builders():
    t = torch.zeros(5)
    assert C.GRAD_ROW_COLUMNS == 4 and len(optim._grad_rows([t])[0]) == C.GRAD_ROW_COLUMNS
    assert C.ADAMW_ROW_COLUMNS == 8 and optim.ADAMW_NUMEL_COLUMN == 6 and optim.GRAD_NUMEL_COLUMN == 1


def test_work_list_chunks():
    rows = [(0, n, 0, 0) for n in (0, 1, 64, 65, 130)]
    work = _ext.build_work_list(rows, numel_column=1, chunk_size=64, device=torch.device("cpu"))
    expected = [(1, 0), (2, 0), (3, 0), (3, 64), (4, 0), (4, 64), (4, 128)]
    assert work.n_chunks == len(expected)
    assert [tuple(r) for r in work.chunks.tolist()] == expected
    assert work.table.dtype == torch.int64 and work.table.shape == (5, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        _ext.build_work_list(rows, numel_column=1, chunk_size=60, device=torch.device("cpu"))


def test_work_list_cache_hits_and_evicts():
    cache = _ext.WorkLists(capacity=2)
    cpu = torch.device("cpu")
    first = cache.get([(0, 10, 0, 0)], 1, 64, cpu)
    assert cache.get([(0, 10, 0, 0)], 1, 64, cpu) is first
    cache.get([(0, 11, 0, 0)], 1, 64, cpu)
    cache.get([(0, 12, 0, 0)], 1, 64, cpu)
    assert len(cache) == 2 and cache.get([(0, 10, 0, 0)], 1, 64, cpu) is not first


def test_kernels_reject_unknown_codes():
    t = torch.zeros(8)
    work = _ext.build_work_list([(t.data_ptr(), 8, 7, 0)], 1, 64, torch.device("cpu"))  # dtype code 7
    args = (work.table.data_ptr(), work.chunks.data_ptr(), work.n_chunks, work.chunk_size)
    out, partials = torch.zeros(()), torch.zeros(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        C.grad_norm_cpu(*args, 1, 2.0, partials.data_ptr(), out.data_ptr(), 1)
    with pytest.raises(ValueError, match="unknown norm kind 9"):
        C.grad_norm_cpu(*args, 9, 2.0, partials.data_ptr(), out.data_ptr(), 1)
    scalars = (1.0, 0.1, 0.999, 0.001, 1.0, -1e-3, 1e-8, 1.0)
    with pytest.raises(ValueError, match="unknown param dtype code 5"):
        C.adamw_cpu(*args, 5, 0, False, False, scalars, 1)
    with pytest.raises(ValueError, match="master weights"):
        C.adamw_cpu(*args, 0, 0, True, False, scalars, 1)
    with pytest.raises(ValueError, match="8 entries"):
        C.adamw_cpu(*args, 0, 0, False, False, scalars[:7], 1)
