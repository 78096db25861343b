"""Backend selection: auto picks per device, forced backends raise instead of falling back."""
import pytest
import torch

from internlm_kernels import backend
from internlm_kernels.backend import BackendUnavailable, choose, use_backend


def test_auto_on_cpu_never_picks_triton():
    # Under auto, CPU tensors run a CPU implementation (or the reference), even with the interpreter enabled.
    for op in ("attention", "rms_norm", "swiglu", "rotary", "linear"):
        assert choose(op, "cpu") == "cpu"


def test_forced_backend_missing_implementation_raises():
    with use_backend("cuda"):
        with pytest.raises(BackendUnavailable, match="rms_norm has no cuda implementation"):
            choose("rms_norm", "cpu")


def test_forced_backend_wrong_device_raises():
    with use_backend(adamw="cuda"):
        with pytest.raises(BackendUnavailable, match="needs cuda tensors"):
            choose("adamw", "cpu")


def test_forced_triton_without_interpreter_on_cpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"):
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            choose("swiglu", "cpu")


def test_forced_triton_under_interpreter_runs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_backend("triton"):
        assert choose("swiglu", "cpu") == "triton"


def test_env_per_op_and_default(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "attention=reference,*=triton")
    assert backend.requested("attention") == "reference"
    assert backend.requested("rms_norm") == "triton"
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert backend.requested("adamw") == "reference"


def test_context_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    with use_backend("reference"):
        assert backend.requested("rms_norm") == "reference"
        with use_backend(rms_norm="triton"):
            assert backend.requested("rms_norm") == "triton"
            assert backend.requested("swiglu") == "reference"
    assert backend.requested("rms_norm") == "triton"


@pytest.mark.parametrize("spec", ["fastest", "attention=magic", "nonsense_op=triton"])
def test_bad_env_values_raise(monkeypatch, spec):
    monkeypatch.setenv(backend.ENV_VAR, spec)
    with pytest.raises(ValueError, match=backend.ENV_VAR):
        backend.requested("rms_norm")


def test_bad_use_backend_name_raises():
    with pytest.raises(ValueError):
        with use_backend("gpu"):
            pass


def test_public_op_respects_forced_backend():
    import internlm_kernels as ik

    x = torch.randn(3, 8)
    w = torch.ones(8)
    with use_backend(rms_norm="cuda"):
        with pytest.raises(BackendUnavailable):
            ik.rms_norm(x, w)


def test_a_default_linear_lacks_leaves_linear_on_auto_but_a_named_entry_is_forced():
    with use_backend("triton"):
        assert choose("linear", "cpu") == "cpu"
    with use_backend("reference"):
        assert choose("linear", "cpu") == "reference"
    with use_backend(linear="triton"), pytest.raises(BackendUnavailable, match="linear has no triton"):
        choose("linear", "cpu")
