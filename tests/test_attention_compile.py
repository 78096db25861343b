"""flash_attn_varlen_func runs inside one torch.compile(fullgraph=True) graph, forward and backward, as our custom
op (not traced through), and matches the reference."""
import torch
from conftest import assert_close
from torch._inductor.compile_fx import compile_fx

import internlm_kernels as ik

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _attention_layer(x, wq, wkv, wo, cu_seqlens):
    """Packed tokens -> GQA attention (4 query heads over 2 K/V heads of 16) -> output projection -> a scalar."""
    T = x.shape[0]
    q = (x @ wq).view(T, 4, 16)
    k, v = (x @ wkv).view(T, 2, 2, 16).unbind(1)
    out, lse, _ = ik.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 17, 17, causal=True,
                                            window_size=(9, -1), return_attn_probs=True)
    return ((out.reshape(T, 64) @ wo).square().mean() + lse.mean()) * 1.0


def test_attention_compiles_fullgraph_and_matches_reference():
    torch.manual_seed(0)
    T, H = 40, 32
    cu = torch.tensor([0, 7, 8, 25, 40], dtype=torch.int32, device=DEVICE)
    x = torch.randn(T, H, device=DEVICE, requires_grad=True)
    params = [(torch.randn(*s, device=DEVICE) * H ** -0.5).requires_grad_() for s in ((H, 64), (H, 64), (64, H))]
    leaves = [x, *params]

    seen_ops = set()

    def recording_inductor(gm, example_inputs):
        seen_ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    with ik.use_backend("triton"):
        compiled = torch.compile(_attention_layer, fullgraph=True, backend=recording_inductor)
        loss = compiled(x, *params, cu)
        grads = torch.autograd.grad(loss, leaves)
    assert "internlm_kernels.flash_attn_varlen_fwd" in seen_ops, sorted(seen_ops)

    with ik.use_backend("reference"):
        expect = _attention_layer(x, *params, cu)
        expect_grads = torch.autograd.grad(expect, leaves)
    assert_close(loss, expect)
    for g, e in zip(grads, expect_grads):
        assert_close(g, e)
