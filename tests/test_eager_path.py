"""Issue 9 item 5: eager calls skip torch.library's dispatch (ops/_eager.py) and compute exactly what the dispatched
custom op computes; everything the dispatcher must see (meta/fake tensors, torch.compile) still goes through it.
Calls that record no gradient skip autograd.Function too, with bitwise the same outputs; the memoized backend choice
follows every change of its settings. The per-call overhead itself is measured by benchmarks/bench_overhead.py."""
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


def _fast_path_calls():
    """(shapes of the leaves, call) per public op and form: each call runs its op on the given leaves."""
    cu = _cu([3, 6])
    cos, sin = ik.rotary_cos_sin(16, 16)
    return {
        "attention": (((9, 2, 16), (9, 1, 16), (9, 1, 16)),
                      lambda q, k, v: ik.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, causal=True)),
        "attention_lse": (((9, 2, 16), (9, 1, 16), (9, 1, 16)),
                          lambda q, k, v: ik.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, causal=True,
                                                                    return_attn_probs=True)[:2]),
        "rms_norm": (((2, 5, 24), (24,)), lambda x, w: ik.rms_norm(x, w, 1e-6)),
        "add_rms_norm": (((5, 24), (5, 24), (24,)),
                         lambda x, r, w: ik.rms_norm(x, w, 1e-6, residual=r, prenorm=True)),
        "swiglu": (((2, 5, 12), (2, 5, 12)), lambda a, b: ik.swiglu(a, b)),
        "swiglu_packed": (((5, 24),), lambda gu: ik.swiglu_packed(gu)),
        "rotary": (((9, 2, 16),), lambda x: ik.apply_rotary_emb(x, cos, sin, cu_seqlens=cu)),
        "qkv_rotary": (((9, 48),), lambda w: ik.qkv_rotary(w, cos, sin, 1, 16, cu_seqlens=cu)),
    }


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_input_requires_grad"])
@pytest.mark.parametrize("op", list(_fast_path_calls()))
def test_no_autograd_fast_path_matches_the_autograd_path(op, mode):
    """Without a gradient to record, ``_eager.call`` runs the implementation alone (no autograd node); its outputs
    are bitwise the autograd path's, for every public op and form, also on inference tensors."""
    shapes, call = _fast_path_calls()[op]
    with ik.use_backend("triton"):
        leaves = _leaves(*shapes, seed=1)
        with_grad = _as_tuple(call(*leaves))
        assert all(o.grad_fn is not None for o in with_grad if o.is_floating_point())
        plain = [t.detach().clone() for t in leaves]
        if mode == "no_grad":
            with torch.no_grad():
                fast = _as_tuple(call(*plain))
        elif mode == "inference_mode":
            with torch.inference_mode():
                fast = _as_tuple(call(*[t.clone() for t in plain]))   # inference tensors
            assert all(o.is_inference() for o in fast)
        else:
            fast = _as_tuple(call(*plain))
    assert len(fast) == len(with_grad)
    for f, g in zip(fast, with_grad):
        assert f.grad_fn is None and not f.requires_grad
        torch.testing.assert_close(f, g.detach(), rtol=0, atol=0)


def test_backend_choice_follows_the_settings_it_was_memoized_under(monkeypatch):
    """choose() memoizes its answers; a later change of use_backend, INTERNLM_KERNELS_BACKEND or TRITON_INTERPRET
    still changes the answer (or the refusal) at once."""
    from internlm_kernels import backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.choose("swiglu", "cpu") == "cpu"
    with ik.use_backend("triton"):
        assert backend.choose("swiglu", torch.device("cpu")) == "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(backend.BackendUnavailable, match="TRITON_INTERPRET"):
            backend.choose("swiglu", "cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backend.choose("swiglu", "cpu") == "triton"
        with ik.use_backend(swiglu="reference"):
            assert backend.choose("swiglu", "cpu") == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "swiglu=reference")
    assert backend.choose("swiglu", "cpu") == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "*=triton")
    assert backend.choose("swiglu", "cpu") == "triton"
    monkeypatch.delenv(backend.ENV_VAR)
    assert backend.choose("swiglu", "cpu") == "cpu"



def test_dead_functorch_wrappers_and_sparse_tensors_take_the_dispatcher():
    """A tensor that escaped a torch.func transform (a dead functorch wrapper) is routed to the dispatcher, which
    unwraps it: same values and gradients as the plain tensor. The same one C++ test flags sparse tensors."""
    from internlm_kernels.ops import _eager

    escaped = []
    x, b = _leaves((5, 12), (5, 12), seed=3)
    torch.func.grad(lambda t: escaped.append(t) or t.sum())(x.detach())
    dead = escaped[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    assert _eager._subclass_like(dead) and _eager._subclass_like(torch.eye(3).to_sparse())
    with ik.use_backend("triton"):
        out = ik.swiglu(dead, b)
        (grad,) = torch.autograd.grad(out, b, torch.ones_like(out))
        ref = ik.swiglu(x.detach(), b)
        (ref_grad,) = torch.autograd.grad(ref, b, torch.ones_like(ref))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
