"""Variable-length flash attention (Triton backend) against reference.flash_attn_varlen in float64.

On CPU the kernels run under the Triton interpreter with small blocks (32 query rows x 16 keys in the forward), so
the sequence lengths below cross block edges, end mid-block and fit in one block. torch.empty is NaN-poisoned while
a test runs, so an output element the kernels forget to write fails the comparison.
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_close

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.triton import flash_attn

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _poison_empty():
    """torch.empty returns NaN-filled memory (integers: their max value) while a test runs."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def cu_seqlens(lens, device=DEV):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def make_inputs(lens_q, lens_k, hq, hkv, d, dtype, device=DEV):
    """Packed q (Σ lens_q, hq, d), k and v (Σ lens_k, hkv, d) and their cu_seqlens; lens_k None = lens_q."""
    lens_k = lens_q if lens_k is None else lens_k
    q = torch.randn(sum(lens_q), hq, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(sum(lens_k), hkv, d, device=device).to(dtype).requires_grad_()
    v = torch.randn(sum(lens_k), hkv, d, device=device).to(dtype).requires_grad_()
    return q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)


def ours(q, k, v, cu_q, cu_k, dout, dlse=None, **kw):
    """(out, lse, dq, dk, dv) of the Triton backend."""
    with ik.use_backend("triton"):
        out, lse, _ = ik.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1 << 20, 1 << 20, return_attn_probs=True, **kw)
    loss = (out.float() * dout).sum() + ((lse * dlse).nan_to_num(posinf=0.0).sum() if dlse is not None else 0.0)
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def expected(q, k, v, cu_q, cu_k, dout, dlse=None, causal=False, window_size=(-1, -1), softcap=0.0,
             alibi_slopes=None, softmax_scale=None, dropout_p=0.0, keep=None):
    """(out, lse, dq, dk, dv) of the reference in float64 from the same (possibly 16-bit) inputs."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = reference.flash_attn_varlen(q64, k64, v64, cu_q, cu_k, softmax_scale, causal, window_size, softcap,
                                           alibi_slopes.double() if alibi_slopes is not None else None, dropout_p,
                                           keep)
    loss = (out * dout.double()).sum()
    if dlse is not None:
        loss = loss + (lse.double() * dlse.double()).nan_to_num(posinf=0.0).sum()
    return (out, lse, *torch.autograd.grad(loss, (q64, k64, v64)))


def check_all(got, want, dtype):
    """Compare (out, lse, dq, dk, dv). 16-bit results get rtol 1e-2 and an absolute tolerance of 1e-2 of the
    tensor's largest magnitude (at least 1e-2): a gradient is a sum over many rows whose bf16 roundings (one ulp is
    0.8% of a value) do not cancel the way the exact terms do."""
    names = ("out", "lse", "dq", "dk", "dv")
    for name, g, w in zip(names, got, want):
        if name == "lse":
            assert torch.equal(torch.isinf(g), torch.isinf(w)), "rows that see no key must have lse = +inf"
            g, w = g.nan_to_num(posinf=0.0), w.float().nan_to_num(posinf=0.0)
            assert_close(g, w, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 2e-3, msg=name)
        else:
            assert g.dtype == dtype, name
            if dtype == torch.float32:
                assert_close(g, w.to(dtype), msg=name)
            else:
                assert_close(g, w.float(), rtol=1e-2, atol=1e-2 * max(1.0, w.abs().max().item()), msg=name)


CASES = {
    # name: (lens_q, lens_k, hq, hkv, d, dtype, kwargs)
    "mha-noncausal-d32": ([1, 2, 17, 63, 64, 65], None, 2, 2, 32, torch.float32, {}),
    "gqa4-causal-d64": ([17, 65, 40, 1], None, 4, 1, 64, torch.float32, dict(causal=True)),
    "gqa8-causal-chunked-prefill": ([5, 33, 1, 20], [40, 33, 70, 20], 8, 1, 32, torch.float32, dict(causal=True)),
    "more-queries-than-keys-empty-rows": ([50, 3, 0, 6], [20, 3, 4, 0], 2, 1, 32, torch.float32, dict(causal=True)),
    "sliding-window-causal": ([70, 9, 33], None, 4, 2, 32, torch.float32, dict(causal=True, window_size=(19, -1))),
    "window-both-sides-softcap": ([45, 64, 3], [60, 30, 3], 2, 2, 32, torch.float32,
                                  dict(window_size=(8, 5), softcap=1.5, softmax_scale=0.4)),
    "right-window-only": ([33, 20], [40, 20], 2, 2, 32, torch.float32, dict(window_size=(-1, 3))),
    "diagonal-only": ([37, 5], None, 2, 1, 32, torch.float32, dict(window_size=(0, 0))),
    "alibi-per-sequence-causal": ([30, 17, 50], [30, 25, 50], 4, 2, 32, torch.float32,
                                  dict(causal=True, alibi=(3, 4))),
    "alibi-per-head-softcap": ([21, 40], None, 2, 1, 32, torch.float32, dict(alibi=(2,), softcap=3.0)),
    "head-dim-40-padded": ([19, 48], None, 2, 1, 40, torch.float32, dict(causal=True)),
    "fp16-gqa2-causal": ([65, 17, 30], None, 4, 2, 64, torch.float16, dict(causal=True)),
    "bf16-causal-window": ([40, 33], None, 2, 1, 32, torch.bfloat16, dict(causal=True, window_size=(24, -1))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    lens_q, lens_k, hq, hkv, d, dtype, kw = CASES[case]
    kw = dict(kw)
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, hq, hkv, d, dtype)
    if "alibi" in kw:
        kw["alibi_slopes"] = torch.rand(kw.pop("alibi"), device=DEV) * 0.5
    dout = torch.randn(q.shape, device=DEV)
    check_all(ours(q, k, v, cu_q, cu_k, dout, **kw), expected(q, k, v, cu_q, cu_k, dout, **kw), dtype)


def test_lse_gradient_flows():
    """A loss on lse too (ring attention merges partial results by lse): its gradient enters dS as p · dlse."""
    q, k, v, cu_q, cu_k = make_inputs([40, 7], [40, 30], 2, 1, 32, torch.float32)
    dout, dlse = torch.randn(q.shape, device=DEV), torch.randn(2, q.shape[0], device=DEV)
    kw = dict(causal=True)
    check_all(ours(q, k, v, cu_q, cu_k, dout, dlse, **kw), expected(q, k, v, cu_q, cu_k, dout, dlse, **kw),
              torch.float32)


def test_deterministic_and_max_seqlen_only_a_hint():
    """Runs give bitwise-equal outputs and gradients whatever max_seqlen (an int or a tensor, even too small) and
    deterministic say."""
    q, k, v, cu_q, cu_k = make_inputs([33, 64, 5], None, 4, 2, 32, torch.float32)
    dout = torch.randn(q.shape, device=DEV)
    results = []
    for max_seqlen, deterministic in ((64, True), (0, False), (10**6, True), (torch.tensor(7), False)):
        with ik.use_backend("triton"):
            out = ik.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen, max_seqlen, causal=True,
                                            deterministic=deterministic)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for again in results[1:]:
        for a, b in zip(results[0], again):
            assert torch.equal(a, b)


def test_flash_attn_func_dense_batch():
    """(B, S, H, D) entry point: every batch row is one sequence, lse comes back (B, H, Sq)."""
    B, Sq, Sk, hq, hkv, d = 2, 21, 37, 4, 2, 32
    q = torch.randn(B, Sq, hq, d, device=DEV, requires_grad=True)
    k = torch.randn(B, Sk, hkv, d, device=DEV, requires_grad=True)
    v = torch.randn(B, Sk, hkv, d, device=DEV, requires_grad=True)
    with ik.use_backend("triton"):
        out, lse, keep = ik.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert keep is None and out.shape == (B, Sq, hq, d) and lse.shape == (B, hq, Sq)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    flat = (q.reshape(B * Sq, hq, d), k.reshape(B * Sk, hkv, d), v.reshape(B * Sk, hkv, d))
    want = expected(*flat, cu_seqlens([Sq] * B), cu_seqlens([Sk] * B), dout.reshape(B * Sq, hq, d), causal=True)
    assert_close(out.reshape(B * Sq, hq, d), want[0].float())
    assert_close(lse.transpose(0, 1).reshape(hq, B * Sq), want[1].float())
    for g, w, t in zip(grads, want[2:], flat):
        assert_close(g.reshape(t.shape), w.float())


def test_strided_inputs_from_packed_qkv():
    """q, k, v sliced out of one packed projection (token stride > heads · D), as InternLM2's wqkv produces."""
    lens, hq, hkv, d = [23, 50], 4, 2, 32
    qkv = torch.randn(sum(lens), hq + 2 * hkv, d, device=DEV, requires_grad=True)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    cu = cu_seqlens(lens)
    dout = torch.randn(q.shape, device=DEV)
    got = ours(q, k, v, cu, cu, dout, causal=True)
    check_all(got, expected(q, k, v, cu, cu, dout, causal=True), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_matches_reference_with_the_same_pattern(dtype):
    """The returned keep pattern is the one the forward and both backward passes applied."""
    lens_q, lens_k = [30, 17], [30, 41]
    q, k, v, cu_q, cu_k = make_inputs(lens_q, lens_k, 4, 2, 32, dtype)
    p = 0.25
    with ik.use_backend("triton"):
        out, lse, keep = ik.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 30, 41, dropout_p=p, causal=True,
                                                   return_attn_probs=True)
    assert keep.shape == (4, q.shape[0], 41) and keep.dtype == torch.bool
    dout = torch.randn(q.shape, device=DEV)
    got = (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
    check_all(got, expected(q, k, v, cu_q, cu_k, dout, causal=True, dropout_p=p, keep=keep), dtype)


def test_dropout_pattern_statistics_and_seeding():
    q, k, v, cu_q, cu_k = make_inputs([64], [64], 2, 2, 16, torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()
    masks = []
    with ik.use_backend("triton"):
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            out, _, keep = ik.flash_attn_func(q[None], k[None], v[None], dropout_p=0.3, return_attn_probs=True)
            masks.append((out, keep))
    (out1, keep1), (out1b, keep1b), (out2, keep2) = masks
    assert torch.equal(out1, out1b) and torch.equal(keep1, keep1b), "same torch seed, same dropout"
    assert not torch.equal(keep1, keep2), "another torch seed, another pattern"
    n = keep1.numel()
    frac = keep1.float().mean().item()
    assert abs(frac - 0.7) < 5 * (0.21 / n) ** 0.5, f"kept fraction {frac} for dropout_p 0.3"
    # Neighbouring rows and heads get independent draws (a counter mix-up would repeat rows).
    assert not torch.equal(keep1[0, 0], keep1[0, 1]) and not torch.equal(keep1[0, 0, 0], keep1[0, 0, 1])


def test_reference_backend_on_cpu_tensors():
    """auto on CPU runs the reference (dropout included, with the pattern it drew)."""
    q, k, v, cu_q, cu_k = make_inputs([9, 14], None, 2, 1, 16, torch.float32, device="cpu")
    out, lse, keep = ik.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 14, 14, dropout_p=0.5, causal=True,
                                               return_attn_probs=True)
    want, want_lse = reference.flash_attn_varlen(q, k, v, cu_q, cu_k, None, True, (-1, -1), 0.0, None, 0.5, keep)
    assert keep.shape == (2, 23, 14)
    assert_close(out, want)
    assert_close(lse, want_lse)


def test_schedule_covers_every_block_once_longest_first():
    lens_q, lens_k = [0, 1, 100, 31, 32, 33], [5, 1, 100, 40, 32, 33]
    cu_q, cu_k = cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")
    for over, lens, total in (("q", lens_q, sum(lens_q)), ("k", lens_k, sum(lens_k))):
        items = flash_attn.build_schedule(cu_q, cu_k, total, 16, over, -1, 0)
        assert items.shape == (flash_attn.num_slots(total, len(lens), 16), 2)
        real = items[items[:, 0] >= 0].tolist()
        assert sorted(map(tuple, real)) == [(b, i) for b, n in enumerate(lens) for i in range(-(-n // 16))]
        assert (items[: len(real), 0] >= 0).all(), "idle slots come last"
    # causal: the last query block of the longest sequence sees the most keys and goes first
    assert flash_attn.build_schedule(cu_q, cu_k, sum(lens_q), 16, "q", -1, 0)[0].tolist() == [2, 6]
    assert flash_attn.build_schedule(cu_q, cu_k, sum(lens_k), 16, "k", -1, 0)[0].tolist() == [2, 0]



def test_backward_schedules_are_the_two_schedules_from_one_cached_entry():
    lens_q, lens_k = [3, 40, 0, 17], [9, 33, 4, 17]
    cu_q, cu_k = cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")
    tq, tk = sum(lens_q), sum(lens_k)
    pair = flash_attn.backward_schedules(cu_q, cu_k, tq, tk, 32, 16, 5, 0)
    assert torch.equal(pair[0], flash_attn.build_schedule(cu_q, cu_k, tk, 16, "k", 5, 0))
    assert torch.equal(pair[1], flash_attn.build_schedule(cu_q, cu_k, tq, 32, "q", 5, 0))
    again = flash_attn.backward_schedules(cu_q, cu_k, tq, tk, 32, 16, 5, 0)
    assert again[0] is pair[0] and again[1] is pair[1]
    # the dQ list is the forward's (same query blocks): one cached list, not a second build
    assert flash_attn.schedule(cu_q, cu_k, tq, 32, "q", 5, 0) is pair[1]
    assert flash_attn.backward_schedules(cu_q, cu_k, tq, tk, 32, 16, -1, 0)[0] is not pair[0]   # other window
    cu_k[1] = 1                                      # modified in place (same total): rebuilt from the new values
    rebuilt = flash_attn.backward_schedules(cu_q, cu_k, tq, tk, 32, 16, 5, 0)
    assert rebuilt[0] is not pair[0]
    assert torch.equal(rebuilt[0], flash_attn.build_schedule(cu_q, cu_k, tk, 16, "k", 5, 0))
    assert torch.equal(rebuilt[1], flash_attn.build_schedule(cu_q, cu_k, tq, 32, "q", 5, 0))


def test_opcheck_custom_ops():
    q, k, v, cu_q, cu_k = make_inputs([5, 11], [7, 11], 2, 1, 16, torch.float32)
    seed = torch.tensor([123], dtype=torch.int64, device=DEV)
    args = (q, k, v, cu_q, cu_k, 0.25, 4, 0, 2.0, torch.rand(2, device=DEV), 0.1, seed)
    with ik.use_backend("triton"):
        torch.library.opcheck(torch.ops.internlm_kernels.flash_attn_varlen_fwd.default, args)
        out, lse = torch.ops.internlm_kernels.flash_attn_varlen_fwd(*args)
        bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                    torch.randn_like(lse), *args[3:])
        torch.library.opcheck(torch.ops.internlm_kernels.flash_attn_varlen_bwd.default, bwd_args)
        torch.library.opcheck(torch.ops.internlm_kernels.flash_attn_dropout_mask.default, (seed, 2, 16, 11, 0.1))


def _bad(**over):
    q, k, v, cu_q, cu_k = make_inputs([4, 6], None, 4, 2, 16, torch.float32, device="cpu")
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=6)
    args.update(over)
    return args


BAD_INPUTS = {
    "cu_seqlens_q": dict(cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int64)),
    "cu_seqlens_k": dict(cu_seqlens_k=torch.tensor([0, 7, 6, 10], dtype=torch.int32)),
    "ends at": dict(cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)),
    "same number of sequences": dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)),
    "multiple of key/value heads": dict(k=torch.randn(10, 3, 16), v=torch.randn(10, 3, 16)),
    "q must have dtype": dict(q=torch.randn(10, 4, 16, dtype=torch.float64)),
    "k has dtype": dict(k=torch.randn(10, 2, 16, dtype=torch.float16)),
    "k is on meta": dict(k=torch.randn(10, 2, 16, device="meta")),
    "v has dtype": dict(v=torch.randn(10, 2, 16, dtype=torch.float16)),
    "v is on meta": dict(v=torch.randn(10, 2, 16, device="meta")),
    "k must have 3 dims": dict(k=torch.randn(10, 2, 16, 1)),
    "v must be a torch.Tensor": dict(v=[[0.0]]),
    "head dim": dict(k=torch.randn(10, 2, 8), v=torch.randn(10, 2, 8)),
    "same shape": dict(v=torch.randn(9, 2, 16)),
    "window_size": dict(window_size=(-2, 0)),
    "softcap": dict(softcap=-1.0),
    "dropout_p": dict(dropout_p=1.0),
    "alibi_slopes must have shape": dict(alibi_slopes=torch.rand(3)),
    "alibi_slopes must have dtype": dict(alibi_slopes=torch.rand(4, dtype=torch.float64)),
    "max_seqlen_k": dict(max_seqlen_k=-1),
    "max_seqlen_q": dict(max_seqlen_q=torch.tensor([1.5])),
    "deterministic": dict(deterministic="yes"),
}


@pytest.mark.parametrize("message", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(message):
    with pytest.raises(ValueError, match=message):
        ik.flash_attn_varlen_func(**_bad(**BAD_INPUTS[message]))


@pytest.mark.parametrize("message, over", [("q must have 4 dims", dict(q=torch.randn(2, 5, 4, 16, 1))),
                                           ("v has dtype", dict(v=torch.randn(2, 5, 2, 16, dtype=torch.float16))),
                                           ("k must be a torch.Tensor", dict(k=None))])
def test_dense_bad_inputs_raise_value_error(message, over):
    args = dict(q=torch.randn(2, 5, 4, 16), k=torch.randn(2, 5, 2, 16), v=torch.randn(2, 5, 2, 16)) | over
    with pytest.raises(ValueError, match=message):
        ik.flash_attn_func(**args)


def test_unsupported_head_dim_raises_not_implemented():
    q, k, v, cu_q, cu_k = make_inputs([3], None, 1, 1, 264, torch.float32)
    with ik.use_backend("triton"), pytest.raises(NotImplementedError, match="head dim"):
        ik.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 3)


def _compile_for_sm90(kernel, constexprs, cfg):
    """Compile a kernel for sm_90 on this machine (Triton ships ptxas), with the specializations a real launch gets
    (16-byte aligned pointers, strides that are multiples of 16). Returns the compiled kernel."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = {"Lse": "*fp32", "Delta": "*fp32", "Alibi": "*fp32", "Seed": "*i64", "CuQ": "*i32", "CuK": "*i32",
           "Items": "*i32"}
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n[0].isupper():
            sig[n] = ptr.get(n, "*bf16")
        else:
            sig[n] = "fp32" if n in ("qk_scale", "softcap_log2", "dropout_p", "softmax_scale") else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or (n.startswith("stride") and n != "stride_alibi")}
    src = ASTSource(kernel, sig, constexprs=dict(constexprs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def _hopper_resource_usage(cases) -> list[tuple[str, bool, int, str]]:
    """(kernel, uses wgmma and cp.async, shared bytes, cuobjdump resource line) of causal kernels compiled for sm_90
    with the chosen blocks; ``cases`` lists (kernel name, head dim, window, softcap, dropout). Needs compiled (not
    interpreted) kernels: run with TRITON_INTERPRET=0."""
    import os
    import subprocess
    import tempfile

    import triton

    from internlm_kernels.triton import flash_attn_bwd, flash_attn_fwd

    kernels = {"fwd": flash_attn_fwd._attn_fwd_kernel, "dkdv": flash_attn_bwd._attn_bwd_dkdv_kernel,
               "dq": flash_attn_bwd._attn_bwd_dq_kernel}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    rows = []
    for name, d, window, softcap, dropout in cases:
        table = flash_attn.sm90_configs(d, window=window, softcap=softcap, dropout=dropout)
        flags = dict(GROUP=4, HEAD_DIM=d, BLOCK_D=d, HAS_LEFT=window, HAS_RIGHT=True, HAS_SOFTCAP=softcap,
                     HAS_ALIBI=False, HAS_DROPOUT=dropout, PRECISION=None)
        compiled = _compile_for_sm90(kernels[name], flags, getattr(table, name))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True).stdout
        ptx = compiled.asm["ptx"]
        rows.append((f"{name} d={d} window={window} softcap={softcap} dropout={dropout}",
                     "wgmma" in ptx and "cp.async" in ptx, compiled.metadata.shared,
                     " ".join(line.strip() for line in usage.splitlines() if "REG:" in line)))
    return rows


_FEATURES = [(w, s, d) for w in (False, True) for s in (False, True) for d in (False, True)]
# CI compiles the three kernels at d=128 plus the dK/dV combinations that spilled with a single entry per head dim;
# SM90_SWEEP=1 compiles dK/dV for every combination the model zoo uses (window, softcap, dropout × d 64/128/256).
_HOPPER_CASES = ([("fwd", 128, False, False, False), ("dq", 128, False, False, False)]
                 + [("dkdv", d, *f) for d, f in ((128, (False, False, False)), (128, (False, False, True)),
                                                  (128, (True, True, False)), (256, (False, False, False)),
                                                  (64, (False, False, True)))])
if os.environ.get("SM90_SWEEP") == "1":
    _HOPPER_CASES = [("fwd", 128, False, False, False), ("dq", 128, False, False, False)] + [
        ("dkdv", d, *f) for d in (64, 128, 256) for f in _FEATURES]


@pytest.mark.skipif(ON_GPU, reason="the GPU run compiles and times the real thing")
def test_kernels_compile_for_hopper_without_spills():
    """The interpreter compiles nothing: check in a subprocess (kernels compiled, not interpreted) that they lower to
    sm_90 with wgmma and pipelined async copies, fit in shared memory and do not spill registers, dK/dV with each
    feature combination's own blocks."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).parents[1]
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_attention as t; "
            f"print(json.dumps(t._hopper_resource_usage({_HOPPER_CASES!r})))")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for name, fast_path, shared, usage in json.loads(res.stdout.strip().splitlines()[-1]):
        # dK/dV at d=256: no wgmma tile (block_n >= 64) compiles without spills, so its table trades wgmma for
        # spill-free 32-row tiles (flash_attn._SM90_DKDV).
        assert fast_path or name.startswith("dkdv d=256"), f"{name}: no wgmma / cp.async in the PTX"
        assert shared <= 227 * 1024, (name, shared)
        assert "STACK:0 " in usage + " ", (name, usage)


def test_rotary_grid_keeps_batch_off_the_short_axes():
    """Grid axes 1 and 2 hold at most 65,535 programs on CUDA: the rotary launch puts (sequence, token block)
    pairs on axis 0, so a batch or a token count past that limit still launches."""
    from internlm_kernels.triton import rotary

    for batch, seqlen in ((70_000, 1), (1, 70_000 * 64), (3, 5)):
        g = rotary.grid(batch, seqlen, 40, 1, 8)
        assert g[0] == batch * seqlen and all(n <= 65_535 for n in g[1:]), g


# ------------------------------------------------------------------------------------------------------------------
# GPU: bf16 at InternLM2's shapes (run by benchmarks/gpu_check.sh)
# ------------------------------------------------------------------------------------------------------------------
GPU_SHAPES = {
    "7b-heads-d128": (32, 8, 128, {}),
    "d64": (16, 4, 64, {}),
    "d256": (8, 8, 256, {}),
    "7b-heads-window-softcap": (32, 8, 128, dict(window_size=(300, -1), softcap=30.0)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_bf16_packed_documents(shape):
    hq, hkv, d, kw = GPU_SHAPES[shape]
    lens = [1, 127, 128, 129, 700, 2000, 1011]
    q, k, v, cu_q, cu_k = make_inputs(lens, lens, hq, hkv, d, torch.bfloat16)
    dout = torch.randn(q.shape, device=DEV)
    got = ours(q, k, v, cu_q, cu_k, dout, causal=True, **kw)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))  # reference in fp32 on the GPU
    out, lse = reference.flash_attn_varlen(q32, k32, v32, cu_q, cu_k, None, True, kw.get("window_size", (-1, -1)),
                                           kw.get("softcap", 0.0))
    want = (out, lse, *torch.autograd.grad(out, (q32, k32, v32), dout))
    check_all(got, want, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_deterministic_backward_bitwise():
    lens = [3000, 1000, 96]
    q, k, v, cu_q, cu_k = make_inputs(lens, lens, 32, 8, 128, torch.bfloat16)
    dout = torch.randn(q.shape, device=DEV, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        with ik.use_backend("triton"):
            out = ik.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3000, 3000, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
