"""The fused ops run inside one torch.compile(fullgraph=True) graph, forward and backward, and match eager."""
import torch
from conftest import assert_close
from torch._inductor.compile_fx import compile_fx

import internlm_kernels as ik

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _block(x, residual, norm_w, wqkv, w13, w2, final_w, head, target, cos, sin, cu_seqlens):
    """A packed-token pre-norm transformer block shaped like InternLM2's, minus attention, then the loss."""
    h, residual = ik.rms_norm(x, norm_w, 1e-5, residual, prenorm=True, residual_in_fp32=True)
    q, k, v = ik.qkv_rotary(h @ wqkv, cos, sin, 2, 16, cu_seqlens=cu_seqlens, max_seqlen=17)
    k = ik.apply_rotary_emb(k * 1.0, cos, sin, cu_seqlens=cu_seqlens, max_seqlen=17, inplace=True)
    q = ik.apply_rotary_emb(q, cos, sin, interleaved=True, cu_seqlens=cu_seqlens, max_seqlen=17)
    mixed = (q.sum(1) + k.sum(1) + v.sum(1)).repeat(1, 4)            # stands in for attention: (T, 64)
    h, residual = ik.rms_norm(mixed.to(x.dtype), norm_w, 1e-5, residual, prenorm=True)
    gated = ik.swiglu_packed(h @ w13)                                 # (T, 48)
    y = ik.swiglu(gated, gated.flip(-1)) @ w2                         # (T, 64)
    h = ik.rms_norm(y + residual, final_w, 1e-5)
    return ik.fused_linear_cross_entropy(h, head, target)


def test_fused_ops_compile_fullgraph_and_match_eager():
    torch.manual_seed(0)
    T, H, V = 40, 64, 96
    cu = torch.tensor([0, 7, 8, 25, 40], dtype=torch.int32, device=DEVICE)
    # norm_w, wqkv (2 KV groups of 3 heads of 16), w13 ([w1 | w3] of 48), w2, final_w, head; matrices scaled 1/sqrt(H)
    shapes = [(H,), (H, 2 * 5 * 16), (H, 2 * 48), (48, H), (H,), (V, H)]
    params = [(torch.randn(*shape, device=DEVICE) * (H ** -0.5 if len(shape) == 2 else 1.0)).requires_grad_(True)
              for shape in shapes]
    x = torch.randn(T, H, device=DEVICE, requires_grad=True)
    residual = torch.randn(T, H, device=DEVICE)
    target = torch.randint(0, V, (T,), device=DEVICE)
    cos, sin = ik.rotary_cos_sin(32, 16, theta=1e6, device=DEVICE)
    args = (x, residual, *params, target, cos, sin, cu)
    leaves = [x, *params]

    seen_ops = set()

    def recording_inductor(gm, example_inputs):
        for module in gm.modules():  # autograd.Function bodies (the in-place rotary) are nested graph modules
            if isinstance(module, torch.fx.GraphModule):
                seen_ops.update(str(n.target).removesuffix(".default") for n in module.graph.nodes
                                if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    with ik.use_backend("triton"):
        compiled = torch.compile(_block, fullgraph=True, backend=recording_inductor)
        loss = compiled(*args)
        grads = torch.autograd.grad(loss, leaves)
    for op in ("rms_norm_fwd", "add_rms_norm_fwd", "qkv_rotary", "apply_rotary", "apply_rotary_",
               "swiglu_packed_fwd", "swiglu_fwd", "linear_cross_entropy_fwd"):
        assert f"internlm_kernels.{op}" in seen_ops, (op, sorted(seen_ops))

    with ik.use_backend("reference"):
        expect = _block(*args)
        expect_grads = torch.autograd.grad(expect, leaves)
    assert_close(loss, expect)
    for g, e in zip(grads, expect_grads):
        assert_close(g, e)
