"""The run-time choice of the cpu attention backend (internlm_kernels/cpu/attention_choice.py) between the
extension's kernels and ATen's flash kernel (SDPA per document): pinned, every call runs the pinned one (its autograd
node says which); measured, the choice is made once per shape class (forward+backward when gradients are recorded,
the forward otherwise) and then fixed for the process; either way the values equal the reference."""
import json

import pytest
import torch
from conftest import assert_close

import internlm_kernels as ik
from internlm_kernels import _ext, reference
from internlm_kernels.cpu import attention_choice

pytestmark = pytest.mark.skipif(_ext.why_unavailable("cpu") is not None, reason="the extension is not built")


@pytest.fixture(autouse=True)
def unpinned():
    yield
    attention_choice.pin(None)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _call(lens, hq=4, hkv=2, d=32, grad=True):
    cu = _cu(lens)
    q = torch.randn(sum(lens), hq, d, requires_grad=grad)
    k = torch.randn(sum(lens), hkv, d, requires_grad=grad)
    v = torch.randn(sum(lens), hkv, d, requires_grad=grad)
    with ik.use_backend(attention="cpu"):
        out = ik.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    expect, _ = reference.flash_attn_varlen(q.detach().double(), k.detach().double(), v.detach().double(), cu, cu,
                                            causal=True)
    assert_close(out, expect)
    return out


@pytest.mark.parametrize("mode,node", [("kernels", "AttentionFunctionBackward"), ("sdpa", None)])
def test_pinned_choice_runs_that_implementation(mode, node, monkeypatch):
    monkeypatch.setenv(attention_choice.ENV_VAR, mode)
    out = _call([30, 7, 64])
    assert (type(out.grad_fn).__name__ == "AttentionFunctionBackward") == (node is not None)
    attention_choice.pin(mode)    # the same in code, over whatever the environment says
    monkeypatch.setenv(attention_choice.ENV_VAR, "measure")
    out = _call([30, 7, 64])
    assert (type(out.grad_fn).__name__ == "AttentionFunctionBackward") == (node is not None)


def test_measured_choice_is_cached_per_shape_class(monkeypatch):
    monkeypatch.setenv(attention_choice.ENV_VAR, "measure")
    monkeypatch.setattr(attention_choice, "_cache", {})
    out = _call([40, 9, 64])
    (key, name), = attention_choice._cache.items()
    assert key == (*attention_choice.cpu_id(), torch.get_num_threads(), 32, 4, 2, True, True, 128, 4)
    assert (type(out.grad_fn).__name__ == "AttentionFunctionBackward") == (name == "kernels")
    _call([50, 3, 60])                                    # 113 tokens in 3 documents: the same class
    assert len(attention_choice._cache) == 1
    _call([50, 3, 60], grad=False)                        # no gradients recorded: the forward is timed, its own class
    assert len(attention_choice._cache) == 2
    with torch.inference_mode():
        _call([50, 3, 60], grad=False)
    assert len(attention_choice._cache) == 2
    assert set(attention_choice.choices().values()) <= {"kernels", "sdpa"}


def test_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(attention_choice.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=attention_choice.ENV_VAR):
        _call([5, 6])
    with pytest.raises(ValueError, match="mode"):
        attention_choice.pin("aten")


def test_measured_choice_is_kept_in_the_gemm_choices_file(monkeypatch, tmp_path):
    """The first process writes the choice; a later one (an empty in-process cache) takes the file's, untimed."""
    from internlm_kernels.cpu import gemm_choice
    path = tmp_path / "choices.json"
    monkeypatch.setenv(attention_choice.ENV_VAR, "measure")
    monkeypatch.setenv(gemm_choice.CACHE_ENV_VAR, str(path))
    monkeypatch.setattr(attention_choice, "_cache", {})
    _call([40, 9, 64])
    (key, name), = attention_choice._cache.items()
    saved = json.loads(path.read_text())
    assert saved == {gemm_choice._file_key(("attention", *key)): name}
    other = "sdpa" if name == "kernels" else "kernels"
    path.write_text(json.dumps({gemm_choice._file_key(("attention", *key)): other}))
    monkeypatch.setattr(attention_choice, "_cache", {})                # a new process
    monkeypatch.setattr(attention_choice, "_time", lambda fn: pytest.fail("measured although the file has the class"))
    out = _call([40, 9, 64])
    assert (type(out.grad_fn).__name__ == "AttentionFunctionBackward") == (other == "kernels")


def test_the_traced_op_measures_as_eager_does(monkeypatch):
    """The custom op a compiled graph calls (ops/attention_cpu.py) runs below autograd, where a compiled graph also
    turns grad mode off: unpinned, it still times forward+backward for a call that records gradients (autograd back
    on inside it), under the key eager uses, and the implementation it runs is the one it chose."""
    from internlm_kernels.ops import attention_cpu

    monkeypatch.setenv(attention_choice.ENV_VAR, "measure")
    monkeypatch.setattr(attention_choice, "_cache", {})
    lens = [40, 9, 64]
    cu = _cu(lens)
    q, k, v = (torch.randn(sum(lens), h, 32, requires_grad=True) for h in (4, 2, 2))
    with torch.no_grad():
        out, _, ran = torch.ops.internlm_kernels.cpu_attention_fwd(q, k, v, cu, cu, 0.2, True, True, False)
    (key, name), = attention_choice._cache.items()
    assert key == (*attention_choice.cpu_id(), torch.get_num_threads(), 32, 4, 2, True, True, 128, 4)
    assert int(ran) == (attention_cpu.KERNELS if name == "kernels" else attention_cpu.SDPA)
    expect, _ = reference.flash_attn_varlen(q.detach().double(), k.detach().double(), v.detach().double(), cu, cu,
                                            0.2, True)
    assert_close(out, expect)
