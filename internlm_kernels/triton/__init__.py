"""Triton kernels and their launch helpers, one module per op (no autograd here: see internlm_kernels/ops)."""
