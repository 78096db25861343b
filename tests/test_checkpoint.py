"""HF-layout checkpoints: save/load (single file and sharded), dtype conversion, Llama layout through transformers,
the score model from a causal-LM directory, strict errors on bad directories, atomic writes."""
import dataclasses
import json

import pytest
import safetensors.torch
import torch
from transformers import LlamaForCausalLM

from models import InternLM2Config, InternLM2ForCausalLM, InternLM2ForScore
from models import checkpoint as ckpt
from models.checkpoint import CheckpointError


def micro(**overrides):
    return dataclasses.replace(InternLM2Config.preset("micro"), **overrides)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return InternLM2ForCausalLM(micro(rope_scaling={"type": "dynamic", "factor": 2.0}))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for n in sa:
        assert sa[n].dtype == sb[n].dtype and torch.equal(sa[n], sb[n]), n


def test_save_load_round_trip_bitwise(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "internlm2" and cfg["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    loaded = InternLM2ForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
    assert all(p.requires_grad for p in loaded.parameters())
    ids = torch.randint(0, 101, (9,))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_hf_names(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    names = set(safetensors.torch.load_file(tmp_path / "ckpt" / "model.safetensors"))
    per_layer = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2",
                 "attention_norm", "ffn_norm"]
    want = {"model.tok_embeddings.weight", "model.norm.weight", "output.weight"}
    want |= {f"model.layers.{i}.{s}.weight" for i in range(2) for s in per_layer}
    assert names == want


def test_sharded_save_and_dtype_conversion(model, tmp_path):
    model.save_pretrained(tmp_path / "sharded", dtype=torch.bfloat16, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / ckpt.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "sharded" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(p.numel() * 2 for p in model.parameters())
    assert json.loads((tmp_path / "sharded" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    as_bf16 = InternLM2ForCausalLM.from_pretrained(tmp_path / "sharded")
    for n, p in as_bf16.state_dict().items():
        assert p.dtype == torch.bfloat16 and torch.equal(p, model.state_dict()[n].to(torch.bfloat16)), n
    as_fp32 = InternLM2ForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}


def test_llama_layout_through_transformers_round_trips_bitwise(model, tmp_path):
    """our save (Llama layout) -> transformers load and save -> our load: the same bits."""
    model.save_pretrained(tmp_path / "llama", layout="llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    assert llama.config.num_key_value_heads == 2 and llama.config.rope_parameters["rope_type"] == "dynamic"
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=ids).logits[0], model(ids[0]).logits, rtol=1e-5, atol=1e-5)
    llama.save_pretrained(tmp_path / "from_transformers")
    back = InternLM2ForCausalLM.from_pretrained(tmp_path / "from_transformers")
    assert back.config == model.config
    assert_same_weights(back, model)


def test_split_and_merge_wqkv_are_inverse():
    cfg = micro()
    w = torch.randn(cfg.qkv_size, cfg.hidden_size)
    q, k, v = ckpt.split_wqkv(w, cfg)
    assert q.shape == (128, 128) and k.shape == v.shape == (64, 128)
    # Group 1 (kv head 1) holds query heads 2, 3, then k head 1, then v head 1, 32 rows each.
    assert torch.equal(q[64:96], w[128:160]) and torch.equal(k[32:64], w[192:224]) and torch.equal(v[32:64], w[224:])
    assert torch.equal(ckpt.merge_qkv(q, k, v, cfg), w)


def test_score_model_loads_trunk_from_causal_lm(model, tmp_path):
    model.save_pretrained(tmp_path / "lm")
    torch.manual_seed(7)
    score = InternLM2ForScore.from_pretrained(tmp_path / "lm")
    trunk = {n: t for n, t in model.state_dict().items() if n.startswith("model.")}
    for n, t in trunk.items():
        assert torch.equal(score.state_dict()[n], t), n
    head = score.score_head.weight
    assert head.shape == (1, 128) and torch.isfinite(head).all() and head.abs().sum() > 0
    score.save_pretrained(tmp_path / "rm")
    again = InternLM2ForScore.from_pretrained(tmp_path / "rm")
    assert_same_weights(again, score)
    with pytest.raises(CheckpointError, match="missing .*output.weight"):
        InternLM2ForCausalLM.from_pretrained(tmp_path / "rm")
    with pytest.raises(NotImplementedError, match="llama"):
        score.save_pretrained(tmp_path / "x", layout="llama")


def test_missing_shard_is_reported(model, tmp_path):
    model.save_pretrained(tmp_path / "c", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "c" / ckpt.INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "c" / victim).unlink()
    with pytest.raises(CheckpointError, match=f"missing: {victim}"):
        InternLM2ForCausalLM.from_pretrained(tmp_path / "c")


def test_wrong_shapes_and_names_are_all_listed(model, tmp_path):
    model.save_pretrained(tmp_path / "c")
    state = safetensors.torch.load_file(tmp_path / "c" / "model.safetensors")
    state["model.layers.1.feed_forward.w1.weight"] = torch.zeros(3, 3)
    del state["model.norm.weight"]
    state["model.layers.9.attention.wo.weight"] = torch.zeros(2)
    safetensors.torch.save_file(state, tmp_path / "c" / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        InternLM2ForCausalLM.from_pretrained(tmp_path / "c")
    msg = str(err.value)
    assert "missing (1): model.norm.weight" in msg
    assert "unexpected (1): model.layers.9.attention.wo.weight" in msg
    assert "model.layers.1.feed_forward.w1.weight: checkpoint (3, 3) vs model (200, 128)" in msg


def test_wrong_head_counts_are_refused(model, tmp_path):
    model.save_pretrained(tmp_path / "c")
    cfg_file = tmp_path / "c" / "config.json"
    good = json.loads(cfg_file.read_text())
    # One KV head instead of two: wqkv would have (4 + 2) * 32 rows; every layer is named.
    cfg_file.write_text(json.dumps(good | {"num_key_value_heads": 1}))
    with pytest.raises(CheckpointError, match=r"wrong shape \(2\): model.layers.0.attention.wqkv.weight: "
                                              r"checkpoint \(256, 128\) vs model \(192, 128\)"):
        InternLM2ForCausalLM.from_pretrained(tmp_path / "c")
    # Head counts the config itself rejects.
    cfg_file.write_text(json.dumps(good | {"num_key_value_heads": 3}))
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        InternLM2ForCausalLM.from_pretrained(tmp_path / "c")


def test_missing_files_and_bad_config(model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        InternLM2ForCausalLM.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        InternLM2ForCausalLM.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(micro().to_hf_dict()))
    with pytest.raises(CheckpointError, match="neither"):
        InternLM2ForCausalLM.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        InternLM2ForCausalLM.from_pretrained(tmp_path / "empty")


def test_llama_directory_with_missing_or_misshaped_projection(model, tmp_path):
    model.save_pretrained(tmp_path / "llama", layout="llama")
    file = tmp_path / "llama" / "model.safetensors"
    good = safetensors.torch.load_file(file)
    state = dict(good)
    del state["model.layers.0.self_attn.k_proj.weight"]
    safetensors.torch.save_file(state, file)
    with pytest.raises(CheckpointError, match="model.layers.0. lacks self_attn.k_proj.weight"):
        InternLM2ForCausalLM.from_pretrained(tmp_path / "llama")
    state = good | {"model.layers.1.self_attn.v_proj.weight": torch.zeros(32, 128)}
    safetensors.torch.save_file(state, file)
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.v_proj.weight: checkpoint \(32, 128\) "
                                              r"vs model \(64, 128\)"):
        InternLM2ForCausalLM.from_pretrained(tmp_path / "llama")


def test_interrupted_write_leaves_previous_checkpoint(model, tmp_path, monkeypatch):
    target = tmp_path / "c"
    model.save_pretrained(target, max_shard_bytes=40_000)
    before = sorted(p.name for p in target.iterdir())
    other = InternLM2ForCausalLM(micro(rope_scaling={"type": "dynamic", "factor": 2.0}))
    calls = {"n": 0}
    real_save = ckpt.save_file

    def save_then_fail(*args, **kwargs):            # the disk "fills up" on the third shard
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        other.save_pretrained(target, max_shard_bytes=40_000)
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]            # no temporary directory left behind
    assert_same_weights(InternLM2ForCausalLM.from_pretrained(target), model)
    other.save_pretrained(target)                                     # a complete write replaces it
    assert_same_weights(InternLM2ForCausalLM.from_pretrained(target), other)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_save_argument_errors(model, tmp_path):
    with pytest.raises(ValueError, match="layout"):
        model.save_pretrained(tmp_path / "c", layout="gguf")
    with pytest.raises(ValueError, match="dtype"):
        model.save_pretrained(tmp_path / "c", dtype=torch.int8)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        model.save_pretrained(tmp_path / "c", max_shard_bytes=0)
