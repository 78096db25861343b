"""The run-time GEMM choice of the cpu linear path (internlm_kernels/cpu/gemm_choice.py): pinned, every product is the
pinned implementation's (bit for bit, so runs are reproducible); measured, the choice is made once per shape class and
then fixed for the process; either way the cpu linear forward and backward equal the reference."""
import json

import pytest
import torch
from conftest import assert_close, oracle_leaf

import internlm_kernels as ik
from internlm_kernels import reference
from internlm_kernels.cpu import gemm_choice


@pytest.fixture(autouse=True)
def unpinned():
    yield
    gemm_choice.pin(None)


@pytest.mark.parametrize("mode", ["onednn", "aten"])
def test_pinned_choice_is_that_implementation(mode, monkeypatch):
    a, b = torch.randn(37, 33), torch.randn(19, 33)
    want = gemm_choice.onednn(a, b, None) if mode == "onednn" else torch.nn.functional.linear(a, b)
    monkeypatch.setenv(gemm_choice.ENV_VAR, mode)
    assert torch.equal(gemm_choice.product(a, b), want)
    dy, x = torch.randn(37, 19), torch.randn(37, 33)     # the weight gradient dyᵀ x
    want_tn = gemm_choice.onednn(dy.t().contiguous(), x.t(), None) if mode == "onednn" else torch.mm(dy.t(), x)
    assert torch.equal(gemm_choice.product_tn(dy, x), want_tn)
    gemm_choice.pin(mode)   # the same in code, over whatever the environment says
    monkeypatch.setenv(gemm_choice.ENV_VAR, "measure")
    assert torch.equal(gemm_choice.product(a, b), want)
    assert torch.equal(gemm_choice.product_tn(dy, x), want_tn)


def test_measured_choice_is_cached_per_shape_class(monkeypatch):
    monkeypatch.setenv(gemm_choice.ENV_VAR, "measure")
    monkeypatch.setattr(gemm_choice, "_cache", {})
    a, b = torch.randn(200, 48), torch.randn(40, 48)
    first = gemm_choice.product(a, b)
    (key, name), = gemm_choice._cache.items()
    assert key[:3] == (*gemm_choice.cpu_id(), torch.get_num_threads()) and key[3:] == (256, 64, 64, True, True)
    assert torch.equal(first, getattr(gemm_choice, name)(a, b, None))
    # Same class (each size rounds up to the same power of two): no new measurement, the same implementation.
    a2, b2 = torch.randn(130, 40), torch.randn(63, 40)
    assert torch.equal(gemm_choice.product(a2, b2), getattr(gemm_choice, name)(a2, b2, None))
    assert len(gemm_choice._cache) == 1
    gemm_choice.product(a, torch.randn(48, 40).t())                     # b a transposed view: another class
    assert len(gemm_choice._cache) == 2
    dy, x = torch.randn(300, 19), torch.randn(300, 33)
    got = gemm_choice.product_tn(dy, x)
    assert len(gemm_choice._cache) == 3 and (*gemm_choice.cpu_id(), torch.get_num_threads(), "tn", 32, 64, 512) in gemm_choice._cache
    torch.testing.assert_close(got, dy.t() @ x, rtol=1e-5, atol=1e-5)   # 300-term fp32 sums, another order
    assert all(v in ("onednn", "aten") for v in gemm_choice.choices().values())


def test_library_isa_caps_scope_the_choices(monkeypatch):
    """MKL's and oneDNN's ISA caps (the Makefile's AVX2_ONLY) select other GEMM kernels, so they are part of the
    scope a measured choice is kept for."""
    for var in gemm_choice.LIBRARY_ISA_CAPS:
        monkeypatch.delenv(var, raising=False)
    model, isa = gemm_choice.cpu_id.__wrapped__()
    assert isa == torch.backends.cpu.get_cpu_capability()
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert gemm_choice.cpu_id.__wrapped__() == (model, f"{isa} MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2")


def test_measured_choice_is_kept_on_disk_and_reused(monkeypatch, tmp_path):
    """The first process measures and writes the file; a later one (an empty in-process cache) takes the file's
    choice without timing anything, even one its own timing would not pick."""
    path = tmp_path / "sub" / "choices.json"
    monkeypatch.setenv(gemm_choice.ENV_VAR, "measure")
    monkeypatch.setenv(gemm_choice.CACHE_ENV_VAR, str(path))
    monkeypatch.setattr(gemm_choice, "_cache", {})
    a, b = torch.randn(70, 24), torch.randn(9, 24)
    gemm_choice.product(a, b)
    (key, name), = gemm_choice._cache.items()
    saved = json.loads(path.read_text())
    assert saved == {gemm_choice._file_key(key): name}
    assert torch.__version__ in next(iter(saved)) and gemm_choice.cpu_id()[0] in next(iter(saved))
    other = "aten" if name == "onednn" else "onednn"
    path.write_text(json.dumps({gemm_choice._file_key(key): other}))
    monkeypatch.setattr(gemm_choice, "_cache", {})                     # a new process
    monkeypatch.setattr(gemm_choice, "_time", lambda *args: pytest.fail("measured although the file has the class"))
    assert torch.equal(gemm_choice.product(a, b), getattr(gemm_choice, other)(a, b, None))
    assert gemm_choice._cache == {key: other}


def test_measured_choice_file_off_malformed_or_unwritable(monkeypatch, tmp_path):
    monkeypatch.setenv(gemm_choice.ENV_VAR, "measure")
    a, b = torch.randn(5, 8), torch.randn(3, 8)
    monkeypatch.setenv(gemm_choice.CACHE_ENV_VAR, "off")
    monkeypatch.setattr(gemm_choice, "_cache", {})
    assert gemm_choice.cache_file() is None
    gemm_choice.product(a, b)
    assert list(tmp_path.iterdir()) == []
    bad = tmp_path / "choices.json"                                   # not JSON: measured again, then rewritten
    bad.write_text("{not json")
    monkeypatch.setenv(gemm_choice.CACHE_ENV_VAR, str(bad))
    monkeypatch.setattr(gemm_choice, "_cache", {})
    gemm_choice.product(a, b)
    (key, name), = gemm_choice._cache.items()
    assert json.loads(bad.read_text()) == {gemm_choice._file_key(key): name}
    blocker = tmp_path / "a_file"                                     # its "directory" is a file: cannot write
    blocker.write_text("")
    monkeypatch.setenv(gemm_choice.CACHE_ENV_VAR, str(blocker / "choices.json"))
    monkeypatch.setattr(gemm_choice, "_cache", {})
    with pytest.warns(UserWarning, match=gemm_choice.CACHE_ENV_VAR):
        got = gemm_choice.product(a, b)
    (key, name), = gemm_choice._cache.items()
    assert torch.equal(got, getattr(gemm_choice, name)(a, b, None))
    monkeypatch.delenv(gemm_choice.CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gemm_choice.cache_file() == str(tmp_path / "xdg" / "internlm_kernels" / "cpu_gemm_choice.json")


def test_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(gemm_choice.ENV_VAR, "mkl")
    with pytest.raises(ValueError, match=gemm_choice.ENV_VAR):
        gemm_choice.product(torch.randn(2, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="mode"):
        gemm_choice.pin("fastest")


@pytest.mark.parametrize("mode", ["onednn", "aten", "measure"])
def test_cpu_linear_matches_reference_under_each_choice(mode):
    gemm_choice.pin(mode)
    x = torch.randn(3, 29, 65, requires_grad=True)
    w = torch.randn(23, 65, requires_grad=True)
    b = torch.randn(23, requires_grad=True)
    with ik.use_backend(linear="cpu"):
        y = ik.linear(x, w, b)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    leaves = [oracle_leaf(t, torch.float32) for t in (x, w, b)]
    expect = reference.linear(*leaves)
    assert_close(y, expect)
    for g, e in zip(grads, torch.autograd.grad(expect, leaves, dy.double())):
        assert_close(g, e)
