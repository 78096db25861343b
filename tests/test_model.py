"""InternLM2ForCausalLM / InternLM2ForScore: packing, padding, loss semantics, RoPE, checkpointing, bad input.

Oracles are independent of the model's own packing code: documents run one at a time, cross-entropy is computed by
torch from materialized logits, the dynamic-NTK base from the formula in internlm2.md.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import internlm_kernels as ik
from internlm_kernels import backend
from models import InternLM2Config, InternLM2ForCausalLM, InternLM2ForScore

LENGTHS = (5, 17, 1, 9)


def micro(**overrides) -> InternLM2Config:
    return dataclasses.replace(InternLM2Config.preset("micro"), **overrides)


def cu_of(lengths) -> torch.Tensor:
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


def docs(lengths, vocab=101):
    return [torch.randint(0, vocab, (n,)) for n in lengths]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return InternLM2ForCausalLM(micro())


def test_packed_equals_separate_documents(model):
    parts = docs(LENGTHS)
    packed = model(torch.cat(parts), cu_seqlens=cu_of(LENGTHS)).logits                    # (T, V)
    separate = torch.cat([model(p).logits for p in parts])
    assert packed.shape == (sum(LENGTHS), 101)
    assert_close(packed, separate)


def test_padded_left_and_right_equal_packed(model):
    parts = docs(LENGTHS)
    packed = model(torch.cat(parts), cu_seqlens=cu_of(LENGTHS)).logits
    S = max(LENGTHS) + 2
    for side in ("right", "left"):
        ids = torch.full((len(parts), S), 7)
        mask = torch.zeros(len(parts), S, dtype=torch.long)
        for b, p in enumerate(parts):
            sl = slice(0, len(p)) if side == "right" else slice(S - len(p), S)
            ids[b, sl], mask[b, sl] = p, 1
        logits = model(ids, attention_mask=mask).logits                                    # (B, S, V)
        assert logits.shape == (len(parts), S, 101)
        assert_close(logits[mask.bool()], packed, msg=side)
        assert (logits[~mask.bool()] == 0).all()


def test_padded_without_mask_equals_rows(model):
    ids = torch.randint(0, 101, (3, 11))
    batched = model(ids).logits
    assert_close(batched, torch.stack([model(row).logits for row in ids]))


def manual_losses(model, parts, labels):
    """Per-target cross-entropy computed document by document from materialized logits."""
    per_doc = []
    for p, lab in zip(parts, labels):
        logits = model(p).logits.float()
        per_doc.append(F.cross_entropy(logits[:-1], lab[1:], ignore_index=-100, reduction="none"))
    return per_doc


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_shifts_inside_each_document(model, reduction):
    parts = docs(LENGTHS)
    labels = [p.clone() for p in parts]
    labels[1][3:6] = -100                                   # ignored targets inside a document
    out = model(torch.cat(parts), cu_seqlens=cu_of(LENGTHS), labels=torch.cat(labels), loss_reduction=reduction)
    assert out.logits is None
    per_doc = manual_losses(model, parts, labels)
    if reduction == "none":
        # Per input token: token i carries the loss of predicting token i + 1; each document's last token, none.
        expected = torch.cat([torch.cat([d, d.new_zeros(1)]) for d in per_doc])
        assert_close(out.loss, expected)
        return
    flat = torch.cat(per_doc)
    n_targets = sum(int((lab[1:] != -100).sum()) for lab in labels)
    expected = flat.sum() / n_targets if reduction == "mean" else flat.sum()
    assert_close(out.loss, expected)


def test_loss_on_padded_batch_and_return_logits(model):
    parts = docs((6, 3))
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for b, p in enumerate(parts):
        ids[b, : len(p)], mask[b, : len(p)] = p, 1
    labels = ids.masked_fill(mask == 0, 5)                  # labels at padding must not count either way
    out = model(ids, attention_mask=mask, labels=labels, loss_reduction="sum", return_logits=True)
    expected = sum(d.sum() for d in manual_losses(model, parts, parts))
    assert_close(out.loss, expected)
    assert out.logits.shape == (2, 6, 101)


def test_all_targets_ignored_gives_zero_mean_loss(model):
    ids = torch.randint(0, 101, (8,))
    out = model(ids, labels=torch.full((8,), -100))
    assert out.loss.item() == 0.0


def test_explicit_position_ids(model):
    ids = torch.randint(0, 101, (12,))
    default = model(ids).logits
    assert_close(model(ids, position_ids=torch.arange(12)).logits, default)
    # RoPE is relative: shifting every position by a constant leaves the logits unchanged (up to rounding) ...
    assert_close(model(ids, position_ids=torch.arange(12) + 9).logits, default, rtol=1e-4, atol=1e-4)
    # ... while other positions change them, so the argument is really used.
    assert not torch.allclose(model(ids, position_ids=torch.arange(12) * 2).logits, default, atol=1e-3)


def saved_bytes(fn) -> int:
    """Bytes of distinct tensors autograd keeps for backward outside recomputed regions while running fn."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_gradient_checkpointing_modes_give_same_gradients_with_less_memory():
    torch.manual_seed(2)
    model = InternLM2ForCausalLM(micro())
    ids = torch.randint(0, 101, (20,))
    cu = cu_of((8, 12))
    grads, kept = {}, {}
    for mode in (False, "mlp", True):
        model.zero_grad()
        model.gradient_checkpointing = mode
        assert model.model.gradient_checkpointing is mode
        loss = []
        kept[mode] = saved_bytes(lambda out=loss: out.append(model(ids, cu_seqlens=cu, labels=ids).loss))
        loss[0].backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for mode in ("mlp", True):
        for n in grads[False]:
            assert_close(grads[mode][n], grads[False][n], msg=f"{mode} {n}")
    # "mlp" no longer keeps the SwiGLU output (20 tokens x 200 features, fp32) of either layer.
    assert kept[False] - kept["mlp"] >= 2 * 20 * 200 * 4
    assert kept[True] < kept["mlp"]
    model.gradient_checkpointing = "".join(["m", "lp"])          # a string built at run time (from a config)
    assert model.gradient_checkpointing == "mlp" and model.model.layers[0].feed_forward.recompute_activation
    for bad in ("attention", 1, None):
        with pytest.raises(ValueError, match="gradient_checkpointing"):
            model.gradient_checkpointing = bad


def test_bf16_weights_train_with_fp32_master_weights():
    torch.manual_seed(6)
    model = InternLM2ForCausalLM(micro()).to(torch.bfloat16)
    opt = ik.FusedAdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, master_weights=True)
    ids = torch.randint(0, 101, (32,))
    cu = cu_of((12, 20))
    losses = []
    for _ in range(4):
        loss = model(ids, cu_seqlens=cu, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < losses[0] - 0.5, losses


def expected_cos_sin(seq_len, dim, theta, scaling, max_pos):
    """internlm2.md: inv_freq = base^(-2i/d); dynamic NTK beyond max_pos:
    base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (d / (d - 2)); linear divides positions."""
    base, t = theta, torch.arange(seq_len, dtype=torch.float64)
    if scaling and scaling["type"] == "dynamic" and seq_len > max_pos:
        f = scaling["factor"]
        base = theta * ((f * seq_len / max_pos) - (f - 1)) ** (dim / (dim - 2))
    if scaling and scaling["type"] == "linear":
        t = t / scaling["factor"]
    inv = base ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = t[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 4.0}, {"type": "dynamic", "factor": 2.0},
                                     {"type": "dynamic", "factor": 3.0}])
@pytest.mark.parametrize("seq_len", [10, 64, 65, 200])
def test_rotary_tables_match_the_formula(scaling, seq_len):
    cfg = micro(rope_scaling=scaling)
    rotary = InternLM2ForCausalLM(cfg).model.rotary          # the tables the model rotates with
    for _ in range(2):                                       # fresh, then from the cache
        cos, sin = rotary(seq_len, torch.device("cpu"))
        want_cos, want_sin = expected_cos_sin(seq_len, cfg.head_dim, cfg.rope_theta, scaling, 64)
        assert cos.shape[0] >= seq_len and cos.dtype == torch.float32
        assert_close(cos[:seq_len].double(), want_cos, rtol=1e-6, atol=1e-6)
        assert_close(sin[:seq_len].double(), want_sin, rtol=1e-6, atol=1e-6)


def test_dynamic_ntk_base_follows_longest_sequence_of_batch():
    torch.manual_seed(3)
    model = InternLM2ForCausalLM(micro(rope_scaling={"type": "dynamic", "factor": 2.0}))
    short, long_ = torch.randint(0, 101, (10,)), torch.randint(0, 101, (80,))
    alone = model(short).logits
    # Packed with a document longer than max_position_embeddings (64), the short one uses the raised base.
    with_long = model(torch.cat([short, long_]), cu_seqlens=cu_of((10, 80))).logits[:10]
    assert not torch.allclose(with_long, alone, atol=1e-4)
    # Within max_position_embeddings the base stays theta whatever the mix.
    with_mid = model(torch.cat([short, long_[:60]]), cu_seqlens=cu_of((10, 60))).logits[:10]
    assert_close(with_mid, alone)


def test_score_model_reads_the_last_token():
    torch.manual_seed(4)
    model = InternLM2ForScore(micro())
    parts = docs((4, 9, 6))
    out = model(torch.cat(parts), cu_seqlens=cu_of((4, 9, 6)))
    assert out.values.shape == (19,) and out.scores.shape == (3,) and out.values.dtype == torch.float32
    assert_close(out.scores, out.values[torch.tensor([3, 12, 18])])
    for p, s in zip(parts, out.scores):
        assert_close(model(p).scores[0], s)
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for b, p in enumerate(parts):
        ids[b, 9 - len(p):], mask[b, 9 - len(p):] = p, 1     # left padding: the last token is the last column
    padded = model(ids, attention_mask=mask)
    assert padded.values.shape == (3, 9)
    assert_close(padded.scores, out.scores)
    out.scores.sum().backward()
    assert model.score_head.weight.grad is not None and model.model.layers[0].attention.wqkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="empty"):
        model(torch.cat(parts), cu_seqlens=cu_of((4, 0, 15)))


def test_bad_inputs_raise_value_error(model):
    ids = torch.randint(0, 101, (10,))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.full((4,), 101))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, cu_seqlens=torch.tensor([0, 4, 10]))                      # int64
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, cu_seqlens=cu_of((4, 5)))                                  # ends at 9, not 10
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(10))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids.view(2, 5), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids.view(2, 5), attention_mask=torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids.view(2, 5), cu_seqlens=cu_of((5, 5)))
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:9])
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(9))
    with pytest.raises(ValueError, match="loss_reduction"):
        model(ids, labels=ids, loss_reduction="avg")


def test_config_round_trip_presets_and_counts():
    for name in ("tiny", "micro", "1_8b", "7b", "20b"):
        cfg = InternLM2Config.preset(name)
        assert InternLM2Config.from_hf_dict(cfg.to_hf_dict("bfloat16")) == cfg
    cfg7 = InternLM2Config.preset("7b")
    assert (cfg7.qkv_size, cfg7.head_dim, cfg7.rope_scaling) == (6144, 128, {"type": "dynamic", "factor": 2.0})
    cfg = micro()
    assert cfg.num_parameters() == sum(p.numel() for p in InternLM2ForCausalLM(cfg).parameters())
    L, H, D, N = 2, 4, 32, cfg.num_parameters()
    assert cfg.flops_per_token(100) == 6 * N + 6 * L * H * D * 100
    # transformers-5 spelling of rope scaling is read too
    d = cfg.to_hf_dict()
    d.pop("rope_theta"), d.pop("rope_scaling")
    d["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4}
    assert InternLM2Config.from_hf_dict(d) == micro(rope_theta=5e4, rope_scaling={"type": "linear", "factor": 2.0})


def test_config_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        micro(num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_attention_heads"):
        micro(num_attention_heads=5)
    with pytest.raises(NotImplementedError, match="yarn"):
        micro(rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="factor"):
        micro(rope_scaling={"type": "dynamic", "factor": 0.5})
    with pytest.raises(ValueError, match="preset"):
        InternLM2Config.preset("3b")
    for key, value in (("bias", True), ("tie_word_embeddings", True), ("hidden_act", "gelu"), ("head_dim", 64),
                       ("sliding_window", 128)):
        d = micro().to_hf_dict() | {key: value}
        with pytest.raises(NotImplementedError, match=key):
            InternLM2Config.from_hf_dict(d)


MODEL_OPS = ("attention", "rms_norm", "swiglu", "rotary", "linear_cross_entropy")


def kernel_backends():
    """(op, backend) for every non-reference implementation of the model's ops that can run here, and 'all'."""
    cases = [(op, name) for op in MODEL_OPS for name in backend.available(op, "cpu") if name != "reference"]
    # 'all': a backend forced for every op, where every op of the model has it.
    names = sorted({name for _, name in cases if all((op, name) in cases for op in MODEL_OPS)})
    return cases + [("*", name) for name in names]


@pytest.mark.parametrize("op,name", kernel_backends())
def test_gradients_through_every_kernel_backend_match_reference(op, name):
    torch.manual_seed(5)
    model = InternLM2ForCausalLM(micro())
    ids = torch.randint(0, 101, (21,))
    cu = cu_of((7, 13, 1))

    def run():
        model.zero_grad()
        loss = model(ids, cu_seqlens=cu, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    with ik.use_backend("reference"):
        ref_loss, ref_grads = run()
    with ik.use_backend(**{op: name}) if op != "*" else ik.use_backend(name):
        loss, grads = run()
    assert_close(loss, ref_loss)
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], msg=n)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30))


def bf16_kernels_vs_fp32_reference(config: InternLM2Config, lengths, device: str, backend_name: str):
    """Loss and gradients of a bf16 model on ``backend_name`` against the same weights in fp32 on the reference."""
    torch.manual_seed(7)
    with torch.device(device):
        ref = InternLM2ForCausalLM(config)
        ours = InternLM2ForCausalLM(config).to(torch.bfloat16)
    ours.load_state_dict({n: t.to(torch.bfloat16) for n, t in ref.state_dict().items()})
    ids = torch.randint(0, config.vocab_size, (sum(lengths),), device=device)
    cu = cu_of(lengths).to(device)
    results = []
    for model, name in ((ref, "reference"), (ours, backend_name)):
        with ik.use_backend(name):
            loss = model(ids, cu_seqlens=cu, labels=ids).loss
            loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    assert torch.isfinite(loss) and relative_error(loss, ref_loss) < 1e-2
    # bf16 weights and activations with fp32 accumulation: a few 1e-3 relative per matmul, compounded through the
    # blocks and their backward.
    worst = max(((relative_error(grads[n], ref_grads[n]), n) for n in ref_grads))
    assert worst[0] < 5e-2, worst


@pytest.mark.gpu
def test_bf16_model_on_gpu_kernels_matches_fp32_reference():
    # InternLM2 head shape (head dim 128, GQA 2:1), the real vocabulary, documents of unequal length.
    config = micro(hidden_size=1024, num_attention_heads=8, num_key_value_heads=4, intermediate_size=2816,
                   vocab_size=92544, max_position_embeddings=4096, rope_theta=1e6)
    bf16_kernels_vs_fp32_reference(config, (700, 1, 513, 286), "cuda", "triton")
