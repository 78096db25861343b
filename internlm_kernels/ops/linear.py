"""Linear layer y = x @ weight.T (+ bias): the model's projections, with a faster CPU path.

Backends: ``reference`` is ``torch.nn.functional.linear`` (cuBLAS on CUDA, the BLAS torch was built with on CPU);
``cpu`` runs oneDNN's inner product forward and backward (internlm_kernels/cpu/linear.py), which ``auto`` picks for
float32 CPU tensors. Other dtypes run the reference under ``auto``; a forced ``cpu`` raises NotImplementedError.
Traced by torch.compile, the cpu backend's matmuls are plain F.linear calls (Inductor chooses the CPU GEMM itself).
"""
from __future__ import annotations

import torch

from .. import cpu, reference
from ..backend import choose
from ..checks import FLOAT_DTYPES, check_same_dtype, check_tensor
from ..cpu import linear as cpu_linear


def linear(x, weight, bias=None):
    """x (..., in_features) @ weight (out_features, in_features).T (+ bias (out_features,)), as F.linear."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES + (torch.float64,))
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the features)")
    check_tensor("weight", weight, ndim=2, device=x.device)
    check_same_dtype("weight", weight, "x", x)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight is {tuple(weight.shape)} but x has {x.shape[-1]} features")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        check_same_dtype("bias", bias, "x", x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} rows")
    if choose("linear", x.device) == "cpu" and cpu.runs_here(
            "linear", x.dtype in cpu_linear.DTYPES and cpu.plain(x, weight, bias),
            f"dtype {x.dtype} (oneDNN takes float32) or tensor subclasses"):
        return cpu_linear.linear(x, weight, bias)
    return reference.linear(x, weight, bias)
