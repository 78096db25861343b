"""ik.integrations.transformers.patch on tiny random transformers models: a patched model's loss and parameter
gradients equal the unpatched model's (fp32), per architecture, with our Triton kernels running (the interpreter
on CPU); padding, padding-free packing (restarting position_ids), class patching before construction, unsupported
architectures.

The unpatched side always runs first: the rotary patch replaces a module-level function, and ``unpatch()`` (run
after every test) restores it and every class-level change.
"""
import copy

import pytest
import torch
from conftest import assert_close
from remote_internlm2 import InternLM2Config, InternLM2ForCausalLM

import internlm_kernels as ik

transformers = pytest.importorskip("transformers")
from internlm_kernels.integrations import transformers as ik_hf  # noqa: E402

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _configs():
    return {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL)),
        "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(**SMALL, sliding_window=6)),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**SMALL)),
        "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**SMALL, head_dim=8)),
        # softcaps on the attention scores and the final logits, sliding-window layers, (1 + w) norms, GeLU MLP
        "gemma2": (transformers.Gemma2ForCausalLM,
                   transformers.Gemma2Config(**SMALL, head_dim=8, sliding_window=6, attn_logit_softcapping=5.0,
                                             final_logit_softcapping=3.0)),
        "internlm2": (InternLM2ForCausalLM, InternLM2Config(**SMALL, bias=False)),
    }


@pytest.fixture(autouse=True)
def _restore():
    yield
    ik_hf.unpatch()


def make(arch: str, seed: int = 0):
    cls, config = _configs()[arch]
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="eager") if arch != "internlm2" else cls(config)
    with torch.no_grad():  # weights large enough that every part (norm weights too) matters to the loss
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def loss_and_grads(model, **inputs):
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(got, want):
    assert_close(got[0], want[0], msg="loss")
    for name, g in want[1].items():
        assert_close(got[1][name], g, msg=name)


# The Triton kernels (interpreted on CPU: ~10 s a model) run for InternLM2, whose patch uses the most of them (fused
# qkv rotary, varlen attention, fused residual norm, SwiGLU, fused CE); the others run the patch over the reference
# ops (each kernel's equality with its reference, offsets and softcaps included, is tested op by op).
@pytest.mark.parametrize("arch,backend", [("llama", "auto"), ("mistral", "auto"), ("qwen2", "auto"),
                                          ("qwen3", "auto"), ("gemma2", "auto"), ("internlm2", "triton")])
def test_patched_model_loss_and_grads_equal_unpatched(arch, backend):
    ref = make(arch)
    ours = copy.deepcopy(ref)
    ids = torch.randint(0, VOCAB, (2, 13))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    want = loss_and_grads(ref, input_ids=ids, labels=labels)

    assert ik_hf.patch(ours) is ours
    layer = ours.model.layers[0]
    assert "forward" in vars(layer) and "forward" in vars(ours)  # the fused-residual layer and the fused loss
    with ik.use_backend(backend):
        got = loss_and_grads(ours, input_ids=ids, labels=labels)
    assert_same(got, want)
    with torch.no_grad():  # inference_mode: test_inference_mode below
        assert ours(input_ids=ids, labels=labels).logits is None  # the logits were never formed
        # without labels: the logits, as the unpatched model gives them
        assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.parametrize("arch", ["llama", "internlm2"])
def test_padded_batch(arch):
    """Left and right padding: the patched model gathers the valid tokens (varlen) and matches the masked eager
    attention of the unpatched model on every non-padded token."""
    ref = make(arch, seed=1)
    ours = copy.deepcopy(ref)
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100  # else a padded position (whose output the two models define differently) predicts it
    want = loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    ik_hf.patch(ours)
    got = loss_and_grads(ours, input_ids=ids, attention_mask=mask, labels=labels)
    assert_same(got, want)


@pytest.mark.parametrize("arch", ["qwen2", "internlm2"])
def test_padding_free_packing_equals_separate_documents(arch):
    """DataCollatorWithFlattening's batch (one row, position_ids restarting per document, the first label of each
    document ignored): the patched model's loss and grads equal the unpatched model run on each document alone."""
    ref = make(arch, seed=2)
    ours = copy.deepcopy(ref)
    docs = [torch.randint(0, VOCAB, (n,)).tolist() for n in (7, 12, 5)]
    batch = transformers.DataCollatorWithFlattening()([{"input_ids": d, "labels": d} for d in docs])
    assert batch["position_ids"][0, 7].item() == 0  # the collator restarts positions per document

    ref.zero_grad()
    total = sum(len(d) - 1 for d in docs)
    want_loss = 0.0
    for d in docs:  # mean over every counted token of the packed row = Σ_docs n_i · mean_i / Σ n_i
        ids = torch.tensor([d])
        loss = ref(input_ids=ids, labels=ids).loss * (len(d) - 1) / total
        loss.backward()
        want_loss += loss.detach()
    want = (want_loss, {n: p.grad.clone() for n, p in ref.named_parameters()})

    ik_hf.patch(ours)
    got = loss_and_grads(ours, **batch)
    assert_same(got, want)


def test_class_patch_before_construction_and_unpatch():
    ref = make("llama", seed=3)
    ids = torch.randint(0, VOCAB, (1, 9))
    want = loss_and_grads(ref, input_ids=ids, labels=ids)
    original_forward = transformers.LlamaForCausalLM.forward

    assert ik_hf.patch(transformers.LlamaForCausalLM) is transformers.LlamaForCausalLM
    ik_hf.patch(transformers.LlamaForCausalLM)  # twice: no forward wraps our own
    ours = transformers.LlamaForCausalLM(ref.config)
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == ik_hf.NAME
    assert ours(input_ids=ids, labels=ids).logits is None
    assert_same(loss_and_grads(ours, input_ids=ids, labels=ids), want)

    ik_hf.unpatch()
    assert transformers.LlamaForCausalLM.forward is original_forward
    assert "__init__" not in vars(transformers.LlamaPreTrainedModel)
    fresh = transformers.LlamaForCausalLM._from_config(ref.config, attn_implementation="eager")
    assert fresh(input_ids=ids, labels=ids).logits is not None


def test_class_patch_reaches_internlm2_attention_variants():
    """The remote file picks its attention class (eager, sdpa, flash_attention_2) from the config; a class patch
    replaces the forward of each variant that defines its own."""
    ref = make("internlm2", seed=5)
    ids = torch.randint(0, VOCAB, (2, 9))
    want = loss_and_grads(ref, input_ids=ids, labels=ids)
    ik_hf.patch(InternLM2ForCausalLM)
    config = copy.deepcopy(ref.config)
    config.attn_implementation = "sdpa"
    ours = InternLM2ForCausalLM(config)
    ours.load_state_dict(ref.state_dict())
    attention_class = type(ours.model.layers[0].attention)
    assert attention_class.__name__ == "InternLM2SdpaAttention"
    assert attention_class.forward._ik_original is not None  # our forward, wrapping the variant's own
    assert_same(loss_and_grads(ours, input_ids=ids, labels=ids), want)


def test_inference_mode():
    ours = make("llama", seed=6)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    ik_hf.patch(ours)
    with torch.inference_mode():
        assert_close(ours(input_ids=ids).logits, want)


def test_switches_and_outputs():
    """Each switch off leaves its part alone; skip_logits=False returns the loss and the logits; return_dict=False
    a tuple; the Trainer's num_items_in_batch turns the mean into a sum over that count."""
    ref = make("llama", seed=4)
    ours = copy.deepcopy(ref)
    ik_hf.patch(ours, rms_norm=False, rope=False, swiglu=False, attention=False)
    assert "forward" not in vars(ours.model.norm) and "forward" not in vars(ours.model.layers[0].mlp)
    assert ours.config._attn_implementation == "eager"
    ids = torch.randint(0, VOCAB, (2, 8))
    out = ours(input_ids=ids, labels=ids, skip_logits=False)
    want = ref(input_ids=ids, labels=ids)
    assert_close(out.logits, want.logits)
    assert_close(out.loss, want.loss)
    loss, logits = ours(input_ids=ids, labels=ids, skip_logits=False, return_dict=False)[:2]
    assert_close(loss, want.loss)
    n = torch.tensor(5)
    assert_close(ours(input_ids=ids, labels=ids, num_items_in_batch=n).loss, want.loss * 14 / 5)
    with pytest.raises(ValueError, match="skip_logits"):
        ours(input_ids=ids, skip_logits=True)


def test_unsupported_architecture_names_it_and_the_supported_list():
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*llama, mistral, qwen2, qwen3, gemma2, internlm2"):
        ik_hf.patch(transformers.GPT2LMHeadModel)
    with pytest.raises(ValueError, match="Linear"):
        ik_hf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="rope"):
        ik_hf.patch(make("llama"), rope="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gemma2", "internlm2"])
def test_gpu_bf16_patched_model_matches_unpatched(arch):
    ref = make(arch).to("cuda", torch.bfloat16)
    ours = copy.deepcopy(ref)
    ids = torch.randint(0, VOCAB, (2, 64), device="cuda")
    want = ref(input_ids=ids, labels=ids).loss
    ik_hf.patch(ours)
    got = ours(input_ids=ids, labels=ids).loss
    got.backward()
    assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_internlm2_mask_forms():
    """The remote model hands its attention a 2-D padding mask (flash_attention_2), a 4-D additive or boolean
    causal mask (eager, sdpa) or None: each reads as the same key padding, and no padding reads as None."""
    from internlm_kernels.integrations.patch_internlm2 import _padding_mask

    keep = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    visible = torch.ones(5, 5, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~visible, torch.finfo(torch.float32).min)
    for mask in (keep.long(), additive, visible):
        torch.testing.assert_close(_padding_mask(mask, 5), keep)
    assert _padding_mask(None, 5) is None
    assert _padding_mask(torch.ones(2, 5, dtype=torch.long), 5) is None
