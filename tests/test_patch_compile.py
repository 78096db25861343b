"""torch.compile(fullgraph=True) of the surfaces issue 15 added, in one compiled step (each compile costs ~20 s
here): ik.cross_entropy with class weights and token accuracy, rms_norm with offset and Llama casting, the
varlen qkv-packed attention and a window_size given as a tensor pair. Forward and backward equal eager."""
import torch
from conftest import assert_close

import internlm_kernels as ik


def step(x, w_norm, qkv, cu, logits, target, class_weight):
    with ik.use_backend("triton"):
        y = ik.rms_norm(x, w_norm, offset=1.0, casting_mode="llama")
        attn = ik.flash_attn_varlen_qkvpacked_func(qkv, cu, 6, causal=True, window_size=(3, 0))
        loss, accuracy = ik.cross_entropy(logits, target, class_weight, label_smoothing=0.1,
                                          return_token_accuracy=True)
    return y.square().sum() + attn.square().sum() + loss, accuracy


def test_fullgraph_compile_matches_eager():
    torch.manual_seed(0)
    x = torch.randn(5, 24, requires_grad=True)
    w_norm = (torch.randn(24) * 0.1).requires_grad_()
    qkv = torch.randn(10, 3, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    logits = torch.randn(7, 13, requires_grad=True)
    target = torch.randint(0, 13, (7,))
    target[2] = -100
    class_weight = torch.rand(13) + 0.5
    leaves = (x, w_norm, qkv, logits)

    compiled, compiled_acc = torch.compile(step, fullgraph=True)(x, w_norm, qkv, cu, logits, target, class_weight)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    eager, eager_acc = step(x, w_norm, qkv, cu, logits, target, class_weight)
    eager_grads = torch.autograd.grad(eager, leaves)
    assert_close(compiled, eager)
    assert_close(compiled_acc, eager_acc)
    for a, b in zip(compiled_grads, eager_grads):
        assert_close(a, b)
