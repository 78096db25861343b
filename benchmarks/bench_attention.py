"""Variable-length flash attention, bf16, causal: ours against its peers in the same run.

Shapes are the anchors' (../shared/anchors/README.md): 16384 tokens packed from documents of 128..4096 tokens
(the anchors' seed-0 mix, 7 documents), causal per document, with InternLM2-7B heads (32 query, 8 KV, d 128), the
1.8B heads (16 query, 8 KV, d 128), 32 heads of d 64 and 16 heads of d 256; and one dense causal 16k sequence with
the 7B heads. Peers, where and as the anchors measured them: torch.nn.attention.varlen.varlen_attn on every packed
shape (on K/V repeated to the query heads, as it needs), flex_attention compiled with a document block mask on the
7B shape, and SDPA's flash and cuDNN backends on the dense sequence.

Figures: TFLOP/s counted as 4·L²·D·Hq/2 per causal document forward, ×3.5 for forward+backward (the anchors'
convention), and in the note the fraction of the card's bf16 matmul peak measured in the same run (8192³).
On CPU only a tiny case runs (ours needs TRITON_INTERPRET=1 there; the peer is the reference).

CPU section (``test_cpu_attention``, CPU machines only): the cpu backend's attention, float32, causal, with the tiny
preset's heads (4 query, 2 KV, d 32) at the training step's shapes (8 × 256, 4 × 1024 tokens) and on a row packed
from unequal documents, with 1 and 2 torch threads, beside ATen's CPU flash kernel (SDPA on 4-D views, as
transformers' Llama calls it, per document for the unequal row: ``ops.attention_cpu.sdpa_per_document``) in the same
alternating rounds. Ours is the extension's kernels (csrc/cpu/attention_kernels.h) at the ISA ATen dispatches to.
Figures in process CPU time beside wall time (``vs_peer_cpu``, ``vs_peer_wall``): on a shared machine the wall time
is mostly waiting for a core.

ATTN_SWEEP=1 adds a sweep over the block configurations of each kernel at the 7B shape (d 64/128/256), to choose
the table in internlm_kernels/triton/flash_attn.py on a new card.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import os
import pathlib

import pytest
import torch
from common import OURS, device, record, time_interleaved

import internlm_kernels as ik
from internlm_kernels import _ext, reference
from internlm_kernels.backend import triton_runs_on
from internlm_kernels.ops.attention_cpu import sdpa_per_document

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreted kernels need the tests' interpreter fixes (loop bounds under NumPy 2.4, bf16 dot).
    _conftest = pathlib.Path(__file__).parents[1] / "tests" / "conftest.py"
    _spec = importlib.util.spec_from_file_location("_tests_conftest", _conftest)
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
DT = str(DTYPE).replace("torch.", "")
TOTAL = 16384


def doc_lengths(total: int, seed: int = 0) -> list[int]:
    """The anchors' document mix: lengths uniform in [128, 4096] until ``total`` tokens, the last one trimmed."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.randint(128, 4097, (1,), generator=g)))
    lens[-1] -= sum(lens) - total
    if lens[-1] <= 0:
        lens.pop()
        lens[-1] += total - sum(lens)
    return lens


# name: (document lengths, query heads, KV heads, head dim, peers) -- the peers the anchors measured at that shape
GPU_SHAPES = {
    "7b-heads 16k packed": (doc_lengths(TOTAL), 32, 8, 128, ["varlen_attn", "flex_attention"]),
    "1.8b-heads 16k packed": (doc_lengths(TOTAL), 16, 8, 128, ["varlen_attn"]),
    "d64 32-heads 16k packed": (doc_lengths(TOTAL), 32, 32, 64, ["varlen_attn"]),
    "d256 16-heads 16k packed": (doc_lengths(TOTAL), 16, 16, 256, ["varlen_attn"]),
    "7b-heads dense 16k": ([TOTAL], 32, 8, 128, ["sdpa-flash", "sdpa-cudnn"]),
}
CPU_SHAPES = {"tiny packed": ([17, 40, 3], 4, 2, 32, ["reference"])}
SHAPES = GPU_SHAPES if ON_GPU else CPU_SHAPES


def causal_flops(lens, hq, d) -> float:
    return sum(4 * L * L * d * hq / 2 for L in lens)


@functools.lru_cache(maxsize=1)
def matmul_peak_tflops() -> float | None:
    """The card's bf16 matmul TFLOP/s, measured as the anchors did (8192³)."""
    if not ON_GPU:
        return None
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def packed_inputs(lens, hq, hkv, d):
    dev = device()
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q = torch.randn(sum(lens), hq, d, device=dev, dtype=DTYPE, requires_grad=True)
    k = torch.randn(sum(lens), hkv, d, device=dev, dtype=DTYPE, requires_grad=True)
    v = torch.randn(sum(lens), hkv, d, device=dev, dtype=DTYPE, requires_grad=True)
    return q, k, v, cu


def attention_fn(impl: str, lens, q, k, v, cu):
    """(forward callable, its differentiable inputs) for one implementation, on the packed (T, H, D) inputs."""
    hq, hkv = q.shape[1], k.shape[1]
    mx = max(lens)
    if impl == OURS:
        if not triton_runs_on(q.device):
            pytest.skip("our Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")

        def ours():
            with ik.use_backend("triton"):
                return ik.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, causal=True)
        return ours, (q, k, v)
    if impl == "reference":
        return lambda: reference.flash_attn_varlen(q, k, v, cu, cu, causal=True)[0], (q, k, v)
    if not ON_GPU:
        pytest.skip(f"{impl} is a GPU peer")
    if impl == "varlen_attn":
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            pytest.skip("torch.nn.attention.varlen is missing in this torch")
        kk = k.detach().repeat_interleave(hq // hkv, 1).requires_grad_()
        vv = v.detach().repeat_interleave(hq // hkv, 1).requires_grad_()
        params = inspect.signature(varlen_attn).parameters
        kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        return lambda: varlen_attn(q, kk, vv, cu, cu, mx, mx, **kw), (q, kk, vv)
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        doc = torch.repeat_interleave(torch.arange(len(lens), device=q.device), torch.tensor(lens, device=q.device))

        def mask_mod(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)
        T = q.shape[0]
        block_mask = create_block_mask(mask_mod, 1, 1, T, T, device=q.device)
        flex = torch.compile(flex_attention)
        qb, kb, vb = (t.detach().transpose(0, 1).unsqueeze(0).requires_grad_() for t in (q, k, v))
        return lambda: flex(qb, kb, vb, block_mask=block_mask, enable_gqa=True), (qb, kb, vb)
    if impl.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[impl]
        qb, kb, vb = (t.detach().transpose(0, 1).unsqueeze(0).requires_grad_() for t in (q, k, v))

        def sdpa():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
        return sdpa, (qb, kb, vb)
    raise ValueError(impl)


def _cases():
    for name, (*_, peers) in SHAPES.items():
        for impl in [OURS, *peers]:
            yield pytest.param(name, impl, id=f"{name}-{impl}")


def _record(benchmark, name, impl, pass_name, fn, flops):
    peak = matmul_peak_tflops()
    ms_flops = record(benchmark, fn, group=f"attention {pass_name} {name} causal {DT}", impl=impl,
                      metric="TFLOP/s", work=flops, unit_scale=1e-12, matmul_peak_tflops=peak)
    if peak:
        benchmark.extra_info["note"] = f"{100 * ms_flops / peak:.0f}% of {peak:.0f} TFLOP/s matmul peak"
    if ON_GPU:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("name,impl", list(_cases()))
def test_attention_forward(benchmark, name, impl):
    lens, hq, hkv, d, _ = SHAPES[name]
    fn, _ = attention_fn(impl, lens, *packed_inputs(lens, hq, hkv, d))
    with torch.no_grad():
        fn()  # compile / autotune outside the timing
        _record(benchmark, name, impl, "fwd", fn, causal_flops(lens, hq, d))


@pytest.mark.parametrize("name,impl", list(_cases()))
def test_attention_forward_backward(benchmark, name, impl):
    lens, hq, hkv, d, _ = SHAPES[name]
    fn, leaves = attention_fn(impl, lens, *packed_inputs(lens, hq, hkv, d))
    dout = torch.randn_like(fn())

    def step():
        return torch.autograd.grad(fn(), leaves, dout)
    step()
    _record(benchmark, name, impl, "fwd+bwd", step, 3.5 * causal_flops(lens, hq, d))


# ------------------------------------------------------------------------------------------------------------------
# CPU: the cpu backend's float32 attention against ATen's CPU flash kernel
# ------------------------------------------------------------------------------------------------------------------
CPU_PEER = "aten-flash-sdpa"
CPU_ATTN_CASES = {"8x256": [256] * 8, "4x1024": [1024] * 4, "packed unequal": [700, 17, 300, 5, 1000, 26]}
CPU_ATTN_REPS = 15
_cpu_attn_ms: dict[tuple, dict[str, tuple[float, float]]] = {}


def _cpu_attention_cases():
    if ON_GPU:
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason="CPU machines only"))]
    return [pytest.param(name, threads, pass_name, id=f"cpu-{name.replace(' ', '-')}-{threads}t-{pass_name}")
            for name in CPU_ATTN_CASES for threads in (1, 2) for pass_name in ("fwd", "fwd+bwd")]


@pytest.mark.parametrize("name,threads,pass_name", _cpu_attention_cases())
def test_cpu_attention(benchmark, name, threads, pass_name):
    if _ext.why_unavailable("cpu") is not None:
        pytest.skip("the extension is not built")
    from internlm_kernels.cpu import attention as cpu_attention

    lens, hq, hkv, d = CPU_ATTN_CASES[name], 4, 2, 32
    torch.manual_seed(0)
    q, k, v, cu = packed_inputs(lens, hq, hkv, d)
    dout = torch.randn_like(q)
    scale = d ** -0.5
    impls = {OURS: lambda: cpu_attention.attention(q, k, v, cu, cu, scale, True),
             CPU_PEER: lambda: sdpa_per_document(q, k, v, cu, cu, scale, True)}
    if pass_name == "fwd":
        fns = {n: torch.no_grad()(f) for n, f in impls.items()}
    else:
        fns = {n: (lambda f=f: torch.autograd.grad(f(), (q, k, v), dout)) for n, f in impls.items()}
    flops = causal_flops(lens, hq, d) * (1 if pass_name == "fwd" else 3.5)
    key = (name, threads, pass_name)
    prior = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if key not in _cpu_attn_ms:
            _cpu_attn_ms[key] = time_interleaved(fns, reps=CPU_ATTN_REPS)
        (wall, cpu), (peer_wall, peer_cpu) = _cpu_attn_ms[key][OURS], _cpu_attn_ms[key][CPU_PEER]
        record(benchmark, fns[OURS], group=f"cpu attention {pass_name} tiny heads {name} causal float32, "
               f"{threads} thread(s)", impl=OURS, metric="TFLOP/s", work=flops, unit_scale=1e-12, ms=wall,
               cpu_ms=cpu, tflops_cpu_time=flops * 1e-12 / (cpu * 1e-3), peer=CPU_PEER, peer_ms=peer_wall,
               peer_cpu_ms=peer_cpu, peer_tflops_cpu_time=flops * 1e-12 / (peer_cpu * 1e-3),
               vs_peer_wall=peer_wall / wall, vs_peer_cpu=peer_cpu / cpu,
               kernel_isa=("baseline", "AVX2", "AVX512")[_ext.load().attention_isa_cpu(cpu_attention.isa())],
               load_average=os.getloadavg()[0])
    finally:
        torch.set_num_threads(prior)


# ------------------------------------------------------------------------------------------------------------------
# Block-configuration sweep (ATTN_SWEEP=1, GPU): each kernel alone, the others at their table entry
# ------------------------------------------------------------------------------------------------------------------
SWEEP = {
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
    "dkdv": [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (32, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 1)],
    "dq": [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 2), (128, 128, 8, 2)],
}


def _sweep_cases():
    if not (ON_GPU and os.environ.get("ATTN_SWEEP") == "1"):
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason="set ATTN_SWEEP=1 on a GPU"))]
    return [pytest.param(d, kernel, cfg, id=f"d{d}-{kernel}-{'x'.join(map(str, cfg))}")
            for d in (64, 128, 256) for kernel, cfgs in SWEEP.items() for cfg in cfgs]


@pytest.mark.parametrize("d,kernel,cfg", _sweep_cases())
def test_block_config_sweep(benchmark, d, kernel, cfg):
    from internlm_kernels.triton import flash_attn, flash_attn_bwd, flash_attn_fwd

    lens, hq, hkv = doc_lengths(TOTAL), (32 if d < 256 else 16), 8
    q, k, v, cu = (t.detach() if t.is_floating_point() else t for t in packed_inputs(lens, hq, hkv, d))
    block = flash_attn.BlockConfig(*cfg)
    table = flash_attn.choose_configs(d, q.dtype, q.device)
    args = (cu, cu, d ** -0.5, -1, 0, 0.0, None, 0.0, None)
    if kernel == "fwd":
        fn = functools.partial(flash_attn_fwd.flash_attn_fwd, q, k, v, *args, config=block)
        flops = causal_flops(lens, hq, d)
    else:
        out, lse = flash_attn_fwd.flash_attn_fwd(q, k, v, *args)
        configs = dataclasses.replace(table, **{kernel: block})
        fn = functools.partial(flash_attn_bwd.flash_attn_bwd, torch.randn_like(out), q, k, v, out, lse, None,
                               *args, configs=configs)
        flops = 2.5 * causal_flops(lens, hq, d)  # the whole backward; only this kernel's blocks differ
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for this configuration
        pytest.skip(f"config {cfg} does not run: {str(e)[:120]}")
    record(benchmark, fn, group=f"attention sweep {kernel} d{d} 16k packed causal {DT}",
           impl=f"{OURS} {'x'.join(map(str, cfg))}", metric="TFLOP/s", work=flops, unit_scale=1e-12)
