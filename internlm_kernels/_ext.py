"""The compiled extension internlm_kernels._C: loading it, saying why a native backend cannot run, and
building the work lists its multi-tensor kernels read.

The extension does not link torch. Tensors cross as integer addresses, dtypes as codes and CUDA streams as
integers; this module (torch) owns and allocates every buffer, including the work lists. A work list is a
table with one int64 row per tensor (layouts in csrc/multi_tensor.h) plus a chunk list (tensor index, first
element) with one row per chunk of ``chunk_size`` elements. Both are cached, keyed on the rows, so a training
step over the same tensors as the step before reuses them and copies nothing to the device; a new list (new
gradient addresses, e.g. after ``zero_grad(set_to_none=True)``) is copied from pinned memory without waiting for the
device, so neither case syncs.
"""
from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import torch


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


@functools.cache
def dtype_codes() -> dict[torch.dtype, int]:
    """Element types the kernels take, with their codes (defined once, in csrc/dtypes.h)."""
    return {getattr(torch, name): code for name, code in load().dtype_codes().items()}


@functools.cache
def norm_kinds() -> dict[str, int]:
    """Norm kinds of the gradient-norm kernels ('l1', 'l2', 'inf', 'p'), with their codes."""
    return dict(load().norm_kinds())


# Below this many elements a CPU kernel runs on one thread: waking the OpenMP team costs more than it saves.
MIN_ELEMENTS_PER_THREAD = 1 << 15


def threads_for(numel: int) -> int:
    """Threads for a CPU kernel over ``numel`` elements: torch's thread count, fewer for small work."""
    return max(1, min(torch.get_num_threads(), numel // MIN_ELEMENTS_PER_THREAD))


def cpu_threads(work: "WorkList") -> int:
    """Threads for a CPU kernel over ``work``'s elements."""
    return threads_for(work.numel)


def cuda_stream(device: torch.device) -> int:
    """The current CUDA stream of ``device``, as the integer the kernels take."""
    return torch.cuda.current_stream(device).cuda_stream


class WorkList(NamedTuple):
    table: torch.Tensor   # (n_tensors, columns) int64 on the kernels' device
    chunks: torch.Tensor  # (n_chunks, 2) int64: tensor index, first element of the chunk
    n_chunks: int
    chunk_size: int
    numel: int            # elements over all tensors
    stream: int | None    # CUDA stream the tables were allocated on (None on CPU)


def build_work_list(rows: list[tuple[int, ...]], numel_column: int, chunk_size: int,
                    device: torch.device) -> WorkList:
    """Tables for ``rows`` (one tuple of int64 columns per tensor) cut into chunks of ``chunk_size`` elements."""
    if chunk_size % load().CHUNK_MULTIPLE:
        raise ValueError(f"chunk_size must be a multiple of {load().CHUNK_MULTIPLE}, got {chunk_size}")
    table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1)        # (n_tensors, columns)
    counts = (table[:, numel_column] + chunk_size - 1) // chunk_size             # chunks per tensor
    tensor_index = torch.repeat_interleave(torch.arange(len(rows)), counts)     # (n_chunks,)
    first_chunk = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    starts = (torch.arange(tensor_index.numel()) - first_chunk) * chunk_size    # (n_chunks,)
    chunks = torch.stack([tensor_index, starts], dim=1)                         # (n_chunks, 2)
    stream = None
    if device.type == "cuda":
        # From pinned memory without blocking: a pageable copy would wait for the device (a sync every time the
        # gradients move, e.g. after zero_grad(set_to_none=True)). The host allocator keeps the pinned buffers until
        # the copies have run.
        table = table.pin_memory().to(device, non_blocking=True)
        chunks = chunks.pin_memory().to(device, non_blocking=True)
        stream = cuda_stream(device)
    return WorkList(table, chunks, chunks.shape[0], chunk_size, sum(row[numel_column] for row in rows), stream)


class WorkLists:
    """Least-recently-used cache of work lists keyed on their rows (addresses, sizes, dtypes).

    A cached list is only reused for exactly the rows it was built from, so reuse is always correct; training
    reuses the same parameter, gradient and state tensors step after step, which makes hits the steady state.
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._lists: collections.OrderedDict[tuple, WorkList] = collections.OrderedDict()
        self._captured: list[WorkList] = []  # read by captured CUDA graphs: never freed

    def get(self, rows: list[tuple[int, ...]], numel_column: int, chunk_size: int,
            device: torch.device) -> WorkList:
        key = (device, chunk_size, tuple(rows))
        work = self._lists.get(key)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A graph replays the launch with this table's address: the table must exist before the capture (its
            # host→device copy is not replayed) and outlive every replay.
            if work is None:
                raise RuntimeError(
                    "the multi-tensor work list for these tensors was not built before CUDA graph capture: run the "
                    "same call once eagerly (a warm-up step) on the same tensors, then capture")
            self._captured.append(work)
        if work is None:
            work = self._lists[key] = build_work_list(rows, numel_column, chunk_size, device)
            while len(self._lists) > self.capacity:
                self._lists.popitem(last=False)
        else:
            self._lists.move_to_end(key)
        if work.stream is not None and work.stream != cuda_stream(device):
            # Used on another stream than it was allocated on: keep the allocator from reusing the memory
            # before that stream's kernels have read it, should the entry be evicted meanwhile.
            stream = torch.cuda.current_stream(device)
            work.table.record_stream(stream)
            work.chunks.record_stream(stream)
        return work

    def __len__(self) -> int:
        return len(self._lists)
