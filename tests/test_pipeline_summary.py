"""runs/summary.json (train.pipeline.summary): the contract on hand-made dicts, and a micro run of the whole
``python -m train.pipeline`` chain (pretraining stages, SFT, reward model, PPO) that writes a complete file."""
import copy
import json
import os
import subprocess
import sys

import pytest

from train.pipeline import split_stage_args
from train.pipeline.summary import build_summary, check_summary, pretrain_summary, write_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _probe(lengths, accuracy):
    return {"lengths": lengths, "depths": [0.0, 0.5, 1.0], "trials": 2, "accuracy": accuracy}


def _valid() -> dict:
    return {"seed": 3,
            "pretrain": {"passkey_after_short": {"256": 0.95, "512": 0.4, "1024": 0.0},
                         "passkey_final": {"256": 1.0, "512": 0.9, "1024": 0.7}},
            "sft": {"exact_match_before": 0.0, "exact_match_after": 0.7, "tool_call_exact_after": 0.8},
            "reward": {"pair_accuracy": {"concise": 0.95, "helpful": 1.0}, "unconditional_pair_accuracy": 0.5,
                       "correct_over_wrong": None},
            "ppo": {"accuracy": {"sft": 0.4, "final": 0.55, "last_round": 0.5}, "length": {"sft": 6.0, "final": 6.5},
                    "released_round": 3, "flagged_rounds": [2], "final_flagged": False},
            "wall_s": {"pretrain": 480.0, "total": 1100.0}, "threads": 1, "cpu": "some cpu",
            "aten_cpu_capability": None}


def test_pretrain_summary_means_over_depths_per_length():
    short = _probe([256, 512, 1024], [[1.0, 0.5, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    final = _probe([192, 256, 512, 1024], [[1, 1, 1], [1.0, 1.0, 0.5], [0.5, 1.0, 1.0], [0.0, 0.5, 1.0]])
    got = pretrain_summary(short, final)
    assert got == {"passkey_after_short": {"256": 0.5, "512": pytest.approx(1 / 6), "1024": 0.0},
                   "passkey_final": {"256": pytest.approx(5 / 6), "512": pytest.approx(5 / 6), "1024": 0.5}}
    with pytest.raises(ValueError, match=r"passkey_lengths.*\['1024'\]"):
        pretrain_summary(_probe([256, 512], [[1, 1, 1], [1, 1, 1]]), final)


def test_summary_records_the_isa_the_run_computed_with(monkeypatch):
    """ATen's capability and MKL's / oneDNN's own caps (an AVX2-only emulation sets all three)."""
    v = _valid()
    stages = (v["seed"], v["pretrain"], v["sft"], v["reward"], v["ppo"], v["wall_s"], v["threads"])
    for var in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    got = build_summary(*stages)
    assert got["aten_cpu_capability"] is None and got["library_isa_caps"] == {}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    got = build_summary(*stages)
    assert got["aten_cpu_capability"] == "avx2" and got["library_isa_caps"] == {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def test_write_summary_round_trips_atomically(tmp_path):
    path = tmp_path / "out" / "summary.json"
    assert write_summary(str(path), _valid()) == str(path)
    assert json.loads(path.read_text()) == _valid()
    assert os.listdir(path.parent) == ["summary.json"]          # no temporary file left behind
    bad = _valid()
    bad["sft"]["exact_match_after"] = 1.5
    with pytest.raises(ValueError, match="sft.exact_match_after"):
        write_summary(str(path), bad)
    assert json.loads(path.read_text()) == _valid()             # a refused summary leaves the old file


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("seed"), "seed"),
    (lambda d: d["reward"]["pair_accuracy"].pop("helpful"), "reward.pair_accuracy.helpful"),
    (lambda d: d["pretrain"]["passkey_final"].pop("512"), "pretrain.passkey_final"),
    (lambda d: d["pretrain"]["passkey_final"].update({"2048": 1.0}), "pretrain.passkey_final"),
    (lambda d: d["pretrain"]["passkey_after_short"].update({"1024": None}), r"passkey_after_short.1024"),
    (lambda d: d["pretrain"]["passkey_final"].update({"256": -0.1}), r"passkey_final.256"),
    (lambda d: d["ppo"]["accuracy"].update({"final": float("nan")}), "ppo.accuracy.final"),
    (lambda d: d["ppo"]["length"].update({"sft": -1.0}), "ppo.length.sft"),
    (lambda d: d["ppo"].update({"flagged_rounds": [True]}), "ppo.flagged_rounds"),
    (lambda d: d["ppo"].update({"flagged_rounds": [0]}), "ppo.flagged_rounds"),
    (lambda d: d["ppo"].update({"final_flagged": 0}), "ppo.final_flagged"),
    (lambda d: d["ppo"].update({"released_round": -1}), "ppo.released_round"),
    (lambda d: d["ppo"].update({"released_round": True}), "ppo.released_round"),
    (lambda d: d["ppo"]["accuracy"].pop("last_round"), "ppo.accuracy.last_round"),
    (lambda d: d["sft"].update({"exact_match_before": True}), "sft.exact_match_before"),
    (lambda d: d.update({"threads": -1}), "threads"),
    (lambda d: d.update({"cpu": None}), "cpu"),
    (lambda d: d["wall_s"].update({"sft": -2.0}), "wall_s.sft"),
])
def test_check_summary_names_the_bad_key(edit, match):
    d = copy.deepcopy(_valid())
    edit(d)
    with pytest.raises(ValueError, match=match):
        check_summary(d)


def test_unmeasured_metrics_are_null_not_numbers():
    d = _valid()
    d["reward"]["unconditional_pair_accuracy"] = None
    d["ppo"]["length"]["final"] = None
    assert check_summary(d) is d


def test_stage_overrides_are_split_from_the_pretraining_arguments():
    own, stages = split_stage_args(["--run.seed=2", "--sft:stages.0.steps=3", "--ppo:online.rounds=1",
                                    "--config", "x.toml"])
    assert own == ["--run.seed=2", "--config", "x.toml"]
    assert stages == {"sft": ["--stages.0.steps=3"], "reward": [], "ppo": ["--online.rounds=1"]}
    for bad in (["--dpo:x.y=1"], ["--sft:stages.0.steps"]):
        with pytest.raises(ValueError, match="stage overrides"):
            split_stage_args(bad)


MICRO_MODEL = ("{hidden_size = 32, intermediate_size = 64, num_hidden_layers = 1, num_attention_heads = 2, "
               "num_key_value_heads = 1}")


def test_micro_pipeline_writes_a_complete_summary(tmp_path):
    """The real chain and the real stage configs at micro sizes: the file exists and satisfies the contract
    (values not asserted: a micro model learns nothing in a few steps)."""
    args = [f"--run.output_dir={tmp_path}", "--run.name=micro", "--run.seed=5", "--run.device=cpu",
            f"--model.overrides={MICRO_MODEL}", "--data.heldout_docs=4", "--metrics.progress=false",
            "--metrics.plots=false", "--eval.passkey_depths=[0.5]", "--eval.passkey_trials=1",
            "--stages.0.steps=1", "--stages.1.steps=1", "--stages.2.steps=1", "--stages.3.steps=1",
            "--optim.warmup_steps=1",
            "--sft:stages.0.steps=1", "--sft:optim.warmup_steps=0", "--sft:sft.heldout=2", "--sft:sft.eval_max_new_tokens=8",
            "--sft:metrics.progress=false", "--sft:metrics.plots=false",
            "--reward:stages.0.steps=1", "--reward:optim.warmup_steps=0", "--reward:reward.heldout=4", "--reward:metrics.progress=false",
            "--reward:metrics.plots=false", "--reward:reward.task_pairs_policy_prompts=4",
            "--reward:reward.task_pairs_policy_samples=2", "--reward:reward.task_pairs_heldout=4",
            "--ppo:rollout.prompts_per_iteration=2", "--ppo:rollout.max_new_tokens=4", "--ppo:rollout.heldout_prompts=2",
            "--ppo:rollout.validation_prompts=2", "--ppo:rollout.comparison_prompts=2", "--ppo:online.rounds=1", "--ppo:online.iterations_per_round=1",
            "--ppo:online.critic_warmup_iterations=0", "--ppo:online.hackable_rm_prompts=2",
            "--ppo:online.rm_heldout_pairs=2", "--ppo:ptx.seq_len=32", "--ppo:reward_refresh.steps=1",
            "--ppo:reward_refresh.pairs_per_step=2", "--ppo:metrics.plots=false", "--ppo:metrics.progress=false"]
    # the real entry point in its own process: `make demo` runs `python -m train.pipeline`, whose control reward
    # model trains in a spawned process that imports that main module again
    run = subprocess.run([sys.executable, "-m", "train.pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    # the spawned process did not run the pipeline again
    assert (run.stdout + run.stderr).count("[train] stage 'sft'") == 1
    summary = check_summary(json.loads((tmp_path / "summary.json").read_text()))
    assert summary["seed"] == 5 and summary["threads"] >= 1
    assert set(summary["wall_s"]) == {"pretrain", "sft_reward", "ppo", "total"}
    report = (tmp_path / "micro" / "report.md").read_text()
    assert report.index("## Pretraining") < report.index("## SFT") < report.index("## PPO")
    # every image link is relative to the report and resolves
    links = [line.split("](", 1)[1].split(")", 1)[0] for line in report.splitlines() if "![" in line]
    assert links and all(not os.path.isabs(p) and os.path.exists(tmp_path / "micro" / p) for p in links)
