"""Attention over a KV cache (flash_attn_with_kvcache and the paged varlen path) against the reference in float64.

Under the interpreter the decode kernel walks keys 16 at a time, so the cache lengths below end mid-block, cross
page edges (pages of 16/32/64) and leave whole splits empty. torch.empty is NaN-poisoned while a test runs (the
fixture of test_attention), so an output element the kernels forget to write fails the comparison.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_close
from test_attention import _poison_empty  # noqa: F401  (autouse fixture)

import internlm_kernels as ik
from internlm_kernels import reference

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"


@dataclasses.dataclass
class Case:
    seqlens: tuple[int, ...] = (0, 13, 37)     # keys already cached, per sequence
    n_q: int = 1                                # query tokens per sequence
    n_new: int | None = None                    # new k/v tokens (None: = n_q; 0: no append)
    hq: int = 4
    hkv: int = 2
    d: int = 32
    page_size: int | None = 16                  # None: contiguous cache
    dtype: torch.dtype = torch.float32
    causal: bool = True
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    rotary: str | None = None                   # None, "half" (InternLM2) or "interleaved" (GPT-J)
    rotary_dim: int | None = None               # None: the head dim
    batch_idx: bool = False                     # contiguous cache rows in another order (cache_batch_idx)
    leftpad: bool = False
    num_splits: int = 1

    def new(self) -> int:
        return self.n_q if self.n_new is None else self.n_new


def build(case: Case):
    """Inputs of one call: (kwargs for flash_attn_with_kvcache, capacity)."""
    B, new = len(case.seqlens), case.new()
    need = max(case.seqlens) + new
    dt = case.dtype
    q = torch.randn(B, case.n_q, case.hq, case.d, device=DEV).to(dt)
    kw = dict(cache_seqlens=torch.tensor(case.seqlens, dtype=torch.int32, device=DEV), causal=case.causal,
              window_size=case.window, softcap=case.softcap, num_splits=case.num_splits)
    if case.page_size is None:
        capacity = need + 3
        rows = B + 1 if case.batch_idx else B
        k_cache = torch.randn(rows, capacity, case.hkv, case.d, device=DEV).to(dt)
        if case.batch_idx:
            kw["cache_batch_idx"] = torch.randperm(rows, device=DEV)[:B].int()
    else:
        pages = -(-need // case.page_size) + 1
        capacity = pages * case.page_size
        n_pages = B * pages + 2
        k_cache = torch.randn(n_pages, case.page_size, case.hkv, case.d, device=DEV).to(dt)
        table = torch.randperm(n_pages, device=DEV)[:B * pages].reshape(B, pages).int()   # pages out of order
        # Entries past a sequence's last page are never read: poison them.
        used = -(-(torch.tensor(case.seqlens, device=DEV) + new) // case.page_size)
        table[torch.arange(pages, device=DEV)[None, :] >= used[:, None]] = -7
        kw["block_table"] = table
    v_cache = torch.randn_like(k_cache)
    if new:
        kw["k"] = torch.randn(B, new, case.hkv, case.d, device=DEV).to(dt)
        kw["v"] = torch.randn(B, new, case.hkv, case.d, device=DEV).to(dt)
    if case.rotary:
        cos, sin = reference.rotary_cos_sin(capacity + 5, case.rotary_dim or case.d, device=DEV)
        kw.update(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=case.rotary == "interleaved")
    if case.alibi:
        kw["alibi_slopes"] = torch.rand(B, case.hq, device=DEV)
    if case.leftpad:
        kw["cache_leftpad"] = (torch.tensor(case.seqlens, device=DEV) // 3).int()
    return q, k_cache, v_cache, kw


def run_and_compare(case: Case):
    q, k_cache, v_cache, kw = build(case)
    kc, vc = k_cache.clone(), v_cache.clone()
    with torch.no_grad(), ik.use_backend("triton"):
        out, lse = ik.flash_attn_with_kvcache(q, kc, vc, return_softmax_lse=True, **kw)
    # The oracle runs in float64 for float32 kernels; for 16-bit ones in their dtype (the reference computes in
    # float32 and rounds the rotated q and k to the input dtype, as the kernels do).
    ref_dt = torch.float64 if case.dtype == torch.float32 else case.dtype
    ref_kw = {name: (t.to(ref_dt) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 4 else t)
              for name, t in kw.items() if name != "num_splits"}
    kc64, vc64 = k_cache.to(ref_dt), v_cache.to(ref_dt)
    want, want_lse = reference.flash_attn_with_kvcache(q.to(ref_dt), kc64, vc64, **ref_kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), "rows that see no key must have lse = +inf"
    assert_close(out, want.to(out.dtype), msg="out")
    assert_close(lse.nan_to_num(posinf=0.0), want_lse.float().nan_to_num(posinf=0.0),
                 atol=1e-5 if case.dtype == torch.float32 else 1e-2, msg="lse")
    assert_close(kc, kc64.to(kc.dtype), msg="k_cache after the append")
    assert_close(vc, vc64.to(vc.dtype), msg="v_cache after the append")
    return out, lse


CASES = {
    "decode-paged16": Case(),
    "decode-contiguous": Case(page_size=None),
    "decode-gqa8-page64": Case(hq=8, hkv=1, page_size=64, seqlens=(70, 1, 5)),
    "page8-smaller-than-key-block": Case(page_size=8, n_q=2, num_splits=2),
    "multi-token-causal": Case(n_q=3, seqlens=(0, 5, 29), hq=6, hkv=2, d=24),
    "multi-token-noncausal-mha-page32": Case(n_q=3, causal=False, hq=2, hkv=2, page_size=32),
    "no-append": Case(n_new=0, seqlens=(1, 16, 40)),
    "rotary-half-partial": Case(rotary="half", rotary_dim=16, n_q=2),
    "rotary-interleaved-noncausal": Case(rotary="interleaved", causal=False, n_q=2, page_size=None),
    "splits": Case(num_splits=3, seqlens=(2, 33, 61), n_q=2),
    "splits-more-than-keys": Case(num_splits=5, seqlens=(0, 1, 20)),
    "window": Case(window=(7, 0), n_q=3, num_splits=2),
    "window-right": Case(window=(9, 2), causal=False, n_q=3, rotary="half"),
    "softcap-alibi": Case(softcap=5.0, alibi=True, n_q=2),
    "batch-idx-leftpad": Case(page_size=None, batch_idx=True, leftpad=True, n_q=2, rotary="half", num_splits=2),
    "leftpad-paged": Case(leftpad=True, seqlens=(3, 20, 41)),
    "bf16": Case(dtype=torch.bfloat16, rotary="half", n_q=2, num_splits=2),
    "bf16-contiguous-gqa": Case(dtype=torch.bfloat16, page_size=None, hq=8, hkv=2),
    "fp16-d64": Case(dtype=torch.float16, d=64, seqlens=(17, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    run_and_compare(CASES[name])


def test_empty_cache_sees_no_key():
    """cache_seqlens 0 and nothing appended: every query sees no key (out 0, lse +inf), with 1 and 3 splits."""
    for splits in (1, 3):
        out, lse = run_and_compare(Case(seqlens=(0, 0), n_new=0, num_splits=splits))
        assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isinf(lse).all())


def test_split_count_does_not_change_the_result():
    case = Case(seqlens=(40, 63), n_q=2, n_new=0)
    q, k_cache, v_cache, kw = build(case)
    kw.pop("num_splits")
    with torch.no_grad(), ik.use_backend("triton"):
        outs = [ik.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=s, **kw) for s in (1, 4)]
    for o in outs[1:]:
        assert_close(o, outs[0])


def test_int_cache_seqlens_and_none_means_full_cache():
    q = torch.randn(2, 1, 4, 32, device=DEV)
    k_cache, v_cache = torch.randn(2, 20, 2, 32, device=DEV), torch.randn(2, 20, 2, 32, device=DEV)
    with torch.no_grad(), ik.use_backend("triton"):
        got_int = ik.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=20)
        got_none = ik.flash_attn_with_kvcache(q, k_cache, v_cache)
    want, _ = reference.flash_attn_with_kvcache(q.double(), k_cache.double(), v_cache.double(), cache_seqlens=20)
    assert_close(got_int, want.float())
    assert torch.equal(got_none, got_int)


def test_reference_backend_and_inference_mode():
    q, k_cache, v_cache, kw = build(Case(rotary="half", n_q=2))
    kc, vc = k_cache.clone(), v_cache.clone()
    with torch.inference_mode(), ik.use_backend("triton"):
        got = ik.flash_attn_with_kvcache(q, kc, vc, **kw)
    with torch.inference_mode(), ik.use_backend("reference"):
        want = ik.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
    assert_close(got, want)
    assert_close(kc, k_cache)


@pytest.mark.parametrize("name", ["decode-paged16", "multi-token-noncausal-mha-page32", "rotary-half-partial",
                                  "window-right", "batch-idx-leftpad", "bf16", "no-append"])
def test_cpu_backend_matches_reference(name):
    """The cpu backend (one indexed append, SDPA over the gathered cache) against the reference; the first sequence
    has an empty cache (with no append: its queries see no key)."""
    case = CASES[name]
    q, k_cache, v_cache, kw = build(dataclasses.replace(case, seqlens=(0,) + case.seqlens[1:]))
    kc, vc = k_cache.clone(), v_cache.clone()
    with torch.no_grad(), ik.use_backend(kvcache="cpu"):
        got = ik.flash_attn_with_kvcache(q, kc, vc, **kw)
    with torch.no_grad(), ik.use_backend(kvcache="reference"):
        want = ik.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
    assert_close(got, want)
    assert_close(kc, k_cache)
    with pytest.raises(NotImplementedError, match="return_softmax_lse"), ik.use_backend(kvcache="cpu"):
        ik.flash_attn_with_kvcache(q, kc, vc, return_softmax_lse=True, **{**kw, "k": None, "v": None,
                                                                           "rotary_cos": None, "rotary_sin": None})


@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_varlen_matches_reference(page_size):
    """flash_attn_varlen_func(..., block_table=...): chunked prefill over pages, unequal query and key lengths."""
    lens_q, lens_k = [3, 0, 5, 1], [3, 9, 40, 17]
    hq, hkv, d = 4, 2, 32
    pages = -(-max(lens_k) // page_size)
    n_pages = len(lens_q) * pages + 1
    k_cache = torch.randn(n_pages, page_size, hkv, d, device=DEV)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(n_pages, device=DEV)[:len(lens_q) * pages].reshape(len(lens_q), pages).int()
    q = torch.randn(sum(lens_q), hq, d, device=DEV)
    cu_q = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 3, 12, 52, 69], dtype=torch.int32, device=DEV)
    for kw in (dict(causal=True), dict(causal=False, window_size=(4, 1), softcap=3.0)):
        with torch.no_grad(), ik.use_backend("triton"):
            out, lse, none = ik.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 5, 40, block_table=table,
                                                       return_attn_probs=True, **kw)
        want, want_lse = reference.flash_attn_varlen_paged(q.double(), k_cache.double(), v_cache.double(), cu_q,
                                                           cu_k, table, **kw)
        assert none is None
        assert_close(out, want.float())
        assert_close(lse.nan_to_num(posinf=0.0), want_lse.nan_to_num(posinf=0.0))
    with pytest.raises(ValueError, match="max_seqlen_q"), torch.no_grad():
        ik.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 2, 40, block_table=table)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_paged_varlen_runs_with_grad_and_refuses_at_backward(backend):
    """flash-attn's flash_attn_varlen_func(..., block_table=) runs on q/k/v that require grad: ours returns the same
    values as without grad, and the refusal (no paged backward), naming block_table, comes when a backward reaches
    it."""
    page_size = 16                                            # keys: 5 and 19 (two pages)
    k_cache = torch.randn(5, page_size, 2, 32, device=DEV)
    v_cache = torch.randn_like(k_cache)
    table = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32, device=DEV)
    q = torch.randn(4, 4, 32, device=DEV)
    cu_q = torch.tensor([0, 1, 4], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 5, 24], dtype=torch.int32, device=DEV)
    with ik.use_backend(backend):
        with torch.no_grad():
            want = ik.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 3, 19, causal=True, block_table=table)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k_cache, v_cache))
        out = ik.flash_attn_varlen_func(qg, kg, vg, cu_q, cu_k, 3, 19, causal=True, block_table=table)
    assert out.requires_grad
    assert torch.equal(out.detach(), want)
    with pytest.raises(NotImplementedError, match="block_table"):
        out.sum().backward()


def test_varlen_accepts_block_table_none():
    q = torch.randn(5, 2, 16, device=DEV)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEV)
    assert torch.equal(ik.flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, causal=True, block_table=None),
                       ik.flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, causal=True))


def _bad(name):
    q, k_cache, v_cache, kw = build(Case(rotary="half"))
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, **kw)
    if name == "block_table":
        args["block_table"] = kw["block_table"].clone()
        args["block_table"][2, 0] = k_cache.shape[0]          # a page that does not exist, in a used slot
    elif name == "block_table dtype":
        args["block_table"] = kw["block_table"].long()
    elif name == "cache_seqlens":
        args["cache_seqlens"] = kw["cache_seqlens"] + kw["block_table"].shape[1] * 16
    elif name == "k_cache":
        args["k_cache"] = k_cache.half()
    elif name == "v":
        args["v"] = kw["v"].double()
    elif name == "rotary_cos":
        args["rotary_cos"] = kw["rotary_cos"][:8]
    elif name == "cache_leftpad":
        args["cache_leftpad"] = kw["cache_seqlens"] + 1
    return args


@pytest.mark.parametrize("name, match", [
    ("block_table", "block_table"), ("block_table dtype", "block_table"), ("cache_seqlens", "cache_seqlens"),
    ("k_cache", "k_cache"), ("v", "v has dtype"), ("rotary_cos", "rotary_cos"), ("cache_leftpad", "cache_leftpad"),
])
def test_bad_input_raises_value_error_naming_it(name, match):
    with pytest.raises(ValueError, match=match), torch.no_grad(), ik.use_backend("triton"):
        ik.flash_attn_with_kvcache(**_bad(name))


@pytest.mark.parametrize("name", ["block_table", "cache_seqlens", "cache_seqlens int"])
def test_paged_overflow_is_also_the_runtime_error_flash_attn_raises(name):
    """flash-attn's check of a paged cache too small (or pointing outside the page pool) raises RuntimeError (its
    TORCH_CHECK) mentioning block_table; ours is a ValueError naming the argument and a RuntimeError too."""
    args = _bad("cache_seqlens" if name == "cache_seqlens int" else name)
    if name == "cache_seqlens int":
        args["cache_seqlens"] = args["block_table"].shape[1] * args["k_cache"].shape[1]   # full: no room for k
    with pytest.raises(RuntimeError, match="block_table") as caught, torch.no_grad(), ik.use_backend("triton"):
        ik.flash_attn_with_kvcache(**args)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ik.KVCacheOverflowError)
    assert name.split()[0] in str(caught.value)


def test_paged_varlen_overflow_is_a_runtime_error():
    k_cache = torch.randn(3, 16, 2, 32, device=DEV)
    table = torch.tensor([[0], [2]], dtype=torch.int32, device=DEV)
    q = torch.randn(2, 4, 32, device=DEV)
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 5, 22], dtype=torch.int32, device=DEV)    # 17 keys in a one-page (16) table
    with pytest.raises(RuntimeError, match="block_table") as caught, torch.no_grad():
        ik.flash_attn_varlen_func(q, k_cache, k_cache, cu_q, cu_k, 1, 17, block_table=table)
    assert isinstance(caught.value, ValueError) and "cu_seqlens_k" in str(caught.value)


def test_unsupported_combinations_raise_not_implemented():
    q, k_cache, v_cache, kw = build(Case())
    with pytest.raises(NotImplementedError, match="cache_batch_idx"):
        ik.flash_attn_with_kvcache(q, k_cache, v_cache, cache_batch_idx=torch.arange(3, dtype=torch.int32), **kw)
    with pytest.raises(NotImplementedError, match="inference only"):
        ik.flash_attn_with_kvcache(q.requires_grad_(), k_cache, v_cache, **kw)


def test_opcheck_and_fullgraph_compile():
    q, k_cache, v_cache, kw = build(Case(rotary="half", n_q=2, num_splits=2))
    args = (q, k_cache.clone(), v_cache.clone(), kw["k"], kw["v"], kw["rotary_cos"], kw["rotary_sin"],
            kw["cache_seqlens"], None, None, kw["block_table"], None, 32 ** -0.5, -1, 0, 0.0, False, 2)
    with ik.use_backend("triton"):
        torch.library.opcheck(torch.ops.internlm_kernels.flash_attn_with_kvcache.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        lens_k = (kw["cache_seqlens"] + 1).tolist()
        cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        cu_q = torch.arange(0, 7, 2, dtype=torch.int32, device=DEV)
        torch.library.opcheck(torch.ops.internlm_kernels.flash_attn_varlen_paged.default,
                              (q.reshape(6, 4, 32), k_cache, v_cache, cu_q, cu_k, kw["block_table"], None, 2,
                               32 ** -0.5, -1, 0, 0.0, 2), test_utils=("test_schema", "test_faketensor"))

        def step(q, k_cache, v_cache, k, v):
            return ik.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, kw["rotary_cos"], kw["rotary_sin"],
                                              cache_seqlens=kw["cache_seqlens"], block_table=kw["block_table"],
                                              causal=True, rotary_interleaved=False, num_splits=2)

        kc1, vc1, kc2, vc2 = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
        with torch.no_grad():
            want = step(q, kc1, vc1, kw["k"], kw["v"])
            got = torch.compile(step, fullgraph=True)(q, kc2, vc2, kw["k"], kw["v"])
    assert_close(got, want)
    assert torch.equal(kc2, kc1) and torch.equal(vc2, vc1)


# --------------------------------------------------------------------------------------------------
# GPU (benchmarks/gpu_check.sh)
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 0])
def test_gpu_bf16_decode_shape(splits):
    """The benchmark's shape, smaller: 32 q / 8 kv heads, head dim 128, pages of 64, bf16, auto splits."""
    run_and_compare(Case(seqlens=(700, 5, 1023, 64), hq=32, hkv=8, d=128, page_size=64, dtype=torch.bfloat16,
                         rotary="half", num_splits=splits))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_replays_decode():
    q, k_cache, v_cache, kw = build(Case(seqlens=(100, 3, 250), hq=8, hkv=2, d=64, page_size=64,
                                         dtype=torch.bfloat16, rotary="half", num_splits=0))
    kc, vc = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        want = ik.flash_attn_with_kvcache(q, kc, vc, **kw)
        graph = torch.cuda.CUDAGraph()
        kc2, vc2 = k_cache.clone(), v_cache.clone()
        ik.flash_attn_with_kvcache(q, kc2.clone(), vc2.clone(), **kw)  # compile the kernels outside the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = ik.flash_attn_with_kvcache(q, kc2, vc2, **kw)
        graph.replay()
    assert_close(out, want)
    assert torch.equal(kc2, kc)


@pytest.mark.gpu
def test_gpu_inputs_on_a_device_that_is_not_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q, k_cache, v_cache, kw = build(Case(rotary="half", num_splits=2))
    with torch.no_grad():
        want = ik.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), **kw)
        moved = {n: t.to("cuda:1") if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
        got = ik.flash_attn_with_kvcache(q.to("cuda:1"), k_cache.to("cuda:1"), v_cache.to("cuda:1"), **moved)
    assert_close(got.cpu(), want.cpu())


# --------------------------------------------------------------------------------------------------
# Compiled for Hopper (the interpreter compiles nothing)
# --------------------------------------------------------------------------------------------------
def _compile_for_sm90(kernel, constexprs: dict, types: dict, num_warps: int = 4, num_stages: int = 2):
    """Compile a kernel for sm_90 here (Triton ships ptxas): ``types`` gives each runtime argument's type (default:
    i32); pointers and strides get the 16-divisibility a real launch sees."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or (n.startswith("stride") and n not in ("stride_alibi", "stride_bt"))}
    return triton.compile(ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def _sm90_resource_usage() -> list[tuple[str, str, str]]:
    """(kernel, variant, cuobjdump resource line) of the rollout kernels compiled for sm_90 at the decode benchmark's
    shape (32/8 heads, D 128, pages of 64, bf16). Run with TRITON_INTERPRET=0."""
    import os
    import subprocess
    import tempfile

    import triton

    from internlm_kernels.triton import flash_decode as fd
    from internlm_kernels.triton import linear_logprobs as ll

    bf16, f32, i32 = "*bf16", "*fp32", "*i32"
    attn_types = dict(Q=bf16, KCache=bf16, VCache=bf16, Out=bf16, Lse=f32, OutPart=f32, LsePart=f32, CuQ=i32,
                      SeqlensK=i32, CacheBatchIdx=i32, LeftPad=i32, BlockTable=i32, Alibi=f32, qk_scale="fp32",
                      softcap_log2="fp32")
    attn_flags = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=64, HAS_BATCH_IDX=False,
                      HAS_LEFTPAD=False, HAS_LEFT=False, HAS_RIGHT=True, HAS_SOFTCAP=False, HAS_ALIBI=False,
                      PRECISION=None)
    rows_types = dict(logits_ptr=bf16, target_ptr="*i64", logp_ptr=f32, entropy_ptr=f32, stats_ptr=f32,
                      grad_logp_ptr=f32, grad_ent_ptr=f32, inv_temperature="fp32")
    builds = [
        ("decode attention", "paged, 4 splits",
         fd._decode_attn_kernel, dict(attn_flags, SPLITS=4, PAGED=True, PAGE_SIZE=64), attn_types, 4),
        ("decode attention", "contiguous, 1 split",
         fd._decode_attn_kernel, dict(attn_flags, SPLITS=1, PAGED=False, PAGE_SIZE=1), attn_types, 4),
        ("combine splits", "4 splits", fd._combine_splits_kernel,
         dict(SPLITS=4, HEAD_DIM=128, BLOCK_S=4, BLOCK_D=128), dict(OutPart=f32, LsePart=f32, Out=bf16, Lse=f32), 4),
        ("append kv", "paged, rotary", fd._append_kv_kernel,
         dict(PAGED=True, PAGE_SIZE=64, HAS_BATCH_IDX=False, HAS_ROTARY=True, INTERLEAVED=False, COPY_TAIL=False,
              BLOCK_T=2, BLOCK_H=8, BLOCK_R=64, BLOCK_TAIL=1, BLOCK_D=128),
         dict(K=bf16, V=bf16, KCache=bf16, VCache=bf16, CacheSeqlens=i32, CacheBatchIdx=i32, BlockTable=i32,
              COS=f32, SIN=f32), 4),
        ("logprob rows", "forward", ll._logprob_rows_kernel,
         dict(BLOCK_V=4096, BACKWARD=False, HAS_ENTROPY_GRAD=False), rows_types, 8),
        ("logprob rows", "backward", ll._logprob_rows_kernel,
         dict(BLOCK_V=4096, BACKWARD=True, HAS_ENTROPY_GRAD=True), rows_types, 8),
    ]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows = []
    for name, variant, kernel, flags, types, warps in builds:
        compiled = _compile_for_sm90(kernel, flags, types, num_warps=warps)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True).stdout
        rows.append((name, variant, " ".join(line.strip() for line in usage.splitlines() if "REG:" in line)))
    return rows


@pytest.mark.skipif(ON_GPU, reason="the GPU run compiles and times the real thing")
def test_rollout_kernels_compile_for_hopper_without_spills():
    """In a subprocess with compiled (not interpreted) Triton: the decode, combine, append and log-prob kernels lower
    to sm_90 without register spills (a GPU-only compile error, e.g. a non-constexpr global, fails here)."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).parents[1]
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_kvcache as t; "
            "print(json.dumps(t._sm90_resource_usage()))")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) == 6
    for name, variant, usage in rows:
        assert "STACK:0 " in usage + " " and "LOCAL:0 " in usage + " ", (name, variant, usage)
