"""internlm_kernels.checks (public input checks, the debug switch for value checks) and the per-tensor cache.

Issue 9 item 3 on CPU: a value check must not read a device tensor (a device→host sync) unless the debug switch asks.
A meta tensor stands in for a device tensor: it has a device and no values, so any read of its values raises.
"""
import pytest
import torch
import torch.nn.functional as F

import internlm_kernels as ik
from internlm_kernels import checks
from internlm_kernels._tensor_cache import PerTensorCache


def _cu(lengths, device="cpu"):
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to(device)


def test_debug_switch_from_env_and_code(monkeypatch):
    monkeypatch.delenv(checks.DEBUG_ENV_VAR, raising=False)
    assert not checks.debug_checks_enabled()
    monkeypatch.setenv(checks.DEBUG_ENV_VAR, "1")
    assert checks.debug_checks_enabled()
    with ik.debug_checks(False):
        assert not checks.debug_checks_enabled()
    assert checks.debug_checks_enabled()
    monkeypatch.setenv(checks.DEBUG_ENV_VAR, "0")
    with ik.debug_checks():
        assert checks.debug_checks_enabled()
    assert not checks.debug_checks_enabled()
    with pytest.raises(ValueError, match="enabled"):
        ik.debug_checks("yes")


@pytest.mark.parametrize("debug", [False, True])
def test_value_checks_never_read_a_device_tensor_without_values(debug):
    """cu_seqlens, rotary positions and cross-entropy targets on a device: metadata is checked, values are not read
    (on main the cu_seqlens and target checks read them: a sync on CUDA, an error on meta)."""
    with ik.debug_checks(debug):
        checks.check_cu_seqlens("cu_seqlens", _cu([3, 4], "meta"), 7, torch.device("meta"))
        with ik.use_backend("reference"):
            loss = ik.fused_linear_cross_entropy(torch.randn(6, 8, device="meta"), torch.randn(19, 8, device="meta"),
                                                 torch.zeros(6, dtype=torch.int64, device="meta"))
        assert loss.device.type == "meta"
        with pytest.raises(ValueError, match="cu_seqlens must be int32"):
            checks.check_cu_seqlens("cu_seqlens", _cu([3, 4], "meta").long(), 7, torch.device("meta"))


def test_cpu_values_are_still_checked():
    with pytest.raises(ValueError, match="cu_seqlens_q ends at 7"):
        q = torch.randn(8, 2, 16)
        ik.flash_attn_varlen_func(q, q, q, _cu([3, 4]), _cu([4, 4]), 4, 4)
    with pytest.raises(ValueError, match="non-decreasing"):
        checks.check_cu_seqlens("cu", torch.tensor([0, 5, 3, 8], dtype=torch.int32), 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="target holds class 19"):
        ik.fused_linear_cross_entropy(torch.randn(2, 8), torch.randn(19, 8), torch.tensor([1, 19]))
    cos, sin = ik.rotary_cos_sin(4, 16)
    with pytest.raises(ValueError, match="cos/sin have 4 rows"):
        ik.apply_rotary_emb(torch.randn(7, 2, 16), cos, sin, cu_seqlens=_cu([2, 5]))


def _mixed_device_calls():
    """(argument named in the error, call) where that argument sits on another device (meta) than the rest (cpu)."""
    x, m = torch.randn(9, 2, 16), torch.randn(9, 2, 16, device="meta")
    cu = _cu([4, 5])
    cos, sin = ik.rotary_cos_sin(16, 16)
    return [
        ("k", lambda: ik.flash_attn_varlen_func(x, m, x, cu, cu, 5, 5)),
        ("cu_seqlens_k", lambda: ik.flash_attn_varlen_func(x, x, x, cu, cu.to("meta"), 5, 5)),
        ("v", lambda: ik.flash_attn_func(x[None], x[None], m[None])),
        ("weight", lambda: ik.rms_norm(x, torch.ones(16, device="meta"), 1e-6)),
        ("up", lambda: ik.swiglu(x, m)),
        ("cos", lambda: ik.apply_rotary_emb(x, cos.to("meta"), sin, cu_seqlens=cu)),
        ("cu_seqlens", lambda: ik.qkv_rotary(x.reshape(9, 32).repeat(1, 2), cos, sin, 1, 16,
                                             cu_seqlens=cu.to("meta"))),
        ("target", lambda: ik.fused_linear_cross_entropy(x[:, 0], torch.randn(5, 16),
                                                         torch.zeros(9, dtype=torch.int64, device="meta"))),
    ]


@pytest.mark.parametrize("case", range(8))
def test_mixed_devices_raise_value_error_naming_the_argument(case):
    name, call = _mixed_device_calls()[case]
    with pytest.raises(ValueError, match=rf"^{name} "):
        call()


def test_every_triton_launcher_runs_under_its_inputs_device():
    """Issue 9 item 2: Triton launches on torch's current CUDA device; every host launcher switches to its inputs'
    device first (the GPU test on cuda:1 runs them)."""
    import inspect

    from internlm_kernels.triton import (
        cross_entropy,
        flash_attn_bwd,
        flash_attn_fwd,
        flash_decode,
        linear_logprobs,
        rms_norm,
        rotary,
        swiglu,
    )

    launchers = []
    for module in (cross_entropy, flash_attn_bwd, flash_attn_fwd, flash_decode, linear_logprobs, rms_norm, rotary,
                   swiglu):
        for name, fn in vars(module).items():
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_"):
                if "](" in inspect.getsource(inspect.unwrap(fn)):              # launches: kernel[grid](...)
                    launchers.append(name)
                    assert getattr(fn, "launches_on_input_device", False), f"{module.__name__}.{name}"
    assert len(launchers) >= 11, launchers


def test_per_tensor_cache_reuse_rules():
    calls = []
    cache = PerTensorCache("test", capturable=True)

    def compute(t):
        calls.append(1)
        return t.sum().item()

    t = torch.arange(4.0)
    assert cache.get((t,), "k", lambda: compute(t)) == 6 and cache.get((t,), "k", lambda: compute(t)) == 6
    assert len(calls) == 1
    t.add_(1)                                                   # a new version: recomputed
    assert cache.get((t,), "k", lambda: compute(t)) == 10 and len(calls) == 2
    with torch.inference_mode():
        u = torch.arange(4.0)
        assert cache.get((u,), "k", lambda: compute(u)) == 6
        u.add_(1)                                               # no version counter: never reused
        assert cache.get((u,), "k", lambda: compute(u)) == 10 and len(calls) == 4
    reusing = PerTensorCache("test", capturable=False, reuse_inference=True)
    with torch.inference_mode():
        u = torch.arange(4.0)
        reusing.get((u,), "k", lambda: compute(u))
        reusing.get((u,), "k", lambda: compute(u))
    assert len(calls) == 5
    fresh = torch.arange(4.0)                                   # another tensor with equal values: computed anew
    assert cache.get((fresh,), "k", lambda: compute(fresh)) == 6 and len(calls) == 6


def test_dense_attention_first_called_under_inference_mode_then_trained():
    """flash_attn_func's shared cu_seqlens made under inference_mode must still be saveable for a backward."""
    q = torch.randn(2, 5, 2, 16)
    with ik.use_backend("triton"):
        with torch.inference_mode():
            ik.flash_attn_func(q, q, q, causal=True)
        leaf = q.clone().requires_grad_()
        ik.flash_attn_func(leaf, leaf, leaf, causal=True).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
