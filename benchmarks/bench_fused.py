"""RMSNorm (+ fused residual), SwiGLU and rotary: ours against their peers in the same run.

Shapes are the anchors' (../shared/anchors): RMSNorm 32768 × 4096, SwiGLU 16384 × 14336, rotary on q (32 heads) and
k (8 heads) of 32768 tokens at head dim 128, all bf16, plus the InternLM2-7B wqkv output (8 KV groups of 4 + 2 heads)
for the fused wqkv rotary. Peers: eager torch, the same function under torch.compile, torch.nn.functional.rms_norm and
Liger when installed. Figures are GB/s of the minimum traffic an implementation must move (E = elements of one
activation, 2 bytes each), the same count for every implementation of a group, so ratios are ratios of time:

    rms_norm fwd           x in, y out                                   2E
    rms_norm fwd+bwd       + dy, x in, dx out                            5E   (also casting_mode="none")
    add+rms_norm fwd       x, residual in, y, h out                      4E
    add+rms_norm fwd+bwd   + dy, dh, h in, dx out                        8E
    swiglu fwd             gate, up in, out                              3E
    swiglu fwd+bwd         + dout, gate, up in, dgate, dup out           8E   (also with gate/down multipliers)
    rotary q+k             q, k in and out                               2E
    wqkv rotary            wqkv output in, q, k, v out                   2E

Inputs require grad in forward-only timings too (as the anchors measured). On CPU the shapes are tiny and ours needs
TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools

import pytest
import torch
from common import OURS, device, peer_available, record

import internlm_kernels as ik
from internlm_kernels.backend import triton_runs_on

ON_GPU = torch.cuda.is_available()
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BYTES = 2 if ON_GPU else 4
T_RMS, H_RMS = (32768, 4096) if ON_GPU else (64, 200)
T_SWIGLU, I_SWIGLU = (16384, 14336) if ON_GPU else (64, 300)
T_ROPE, HQ, HKV, D = (32768, 32, 8, 128) if ON_GPU else (64, 4, 2, 32)
EPS = 1e-6
DT = str(DTYPE).replace("torch.", "")


def _ours_available():
    if not triton_runs_on(device()):
        pytest.skip("our Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def _liger(module: str, name: str):
    if not (ON_GPU and peer_available("liger_kernel")):
        pytest.skip("Liger is installed only on GPU machines")
    return getattr(__import__(f"liger_kernel.ops.{module}", fromlist=[name]), name)


def _randn(*shape, grad=True):
    return torch.randn(*shape, device=device(), dtype=DTYPE).requires_grad_(grad)


def _bench(benchmark, impl, group, elements, fn):
    record(benchmark, fn, group=group, impl=impl, metric="GB/s", work=elements * BYTES)


def _fwd_bwd(fn, inputs, grads):
    return lambda: torch.autograd.grad(fn(), inputs, grads)


# --------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------
def _rms_eager(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w


def _add_rms_eager(x, r, w):
    h = x + r
    return _rms_eager(h, w), h


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


def _rms_fn(impl):
    if impl == OURS:
        _ours_available()
        return lambda x, w: ik.rms_norm(x, w, EPS)
    if impl == "eager":
        return _rms_eager
    if impl == "torch.compile":
        return _compiled(_rms_eager)
    if impl == "F.rms_norm":
        return lambda x, w: torch.nn.functional.rms_norm(x, (x.shape[-1],), w, EPS)
    liger = _liger("rms_norm", "LigerRMSNormFunction")
    return lambda x, w: liger.apply(x, w, EPS, 0.0, "llama", False)


def _add_rms_fn(impl):
    if impl == OURS:
        _ours_available()
        return lambda x, r, w: ik.rms_norm(x, w, EPS, r, prenorm=True)
    if impl == "eager":
        return _add_rms_eager
    if impl == "torch.compile":
        return _compiled(_add_rms_eager)
    liger = _liger("rms_norm", "LigerRMSNormFunction")

    def add_then_liger(x, r, w):
        h = x + r
        return liger.apply(h, w, EPS, 0.0, "llama", False), h
    return add_then_liger


RMS_IMPLS = [OURS, "eager", "torch.compile", "F.rms_norm", "liger"]
RMS_SHAPE = f"{T_RMS}x{H_RMS} {DT}"


@pytest.mark.parametrize("impl", RMS_IMPLS)
def test_rms_norm_fwd(benchmark, impl):
    fn, x, w = _rms_fn(impl), _randn(T_RMS, H_RMS), _randn(H_RMS)
    _bench(benchmark, impl, f"rms_norm fwd {RMS_SHAPE}", 2 * x.numel(), lambda: fn(x, w))


@pytest.mark.parametrize("impl", RMS_IMPLS)
def test_rms_norm_fwd_bwd(benchmark, impl):
    fn, x, w = _rms_fn(impl), _randn(T_RMS, H_RMS), _randn(H_RMS)
    _bench(benchmark, impl, f"rms_norm fwd+bwd {RMS_SHAPE}", 5 * x.numel(),
           _fwd_bwd(lambda: fn(x, w), (x, w), torch.randn_like(x)))


def _rms_none_eager(x, w):
    """Liger's casting_mode "none": the same expression without an upcast (statistics and scaling in x's dtype)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def _rms_none_fn(impl):
    if impl == OURS:
        _ours_available()
        return lambda x, w: ik.rms_norm(x, w, EPS, casting_mode="none")
    if impl == "eager":
        return _rms_none_eager
    if impl == "torch.compile":
        return _compiled(_rms_none_eager)
    liger = _liger("rms_norm", "LigerRMSNormFunction")
    return lambda x, w: liger.apply(x, w, EPS, 0.0, "none", False)


@pytest.mark.parametrize("impl", [OURS, "eager", "torch.compile", "liger"])
def test_rms_norm_casting_none_fwd_bwd(benchmark, impl):
    fn, x, w = _rms_none_fn(impl), _randn(T_RMS, H_RMS), _randn(H_RMS)
    _bench(benchmark, impl, f"rms_norm casting_mode=none fwd+bwd {RMS_SHAPE}", 5 * x.numel(),
           _fwd_bwd(lambda: fn(x, w), (x, w), torch.randn_like(x)))


@pytest.mark.parametrize("impl", [OURS, "eager", "torch.compile", "liger"])
def test_add_rms_norm_fwd(benchmark, impl):
    fn, x, r, w = _add_rms_fn(impl), _randn(T_RMS, H_RMS), _randn(T_RMS, H_RMS), _randn(H_RMS)
    _bench(benchmark, impl, f"residual add + rms_norm fwd {RMS_SHAPE}", 4 * x.numel(), lambda: fn(x, r, w))


@pytest.mark.parametrize("impl", [OURS, "eager", "torch.compile", "liger"])
def test_add_rms_norm_fwd_bwd(benchmark, impl):
    fn, x, r, w = _add_rms_fn(impl), _randn(T_RMS, H_RMS), _randn(T_RMS, H_RMS), _randn(H_RMS)
    grads = (torch.randn_like(x), torch.randn_like(x))
    _bench(benchmark, impl, f"residual add + rms_norm fwd+bwd {RMS_SHAPE}", 8 * x.numel(),
           _fwd_bwd(lambda: fn(x, r, w), (x, r, w), grads))


# --------------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------------
def _swiglu_eager(a, b):
    return torch.nn.functional.silu(a) * b


def _swiglu_packed_eager(ab):
    a, b = ab.chunk(2, dim=-1)
    return torch.nn.functional.silu(a) * b


def _swiglu_fn(impl):
    if impl == OURS:
        _ours_available()
        return ik.swiglu
    if impl == "eager":
        return _swiglu_eager
    if impl == "torch.compile":
        return _compiled(_swiglu_eager)
    return _liger("swiglu", "LigerSiLUMulFunction").apply


def _swiglu_packed_fn(impl):
    if impl == OURS:
        _ours_available()
        return ik.swiglu_packed
    return _swiglu_packed_eager if impl == "eager" else _compiled(_swiglu_packed_eager)


SWIGLU_SHAPE = f"{T_SWIGLU}x{I_SWIGLU} {DT}"


@pytest.mark.parametrize("impl", [OURS, "eager", "torch.compile", "liger"])
def test_swiglu_fwd(benchmark, impl):
    fn, a, b = _swiglu_fn(impl), _randn(T_SWIGLU, I_SWIGLU), _randn(T_SWIGLU, I_SWIGLU)
    _bench(benchmark, impl, f"swiglu fwd {SWIGLU_SHAPE}", 3 * a.numel(), lambda: fn(a, b))


@pytest.mark.parametrize("impl", [OURS, "eager", "torch.compile", "liger"])
def test_swiglu_fwd_bwd(benchmark, impl):
    fn, a, b = _swiglu_fn(impl), _randn(T_SWIGLU, I_SWIGLU), _randn(T_SWIGLU, I_SWIGLU)
    _bench(benchmark, impl, f"swiglu fwd+bwd {SWIGLU_SHAPE}", 8 * a.numel(),
           _fwd_bwd(lambda: fn(a, b), (a, b), torch.randn_like(a)))


GATE_MULT, DOWN_MULT = 0.5, 2.0   # Falcon-H1-style mlp_multipliers


def _swiglu_mult_eager(a, b):
    return torch.nn.functional.silu(a * GATE_MULT) * b * DOWN_MULT


def _swiglu_mult_fn(impl):
    if impl == OURS:
        _ours_available()
        return lambda a, b: ik.swiglu(a, b, GATE_MULT, DOWN_MULT)
    if impl == "eager":
        return _swiglu_mult_eager
    if impl == "torch.compile":
        return _compiled(_swiglu_mult_eager)
    liger = _liger("swiglu", "LigerSiLUMulFunction")
    return lambda a, b: liger.apply(a, b, GATE_MULT, DOWN_MULT)


@pytest.mark.parametrize("impl", [OURS, "eager", "torch.compile", "liger"])
def test_swiglu_multipliers_fwd_bwd(benchmark, impl):
    fn, a, b = _swiglu_mult_fn(impl), _randn(T_SWIGLU, I_SWIGLU), _randn(T_SWIGLU, I_SWIGLU)
    _bench(benchmark, impl, f"swiglu gate/down multipliers fwd+bwd {SWIGLU_SHAPE}", 8 * a.numel(),
           _fwd_bwd(lambda: fn(a, b), (a, b), torch.randn_like(a)))


@pytest.mark.parametrize("impl", [OURS, "eager", "torch.compile"])
def test_swiglu_packed_fwd_bwd(benchmark, impl):
    fn, ab = _swiglu_packed_fn(impl), _randn(T_SWIGLU, 2 * I_SWIGLU)
    dout = torch.randn(T_SWIGLU, I_SWIGLU, device=device(), dtype=DTYPE)
    _bench(benchmark, impl, f"swiglu packed [gate|up] fwd+bwd {SWIGLU_SHAPE}", 4 * ab.numel(),
           _fwd_bwd(lambda: fn(ab), (ab,), dout))


# --------------------------------------------------------------------------------------------------
# Rotary
# --------------------------------------------------------------------------------------------------
def _tables():
    return ik.rotary_cos_sin(T_ROPE, D, theta=1e6, device=device())  # float32 (T_ROPE, D / 2)


def _rope_eager(q, k, cos, sin):
    """Rotate-half RoPE as transformers writes it: q (1, H, S, D), cos/sin (1, 1, S, D)."""
    def rotate_half(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat((-x2, x1), -1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _full_tables():
    cos, sin = _tables()
    return (torch.cat((cos, cos), -1)[None, None].to(DTYPE), torch.cat((sin, sin), -1)[None, None].to(DTYPE))


@pytest.mark.parametrize("impl", [OURS, "eager", "torch.compile", "liger"])
def test_rotary_q_k_fwd(benchmark, impl):
    group = f"rotary q ({HQ} heads) + k ({HKV} heads) fwd, {T_ROPE} tokens d{D} {DT}"
    elements = 2 * T_ROPE * (HQ + HKV) * D
    if impl == OURS:
        _ours_available()
        q, k = _randn(1, T_ROPE, HQ, D), _randn(1, T_ROPE, HKV, D)   # flash-attn layout (B, S, H, D)
        cos, sin = _tables()
        _bench(benchmark, impl, group, elements,
               lambda: (ik.apply_rotary_emb(q, cos, sin), ik.apply_rotary_emb(k, cos, sin)))
        return
    q, k = _randn(1, HQ, T_ROPE, D), _randn(1, HKV, T_ROPE, D)       # transformers layout (B, H, S, D)
    cos, sin = _full_tables()
    if impl == "liger":
        liger = _liger("rope", "LigerRopeFunction")
        _bench(benchmark, impl, group, elements, lambda: liger.apply(q, k, cos[0], sin[0]))
        return
    fn = _rope_eager if impl == "eager" else _compiled(_rope_eager)
    _bench(benchmark, impl, group, elements, lambda: fn(q, k, cos, sin))


def _split_then_rope_eager(wqkv_out, cos, sin):
    """The unfused path: view the packed output by KV group, split q, k, v, move heads first, rotate q and k."""
    qkv = wqkv_out.view(1, T_ROPE, HKV, HQ // HKV + 2, D)
    q = qkv[..., :-2, :].reshape(1, T_ROPE, HQ, D).transpose(1, 2)
    k, v = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
    q, k = _rope_eager(q, k, cos, sin)
    return q, k, v.contiguous()


@pytest.mark.parametrize("impl", [OURS, "eager", "torch.compile"])
def test_wqkv_rotary_fwd_bwd(benchmark, impl):
    group = f"wqkv -> rotated q, k and v fwd+bwd, {HKV} groups of {HQ // HKV}+2 heads, {T_ROPE} tokens d{D} {DT}"
    wqkv_out = _randn(T_ROPE, (HQ + 2 * HKV) * D)
    if impl == OURS:
        _ours_available()
        cos, sin = _tables()
        fn = lambda: ik.qkv_rotary(wqkv_out.view(1, T_ROPE, -1), cos, sin, HKV, D)  # noqa: E731
    else:
        cos, sin = _full_tables()
        split = _split_then_rope_eager if impl == "eager" else _compiled(_split_then_rope_eager)
        fn = lambda: split(wqkv_out, cos, sin)  # noqa: E731
    outs = fn()
    grads = [torch.randn_like(t) for t in outs]
    _bench(benchmark, impl, group, 4 * wqkv_out.numel(), _fwd_bwd(fn, (wqkv_out,), grads))
