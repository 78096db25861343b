"""SwiGLU, silu(m_g · gate) · up · m_d: Triton kernels and their launch helpers (no autograd here).

With σ the logistic sigmoid, a = m_g · gate and the multipliers m_g, m_d (Liger's gate / down multipliers,
Falcon-H1's MLP; both 1 for plain SwiGLU, where multiplying by them is exact), all in float32:

    forward    out   = a · σ(a) · up · m_d
    backward   dgate = dout · m_d · up · σ(a) · (1 + a · (1 - σ(a))) · m_g
               dup   = dout · m_d · a · σ(a)

Elementwise and memory-bound: the forward reads gate and up once and writes out (3 element moves), the backward
reads dout, gate and up once and writes dgate and dup (5), recomputing σ(gate) instead of saving it.

Tensors are seen as rows (M, N) with a row stride and a contiguous last dim. That covers separate gate and up tensors
(row stride N) and one packed tensor holding [gate | up] halves on its last dim, the output of a fused w1/w3 matmul
(gate = packed[:, :N], up = packed[:, N:], both with row stride 2N): the packed form is read in place and its
gradient is written straight into one packed (M, 2N) tensor, so neither a split nor a concatenation is ever copied.
Each program covers a BLOCK_M × BLOCK_N tile (rows × columns) of ~2048 elements, tails masked.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._device import launches_on_input_device
from ._host_math import cdiv, next_power_of_2


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile: (rows (BLOCK_M, 1) int64, cols (1, BLOCK_N), mask (BLOCK_M, BLOCK_N)).

    Rows are int64 because row * stride overflows int32 beyond 2^31 elements."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return rows.to(tl.int64)[:, None], cols[None, :], mask


@triton.jit
def _swiglu_fwd_kernel(
    GATE,         # (M, N) gate rows
    UP,           # (M, N) up rows
    OUT,          # (M, N) output rows
    stride_gate,  # row strides in elements; last dims are contiguous
    stride_up,
    stride_out,
    M,            # rows
    N,            # columns
    gate_mult,    # m_g: gate scaled before the activation
    down_mult,    # m_d: output scale
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask = _tile_offsets(M, N, BLOCK_M, BLOCK_N)
    gate = tl.load(GATE + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32) * gate_mult
    up = tl.load(UP + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up * down_mult
    tl.store(OUT + rows * stride_out + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DOUT,         # (M, N) gradient of out
    GATE,         # (M, N) gate rows from the forward
    UP,           # (M, N) up rows from the forward
    DGATE,        # (M, N) output: gradient of gate
    DUP,          # (M, N) output: gradient of up
    stride_dout,  # row strides in elements; last dims are contiguous
    stride_gate,
    stride_up,
    stride_dgate,
    stride_dup,
    M,            # rows
    N,            # columns
    gate_mult,    # m_g, as in the forward
    down_mult,    # m_d, as in the forward
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, mask = _tile_offsets(M, N, BLOCK_M, BLOCK_N)
    dout = tl.load(DOUT + rows * stride_dout + cols, mask=mask, other=0.0).to(tl.float32) * down_mult
    gate = tl.load(GATE + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32) * gate_mult
    up = tl.load(UP + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig)) * gate_mult
    tl.store(DGATE + rows * stride_dgate + cols, dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + rows * stride_dup + cols, (dout * silu).to(DUP.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=256)   # a few (rows, width) pairs per model; the arithmetic costs more than the lookup
def _tile(M: int, N: int) -> tuple[tuple[int, int], int, int]:
    """(grid, BLOCK_M, BLOCK_N): ~2048-element tiles, whole short rows packed several to a program."""
    block_n = min(2048, next_power_of_2(N))
    block_m = max(1, 2048 // block_n)
    return (cdiv(M, block_m), cdiv(N, block_n)), block_m, block_n


@launches_on_input_device
def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, gate_multiplier: float = 1.0,
                   down_multiplier: float = 1.0) -> None:
    """out = silu(m_g · gate) · up · m_d over rows (M, N); each may be a strided row view (e.g. half of a packed
    tensor)."""
    M, N = gate.shape  # both > 0: the ops layer skips empty tensors
    grid, block_m, block_n = _tile(M, N)
    # Row strides as .stride()[0]: the tuple costs half of what .stride(0) does (it parses its argument).
    _swiglu_fwd_kernel[grid](gate, up, out, gate.stride()[0], up.stride()[0], out.stride()[0], M, N,
                             float(gate_multiplier), float(down_multiplier), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)


@launches_on_input_device
def swiglu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor,
                    dup: torch.Tensor, gate_multiplier: float = 1.0, down_multiplier: float = 1.0) -> None:
    """Write dgate and dup (M, N); dgate and dup may be the two halves of one packed gradient."""
    M, N = gate.shape  # both > 0: the ops layer skips empty tensors
    grid, block_m, block_n = _tile(M, N)
    _swiglu_bwd_kernel[grid](dout, gate, up, dgate, dup, dout.stride()[0], gate.stride()[0], up.stride()[0],
                             dgate.stride()[0], dup.stride()[0], M, N, float(gate_multiplier), float(down_multiplier),
                             BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
