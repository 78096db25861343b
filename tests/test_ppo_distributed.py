"""The PPO stage under torchrun on real gloo ranks: 2 ranks in ``fsdp`` and in ``zero2``, 2 tensor-parallel ranks
(tp = 2), and 4 ranks of tp = 2 x 2 data-parallel ranks sample the replies one process samples and their
per-iteration metrics equal the 1-process run's; a round checkpoint saved on 2 ranks (data or tensor parallel)
continues on 1 process (--resume) and ends where the uninterrupted 1-process run ends, and the reverse.

The micro run: 4 prompts per iteration (2 per rank), 2 mini-batches (1 row per rank each), 2 rounds of 1 PPO
iteration with a reward-model refresh between them (slow-path comparisons), fp32 on the CPU.
Tolerances: the ranks run the same fp32 math on other row groupings (a packed forward over 2 rows instead of 4, a
sum of two rank shares instead of one mean), so values agree to float32 rounding carried through at most 2 Adam
steps at lr 1e-3; Adam's normalized step turns a rounding-level gradient difference in a near-zero gradient entry
into up to ~lr of parameter difference, hence the parameter tolerance of 2e-3 (2 steps x lr) next to 1e-4 relative
for the metrics. Tensor parallelism is one more fp32 reordering of the same sums (a row-parallel matmul adds two
halves of the hidden features, the vocabulary-parallel log-probs and loss two halves of the softmax normalizer):
rounding of the same order, so the same tolerances.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from distributed_harness import run_torchrun
from test_ppo_stage import comparisons_file, micro_ppo_config, model_dirs, records  # noqa: F401  (fixture)

from models import InternLM2ForCausalLM
from models.internlm2 import InternLM2ForScore
from train.stages.ppo import latest_round, run_ppo

ROUNDS = {"online.rounds": 2, "online.iterations_per_round": 1, "online.critic_warmup_iterations": 0,
          "online.hackable_rm_prompts": 0}
METRICS = ("score", "kl", "policy_loss", "value_loss", "ptx_loss", "clip_fraction", "response_length", "accuracy")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


def write_toml(path, data: dict) -> str:
    """A TOML config of dotted keys (``section.key``) and the ``conditions`` table."""
    sections: dict[str, dict] = {}
    for key, value in data.items():
        if key == "conditions":
            sections.setdefault("conditions", {}).update(value)
        else:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in kv.items()) + "\n"
                   for s, kv in sections.items())
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_dirs):  # noqa: F811  (the fixture of test_ppo_stage)
    """The 1-process run of both rounds, and the config file the torchrun launches read."""
    root = tmp_path_factory.mktemp("ppo_ranks")
    overrides = {**ROUNDS, "online.comparisons_file": comparisons_file(root)}
    one = run_ppo(micro_ppo_config(root, model_dirs, "one", **overrides))
    data = {"run.output_dir": str(root), "run.threads": 1, "run.device": "cpu",
            "models.actor": model_dirs[0], "models.reward": model_dirs[1],
            "rollout.prompts_per_iteration": 4, "rollout.max_new_tokens": 6, "rollout.tasks": ["arithmetic", "system"],
            "rollout.domain": "concise", "rollout.heldout_prompts": 3, "rollout.comparison_prompts": 3,
            "ppo.mini_batches": 2, "ppo.actor_lr": 1e-3, "ppo.critic_lr": 1e-3, "ptx.seq_len": 32,
            "online.rm_heldout_pairs": 2, "hacking.length_ratio": 1.01, "hacking.min_pairs": 2,
            "reward_refresh.steps": 2, "reward_refresh.pairs_per_step": 4, "reward_refresh.lr": 1e-3,
            "metrics.progress": False, "metrics.plots": False, **overrides}
    from train.data.preference import DEFAULT_CONDITIONS

    data["conditions"] = dict(DEFAULT_CONDITIONS)
    return root, one, write_toml(root / "ppo_micro.toml", data)


def ppo_records(run_dir):
    return [r for r in records(run_dir) if r["kind"] == "ppo"]


def assert_same_run(run_dir, one):
    """Per-iteration metrics and the final actor / critic / reward model of ``run_dir`` equal the 1-process run's."""
    got, want = ppo_records(run_dir), ppo_records(one.run_dir)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        for key in METRICS:
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), (key, g[key], w[key])
    final = latest_round(run_dir)
    for name, cls, model in (("actor", InternLM2ForCausalLM, one.actor), ("critic", InternLM2ForScore, one.critic),
                             ("reward", InternLM2ForScore, one.reward_model)):
        saved = cls.from_pretrained(os.path.join(final, name)).state_dict()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(saved[key], value, rtol=1e-3, atol=2e-3, msg=f"{name}.{key}")


@pytest.mark.parametrize("mode", ["fsdp", "zero2"])
def test_two_ranks_equal_one_process(setup, mode):
    root, one, config = setup
    run_torchrun("train.stages.ppo", ["--config", config, f"--run.name={mode}", f"--parallel.mode={mode}"],
                 timeout=600)
    assert_same_run(os.path.join(root, mode), one)


def test_tensor_parallel_two_ranks_equal_one_process(setup):
    """tp = 2: actor, reference, critic and reward model split over both ranks (the LM head's log-probs
    vocabulary-parallel), replies sampled from the actor's gathered copy on each rank."""
    root, one, config = setup
    run_torchrun("train.stages.ppo", ["--config", config, "--run.name=tp", "--parallel.mode=fsdp",
                                      "--parallel.tp=2"], timeout=600)
    assert_same_run(os.path.join(root, "tp"), one)


def test_tensor_x_data_parallel_four_ranks_equal_one_process(setup):
    """tp = 2 x 2 data-parallel ranks under ZeRO-2: each tp pair samples its half of the prompts."""
    root, one, config = setup
    run_torchrun("train.stages.ppo", ["--config", config, "--run.name=tp_zero2", "--parallel.mode=zero2",
                                      "--parallel.tp=2"], ranks=4, timeout=600)
    assert_same_run(os.path.join(root, "tp_zero2"), one)


def test_a_round_saved_under_tensor_parallelism_resumes_on_one_process(setup):
    root, one, config = setup
    run_torchrun("train.stages.ppo", ["--config", config, "--run.name=tp_cut", "--parallel.mode=fsdp",
                                      "--parallel.tp=2", "--run.stop_after_round=1"], timeout=600)
    assert latest_round(os.path.join(root, "tp_cut")).endswith("round_01")
    from train.stages.ppo_config import load_ppo_config

    resumed = run_ppo(load_ppo_config(config, {"run.name": "tp_cut", "resume": True}))
    assert resumed.finished and resumed.state.rounds_done == 2
    assert_same_run(resumed.run_dir, one)


def test_a_round_saved_on_two_ranks_resumes_on_one_process(setup):
    root, one, config = setup
    run_torchrun("train.stages.ppo", ["--config", config, "--run.name=cut", "--parallel.mode=fsdp",
                                      "--run.stop_after_round=1"], timeout=600)
    assert latest_round(os.path.join(root, "cut")).endswith("round_01")
    from train.stages.ppo_config import load_ppo_config

    resumed = run_ppo(load_ppo_config(config, {"run.name": "cut", "resume": True}))
    assert resumed.finished and resumed.state.rounds_done == 2
    assert_same_run(resumed.run_dir, one)
    assert [r["kind"] for r in records(resumed.run_dir)] == [r["kind"] for r in records(one.run_dir)]


def test_a_round_saved_on_one_process_resumes_on_two_ranks(setup):
    """The reverse, into ZeRO-2's sharded optimizer state (and the reward model's model-only state)."""
    root, one, config = setup
    from train.stages.ppo_config import load_ppo_config

    first = run_ppo(load_ppo_config(config, {"run.name": "cut1", "run.stop_after_round": 1}))
    assert not first.finished
    run_torchrun("train.stages.ppo", ["--config", config, "--run.name=cut1", "--parallel.mode=zero2", "--resume"],
                 timeout=600)
    assert_same_run(os.path.join(root, "cut1"), one)
