"""Issue 9 item 5: eager calls skip torch.library's dispatch (ops/_eager.py) and compute exactly what the dispatched
custom op computes; everything the dispatcher must see (meta/fake tensors, torch.compile) still goes through it.
The per-call overhead itself is measured by benchmarks/bench_overhead.py."""
import pytest
import torch
import torch.nn.functional as F

import internlm_kernels as ik


def _cu(lengths):
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def _cases():
    cu = _cu([3, 6])
    cos, sin = ik.rotary_cos_sin(16, 16)
    return {
        "attention": ((9, 2, 16), (9, 1, 16), (9, 1, 16)),
        "rms_norm": ((5, 24), (24,)),
        "swiglu": ((5, 12), (5, 12)),
        "qkv_rotary": ((9, 48),),
    }, {
        "attention": (lambda q, k, v: ik.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, causal=True),
                      lambda q, k, v: torch.ops.internlm_kernels.flash_attn_varlen_fwd(
                          q, k, v, cu, cu, 0.25, -1, 0, 0.0, None, 0.0, None)[0]),
        "rms_norm": (lambda x, w: ik.rms_norm(x, w, 1e-6),
                     lambda x, w: torch.ops.internlm_kernels.rms_norm_fwd(x, w, 1e-6)[0]),
        "swiglu": (lambda a, b: ik.swiglu(a, b), lambda a, b: torch.ops.internlm_kernels.swiglu_fwd(a, b)),
        "qkv_rotary": (lambda w: torch.cat(ik.qkv_rotary(w, cos, sin, 1, 16, cu_seqlens=cu), 1),
                       lambda w: torch.cat(torch.ops.internlm_kernels.qkv_rotary(w, cos, sin, None, 0, cu, 1, 16,
                                                                                 False), 1)),
    }


@pytest.mark.parametrize("op", ["attention", "rms_norm", "swiglu", "qkv_rotary"])
def test_eager_path_skips_dispatch_and_matches_the_custom_op(op):
    shapes, calls = _cases()
    eager, dispatched = calls[op]
    with ik.use_backend("triton"):
        a = _leaves(*shapes[op])
        out = eager(*a)
        assert "_eager" in type(out.grad_fn).__name__ or any(
            "_eager" in type(f[0]).__name__ for f in out.grad_fn.next_functions if f[0] is not None), out.grad_fn
        grads = torch.autograd.grad(out, a, torch.ones_like(out))
        b = _leaves(*shapes[op])
        ref = dispatched(*b)
        ref_grads = torch.autograd.grad(ref, b, torch.ones_like(ref))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_meta_tensors_take_the_dispatcher():
    """Meta tensors reach the registered fake implementations (the eager path would try to launch)."""
    a, b = torch.randn(5, 12, device="meta"), torch.randn(5, 12, device="meta")
    with ik.use_backend("triton"):
        from internlm_kernels.ops import _eager, swiglu

        out = _eager.call(swiglu.swiglu_fwd, a, b)
    assert out.device.type == "meta" and out.shape == (5, 12)
