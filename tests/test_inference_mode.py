"""Issue 9 item 1: every public op, the transformers integration and the model under torch.inference_mode() and
torch.no_grad(), with the same results as with grad enabled, on the reference and the Triton (interpreted) backends.
Inference tensors have no version counter: the per-tensor caches (attention schedule, cu_seqlens checks, rotary
position checks, the integration's unpadding) must neither fail nor reuse a result for a modified tensor."""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import internlm_kernels as ik
from models import InternLM2Config, InternLM2ForCausalLM, InternLM2ForScore

MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
BACKENDS = ("reference", "triton")


def _cu(lengths):
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


def _op_calls():
    """(name, fn) pairs; fn builds its inputs itself (so that under inference_mode they are inference tensors)."""
    def varlen():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(14, h, 16, generator=g) for h in (4, 2, 2))
        cu = _cu([5, 9])
        return ik.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, causal=True)

    def dense():
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(2, 7, 2, 16, generator=g) for _ in range(3))
        return ik.flash_attn_func(q, k, v, causal=True)

    def rms():
        g = torch.Generator().manual_seed(2)
        return ik.rms_norm(torch.randn(5, 24, generator=g), torch.randn(24, generator=g), 1e-6)

    def swiglu():
        g = torch.Generator().manual_seed(3)
        return ik.swiglu(torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g))

    def swiglu_packed():
        g = torch.Generator().manual_seed(4)
        return ik.swiglu_packed(torch.randn(5, 24, generator=g))

    def rotary():
        g = torch.Generator().manual_seed(5)
        cos, sin = ik.rotary_cos_sin(32, 16)
        return ik.apply_rotary_emb(torch.randn(9, 2, 16, generator=g), cos, sin, cu_seqlens=_cu([4, 5]))

    def qkv_rotary():
        g = torch.Generator().manual_seed(6)
        cos, sin = ik.rotary_cos_sin(32, 16)
        return torch.cat(ik.qkv_rotary(torch.randn(9, 2 * 4 * 16, generator=g), cos, sin, 2, 16,
                                       cu_seqlens=_cu([4, 5])), dim=1)

    def cross_entropy():
        g = torch.Generator().manual_seed(7)
        return ik.fused_linear_cross_entropy(torch.randn(6, 8, generator=g), torch.randn(19, 8, generator=g),
                                             torch.tensor([1, 4, -100, 18, 0, 3]))

    return dict(varlen=varlen, dense=dense, rms_norm=rms, swiglu=swiglu, swiglu_packed=swiglu_packed,
                rotary=rotary, qkv_rotary=qkv_rotary, cross_entropy=cross_entropy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", list(_op_calls()))
def test_public_ops_under_inference_and_no_grad(op, mode, backend):
    fn = _op_calls()[op]
    with ik.use_backend(backend):
        expected = fn()
        with MODES[mode]():
            first, second = fn(), fn()      # twice: the second call meets the caches' entries
    assert_close(first, expected, 0.0)
    assert_close(second, expected, 0.0)


def test_optimizer_and_clip_under_inference_mode():
    params = [torch.nn.Parameter(torch.randn(7, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    expected = [p.detach().clone() for p in params]
    reference = torch.optim.AdamW([torch.nn.Parameter(e) for e in expected], lr=0.1)
    for e, p in zip(reference.param_groups[0]["params"], params):
        e.grad = p.grad.clone()
    torch.nn.utils.clip_grad_norm_(reference.param_groups[0]["params"], 0.5)
    reference.step()
    opt = ik.FusedAdamW(params, lr=0.1)
    with torch.inference_mode():
        ik.clip_grad_norm_(params, 0.5)
        opt.step()
    for p, e in zip(params, reference.param_groups[0]["params"]):
        assert_close(p.detach(), e.detach(), 1e-6)


def test_modified_inference_cu_seqlens_is_not_reused():
    """The same inference tensor, modified in place between two calls, gets a fresh schedule (no version counter
    to tell, so inference tensors are never served from the cache)."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(12, 2, 16, generator=g) for _ in range(3))
    with ik.use_backend("triton"), torch.inference_mode():
        cu = _cu([3, 9])
        ik.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, causal=True)
        cu.copy_(_cu([10, 2]))
        out = ik.flash_attn_varlen_func(q, k, v, cu, cu, 10, 10, causal=True)
    with ik.use_backend("reference"):
        expected = ik.flash_attn_varlen_func(q, k, v, _cu([10, 2]), _cu([10, 2]), 10, 10, causal=True)
    assert_close(out, expected, 1e-5)


def _micro():
    return InternLM2Config.preset("micro")


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_forward_generate_score_under_inference_mode(backend):
    torch.manual_seed(0)
    lm, scorer = InternLM2ForCausalLM(_micro()), InternLM2ForScore(_micro())
    ids, cu = torch.randint(0, 100, (13,)), _cu([6, 7])
    with ik.use_backend(backend):
        expected = (lm(ids, cu_seqlens=cu).logits, lm(ids, cu_seqlens=cu, labels=ids).loss,
                    scorer(ids, cu_seqlens=cu).scores, lm.generate([[1, 5, 9], [3]], max_new_tokens=3))
        for mode in MODES.values():
            with mode():
                got = (lm(ids, cu_seqlens=cu).logits, lm(ids, cu_seqlens=cu, labels=ids).loss,
                       scorer(ids, cu_seqlens=cu).scores, lm.generate([[1, 5, 9], [3]], max_new_tokens=3))
            for a, b in zip(got[:3], expected[:3]):
                assert_close(a, b, 1e-5)
            assert got[3] == expected[3]


@pytest.mark.parametrize("mode", MODES)
def test_transformers_integration_under_inference_mode(mode):
    transformers = pytest.importorskip("transformers")
    from internlm_kernels.integrations import transformers as ik_hf

    ik_hf.register()
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.config._attn_implementation = ik_hf.NAME
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                                  # left padding: the unpadding path
    with ik.use_backend("triton"):
        expected = model(ids, attention_mask=mask).logits
        with MODES[mode]():
            got = model(ids, attention_mask=mask).logits
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    valid = mask.bool()
    assert_close(got[valid], expected[valid], 1e-5)
    assert generated.shape == (2, 11)
