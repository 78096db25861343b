"""The cpu linear backend (oneDNN inner product, forward and hand-written backward) against the reference."""
import pytest
import torch
from conftest import assert_close, oracle_leaf

import internlm_kernels as ik
from internlm_kernels import reference


@pytest.mark.parametrize("lead,k,n,bias", [((37,), 33, 19, True), ((3, 11), 64, 7, False), ((1,), 5, 1, True)])
def test_cpu_linear_matches_reference_fwd_bwd(lead, k, n, bias):
    x = torch.randn(*lead, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    b = torch.randn(n, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    with ik.use_backend(linear="cpu"):
        y = ik.linear(x, w, b)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [oracle_leaf(t, torch.float32) for t in leaves]
    expect = reference.linear(*ref_leaves[:2], ref_leaves[2] if bias else None)
    assert_close(y, expect)
    for g, e in zip(grads, torch.autograd.grad(expect, ref_leaves, dy.double())):
        assert_close(g, e)


def test_cpu_linear_grads_only_where_wanted():
    x, w = torch.randn(9, 6), torch.randn(4, 6, requires_grad=True)
    with ik.use_backend(linear="cpu"):
        (dw,) = torch.autograd.grad(ik.linear(x, w).square().sum(), (w,))
    assert_close(dw, (2 * (x @ w.t())).t() @ x)


def test_auto_picks_cpu_for_float32_and_reference_for_the_rest():
    assert ik.backend.choose("linear", "cpu") == "cpu"
    x, w = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(ik.linear(x, w), x @ w.t())       # float64 runs the reference (torch's matmul) under auto
    with ik.use_backend(linear="cpu"), pytest.raises(NotImplementedError, match="float32"):
        ik.linear(x, w)


def test_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="weight"):
        ik.linear(torch.randn(4, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match="bias"):
        ik.linear(torch.randn(4, 3), torch.randn(2, 3), torch.randn(3))


def test_nn_linear_is_a_drop_in_for_torch_linear():
    torch.manual_seed(0)
    ours = ik.nn.Linear(8, 5)
    theirs = torch.nn.Linear(8, 5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 8)
    assert_close(ours(x), theirs(x))

