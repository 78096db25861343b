"""LR schedule values and the TOML config loader (overrides, clear errors)."""
from __future__ import annotations

import glob
import math
import os

import pytest
import torch

from train.config import ConfigError, TrainConfig, load_config, parse_cli, to_dict
from train.schedule import WarmupCosine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_schedule_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    s = WarmupCosine(opt, peak_lr=1e-3, warmup_steps=4, total_steps=14, min_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(s.apply())
        assert opt.param_groups[0]["lr"] == lrs[-1]
        s.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)  # linear warmup, peak at W-1
    # Cosine from the peak (step 4) to 10% of it at the last step (13), half-way at step 8.5.
    for step in range(4, 14):
        p = (step - 4) / 9
        assert lrs[step] == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * p)), rel=1e-12)
    assert lrs[13] == pytest.approx(1e-4, rel=1e-12) and lrs[14] == lrs[15] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    state = s.state_dict()
    t = WarmupCosine(None, 1e-3, 4, 14, 0.1)
    t.load_state_dict(state)
    assert t.apply() == s.apply()


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(None, 1e-3, 20, 10)
    with pytest.raises(ValueError, match="lr"):
        WarmupCosine(None, 0.0, 0, 10)
    assert WarmupCosine(None, 1e-3, 0, 1).lr_at(0) == 1e-3  # no warmup, single step: the peak


def _load_shipped(path: str, tmp_path):
    """Each stage's config through its own loader (the SFT, reward and PPO stages add sections of their own; the
    data pipeline has its own schema, and the configs that train on its output read a folder the pipeline writes,
    stood in for here by one jsonl document)."""
    from train.data.pipeline_config import load_pipeline_config
    from train.stages.align_config import parse_reward_cli, parse_sft_cli
    from train.stages.ppo_config import load_ppo_config

    name = os.path.basename(path)
    if name == "data_pipeline.toml":
        return load_pipeline_config(path)
    if name.startswith("data_"):
        doc = tmp_path / "pipeline_output" / "part.jsonl"
        doc.parent.mkdir(exist_ok=True)
        doc.write_text('{"text": "a kept document"}\n')
        return load_config(path, {"data.paths": [str(doc.parent)]})
    if name.startswith("ppo_"):
        return load_ppo_config(path, check_paths=False)      # its model directories come from earlier stages
    if name.startswith("sft_"):
        return parse_sft_cli(["--config", path])
    if name.startswith("reward_"):
        return parse_reward_cli(["--config", path])
    return load_config(path)


def test_shipped_configs_load(tmp_path):
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml")))
    assert {os.path.basename(p) for p in paths} >= {"tiny_cpu.toml", "internlm2_1_8b.toml", "internlm2_7b.toml"}
    for path in paths:
        c = _load_shipped(path, tmp_path)
        assert not isinstance(c, TrainConfig) or c.stages
    tiny = load_config(os.path.join(ROOT, "configs", "tiny_cpu.toml"))
    # copy curriculum stages, then InternLM2's short stage and its long-context stage with the base raised
    assert [s.rope_theta for s in tiny.stages] == [50_000.0] * 3 + [1_000_000.0]
    assert tiny.stages[-1].seq_len > tiny.stages[-2].seq_len == tiny.stages[0].seq_len
    assert [s.name for s in tiny.stages][-2:] == ["short", "long"] and tiny.data.packing == "fit"


def test_cli_overrides(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nname = "x"\n[[stages]]\nname = "a"\nsteps = 5\nseq_len = 64\n'
                   '[[stages]]\nname = "b"\nsteps = 2\nseq_len = 128\n')
    c = parse_cli(["--config", str(cfg), "--optim.lr=1e-3", "--stages.1.steps", "7", "--run.name=y",
                   "--eval.passkey_lengths=[128, 256]", "--model.overrides.hidden_size=64", "--resume",
                   "--data.document_boundaries=false"])
    assert c.optim.lr == 1e-3 and c.stages[1].steps == 7 and c.stages[0].steps == 5 and c.run.name == "y"
    assert c.eval.passkey_lengths == [128, 256] and c.model.overrides == {"hidden_size": 64}
    assert c.checkpoint.resume is True and c.data.document_boundaries is False
    assert to_dict(c)["stages"][1]["steps"] == 7


@pytest.mark.parametrize("args, match", [
    (["--optim.lrr=1"], "unknown key 'lrr'"),
    (["--optim.lr=fast"], "optim.lr: expected a number"),
    (["--optim.lr=-1"], "optim.lr must be > 0"),
    (["--stages.3.steps=1"], "stages.3 must index"),
    (["--stages.0.seq_len=64", "--stages.0.micro_batch_tokens=100"], "multiple of seq_len"),
    (["--stages.0.mix.poetry=1"], "unknown task 'poetry'"),
    (["--run.device=tpu"], "run.device"),
    (["--data.source=files"], "data.paths"),
    (["--data.source=files", "--data.paths=['/no/such/file.jsonl']"], "does not exist"),
    (["--data.tokenizer=/no/such/tokenizer.model"], "data.tokenizer"),
    (["--model.init_from=/no/such/dir"], "model.init_from"),
    (["--config", "/no/such.toml"], "does not exist"),
    (["stray"], "unexpected argument"),
    (["--optim.warmup_steps=1000"], "warmup_steps"),
    (["--model.preset=huge"], "model.preset must be one of"),
    (["--model.overrides.hidden=3"], "model.overrides: 'hidden' is not an InternLM2Config field"),
    (["--model.overrides.num_key_value_heads=3"], "model.overrides: num_attention_heads"),
    (["--parallel.mode=zero9"], "parallel.mode must be one of"),
    (["--parallel.tp=0"], "parallel.tp must be >= 1"),
    (["--parallel.shard_size=-1"], "parallel.shard_size"),
    (["--parallel.nodes=2"], "unknown key 'nodes'"),
    (["--data.byte_vocab_size=100"], "data.byte_vocab_size"),
    (["--stages.0.name="], "stages.0.name"),
    (["--data.packing=tight"], "data.packing must be one of"),
    (["--stages.0.induction_min_chars=0"], "stages.0: need 0 < induction_min_chars"),
    (["--stages.0.induction_min_chars=30", "--stages.0.induction_max_chars=20"], "stages.0: need 0 < induction_min"),
])
def test_bad_configs_raise_clear_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        parse_cli(args)


def test_cli_refuses_a_bad_key_before_any_work(tmp_path, capsys):
    from train import pipeline
    from train.stages import pretrain

    for entry in (pretrain.main, pipeline.main):
        assert entry(["--model.preset=huge", f"--run.output_dir={tmp_path}"]) == 2
        assert "model.preset must be one of" in capsys.readouterr().err
    assert not os.listdir(tmp_path)                                   # no run directory, no metrics, no bar


def test_bad_toml_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[optim]\nbetas = 0.9\n")
    with pytest.raises(ConfigError, match=r"wrong.toml: optim.betas: expected a list"):
        load_config(str(wrong))
