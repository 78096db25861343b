"""The PPO stage end to end on micro models: online rounds with the fast/slow paths and reward-model refreshes,
round checkpoints, and exact resumption at a round boundary."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from models import InternLM2Config, InternLM2ForCausalLM
from models.internlm2 import InternLM2ForScore
from train.checkpoint import read_saved_state
from train.config import ConfigError
from train.data.preference import DEFAULT_CONDITIONS
from train.eval.ppo_report import write_ppo_report
from train.rlhf.release import released_round
from train.stages.ppo import latest_round, run_ppo
from train.stages.ppo_config import load_ppo_config

MICRO = dataclasses.replace(InternLM2Config.preset("micro"), vocab_size=272, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    InternLM2ForCausalLM(MICRO).save_pretrained(root / "sft")
    rm = InternLM2ForScore(MICRO)
    rm.score_head.weight.data.normal_(0, 0.3)
    rm.save_pretrained(root / "rm")
    return str(root / "sft"), str(root / "rm")


def micro_ppo_config(tmp_path, model_dirs, name="ppo", **overrides):
    data = {"run.output_dir": str(tmp_path), "run.name": name, "run.threads": 1, "run.device": "cpu",
            "models.actor": model_dirs[0], "models.reward": model_dirs[1],
            "rollout.prompts_per_iteration": 4, "rollout.max_new_tokens": 6, "rollout.tasks": ["arithmetic", "system"],
            "rollout.domain": "concise", "rollout.heldout_prompts": 3, "rollout.comparison_prompts": 3,
            "ppo.mini_batches": 2, "ppo.actor_lr": 1e-3, "ppo.critic_lr": 1e-3, "ptx.seq_len": 32,
            "online.rounds": 2, "online.iterations_per_round": 2, "online.critic_warmup_iterations": 1,
            "online.hackable_rm_prompts": 4, "online.rm_heldout_pairs": 2,
            "hacking.length_ratio": 1.01, "hacking.min_pairs": 2,
            "reward_refresh.steps": 2, "reward_refresh.pairs_per_step": 4, "reward_refresh.lr": 1e-3,
            "conditions": dict(DEFAULT_CONDITIONS), "metrics.progress": False, "metrics.plots": False}
    data.update(overrides)
    return load_ppo_config(None, data)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def comparisons_file(tmp_path):
    """Slow-path comparisons as a labelling team would hand them over (random micro models answer nothing right,
    so the checkers alone would label no pair)."""
    path = tmp_path / "comparisons.jsonl"
    rows = [{"domain": "concise", "prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "chosen": str(a + 1),
             "rejected": f"{a + 1} and so on"} for a in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rounds_then_resume_exactly(tmp_path, model_dirs):
    # with the checker's term in the reward (train.rlhf.rewards.checker_scores): resumed exactly as well
    slow = {"online.comparisons_file": comparisons_file(tmp_path), "rollout.validation_prompts": 3,
            "ppo.checker_weight": 0.5}
    full = run_ppo(micro_ppo_config(tmp_path, model_dirs, "full", **slow))
    assert full.finished and full.state.rounds_done == 2 and full.state.iterations_done == 4
    recs = records(full.run_dir)
    kinds = [r["kind"] for r in recs]
    assert kinds.count("ppo") == 4 and kinds.count("critic_warmup") == 1 and kinds.count("eval") == 3
    ppo = [r for r in recs if r["kind"] == "ppo"]
    # The generator's log-probs (decode path) against the trainer's recomputation (packed forward, fused log-probs):
    # the same fp32 model, so they agree to rounding.
    assert all(0 <= r["sampler_mismatch_mean_abs"] < 1e-4 for r in ppo), [r["sampler_mismatch_mean_abs"] for r in ppo]
    assert all(abs(r["sampler_mismatch_ratio_mean"] - 1) < 1e-4 for r in ppo)
    assert kinds.count("rm_refresh") == 2                 # the hackable first RM, then one refresh between rounds
    assert [e["name"] for e in full.state.evals] == ["sft", "round 1", "round 2"]
    assert set(full.state.evals[0]["rm_accuracy"]) >= {"correct>wrong", "short>padded", "concise", "helpful", "all"}
    assert os.path.isdir(os.path.join(full.run_dir, "rounds", "round_01", "reward"))
    assert latest_round(full.run_dir).endswith("round_02")
    # The released policy (train.rlhf.release, from each round's validation accuracy) is linked for serving.
    assert all(0 <= e["validation_accuracy"] <= 1 for e in full.state.evals)
    released, link = released_round(full.state.evals, full.state.episodes), os.path.join(full.run_dir, "released")
    if released:
        assert os.readlink(link) == os.path.join("rounds", f"round_{released:02d}")
        assert os.path.isfile(os.path.join(link, "actor", "config.json"))
    else:
        assert not os.path.lexists(link)

    # the file's 3 comparisons, and each distinct wrong late rollout against its reference answer
    pairs = full.state.online_pairs
    answer = [p for p in pairs if p.get("source") == "slow_path:answer_vs_late_rollouts"]
    assert full.state.episodes[0]["slow_pairs"] == len(pairs) and len(pairs) - len(answer) == 3 and answer
    assert "rm_accuracy_after_refresh" in full.state.evals[1]

    cut = micro_ppo_config(tmp_path, model_dirs, "cut", **slow, **{"run.stop_after_round": 1})
    first = run_ppo(cut)
    assert not first.finished and first.state.rounds_done == 1
    # A save killed before its rename leaves a .tmp directory: ignored, the previous round is resumed.
    half = os.path.join(first.run_dir, "rounds", "round_02.tmp")
    os.makedirs(os.path.join(half, "actor"))
    open(os.path.join(half, "state.json"), "w").write("{truncated")
    assert latest_round(first.run_dir).endswith("round_01")
    resumed = run_ppo(dataclasses.replace(cut, resume=True, run=dataclasses.replace(cut.run, stop_after_round=0)))
    assert resumed.finished and resumed.state.rounds_done == 2
    for a, b in ((full.actor, resumed.actor), (full.critic, resumed.critic), (full.reward_model, resumed.reward_model)):
        pa, pb = params(a), params(b)
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k
    def untimed(run_dir):
        return [{k: v for k, v in r.items() if not k.startswith("time")} for r in records(run_dir)]
    assert untimed(full.run_dir) == untimed(resumed.run_dir)
    assert dataclasses.asdict(full.state) == dataclasses.asdict(resumed.state)

    report = open(write_ppo_report(resumed, plots_enabled=True)).read()
    for heading in ("| sft |", "| round 2 |", "v0 (the first RM)", "v1 (refreshed after round 1)", "Reward hacking",
                    "Time per PPO iteration"):
        assert heading in report
    assert os.path.isfile(os.path.join(resumed.run_dir, "ppo_kl.png"))


def test_config_errors_name_the_key(tmp_path, model_dirs):
    with pytest.raises(ConfigError, match="ppo.mini_batches"):
        micro_ppo_config(tmp_path, model_dirs, **{"ppo.mini_batches": 9})
    with pytest.raises(ConfigError, match="models.actor"):
        micro_ppo_config(tmp_path, model_dirs, **{"models.actor": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="rollout.domain"):
        micro_ppo_config(tmp_path, model_dirs, **{"rollout.domain": "math"})
    with pytest.raises(ConfigError, match="rollout.validation_prompts"):
        micro_ppo_config(tmp_path, model_dirs, **{"rollout.validation_prompts": -1})
    with pytest.raises(ConfigError, match="ppo.checker_weight"):
        micro_ppo_config(tmp_path, model_dirs, **{"ppo.checker_weight": -1.0})
    with pytest.raises(ConfigError, match="online.hackable_rm_samples"):
        micro_ppo_config(tmp_path, model_dirs, **{"online.hackable_rm_samples": 0})
    with pytest.raises(ConfigError, match="unknown key 'kl'"):
        micro_ppo_config(tmp_path, model_dirs, **{"ppo.kl": 0.1})
    for value in (True, False):         # removed: per-prompt sampling is the only behaviour; say so, either value
        with pytest.raises(ConfigError, match="rollout.seed_per_prompt was removed"):
            micro_ppo_config(tmp_path, model_dirs, **{"rollout.seed_per_prompt": value})
    # tensor parallelism splits whole GQA groups and vocabulary slices of both models (micro: 2 KV heads)
    with pytest.raises(ConfigError, match=r"parallel.tp \(4\) must divide num_key_value_heads \(2\).*models.actor"):
        micro_ppo_config(tmp_path, model_dirs, **{"parallel.tp": 4})
    with pytest.raises(ConfigError, match="parallel.tp must be >= 1"):
        micro_ppo_config(tmp_path, model_dirs, **{"parallel.tp": 0})
    assert micro_ppo_config(tmp_path, model_dirs, **{"parallel.tp": 2}).parallel.tp == 2


def test_pipeline_appends_the_ppo_section(tmp_path, model_dirs):
    """train.pipeline.ppo.run_rlhf with the real configs/ppo_tiny.toml shrunk to micro sizes: the reward stage's
    condition prompts (read from its run's config.json) reach the reward side, the section lands in the report."""
    from train.config import load_config, to_dict
    from train.pipeline.ppo import PPO_CONFIG, run_rlhf
    from train.stages.align_config import parse_reward_cli

    reward_cfg = parse_reward_cli(["--config", os.path.join(os.path.dirname(PPO_CONFIG), "reward_tiny.toml")])
    reward_run = tmp_path / "reward_run"
    reward_run.mkdir()
    conditions = dict(reward_cfg.reward.conditions)
    conditions["concise"] += " (as trained)"
    (reward_run / "config.json").write_text(json.dumps({**to_dict(reward_cfg), "reward": {
        **to_dict(reward_cfg)["reward"], "conditions": conditions}}))
    pipeline_cfg = load_config(None, {"run.output_dir": str(tmp_path), "run.threads": 1, "run.device": "cpu"})
    report = tmp_path / "report.md"
    report.write_text("# earlier sections\n")
    overrides = {"rollout.prompts_per_iteration": 4, "rollout.max_new_tokens": 4, "rollout.heldout_prompts": 2,
                 "rollout.validation_prompts": 2, "rollout.comparison_prompts": 2, "online.rounds": 1, "online.iterations_per_round": 1,
                 "online.critic_warmup_iterations": 0, "online.hackable_rm_prompts": 2, "online.rm_heldout_pairs": 2,
                 "ptx.seq_len": 32, "reward_refresh.steps": 1, "reward_refresh.pairs_per_step": 2,
                 "metrics.plots": False, "metrics.progress": False, "run.name": "ppo_from_pipeline"}
    result = run_rlhf(pipeline_cfg, model_dirs[0], model_dirs[1], str(reward_run), str(report), 0.0,
                      overrides=overrides)
    assert result is not None and result.state.rounds_done == 1
    saved = json.load(open(os.path.join(result.run_dir, "ppo_config.json")))
    assert saved["conditions"] == conditions and saved["models"]["actor"] == model_dirs[0]
    assert saved["rollout"]["domain"] == "concise" and saved["online"]["rounds"] == 1
    text = report.read_text()
    assert text.startswith("# earlier sections") and "## PPO in rounds (COOL RLHF)" in text
    assert "PPO, evaluations)" in text


def test_models_may_name_a_stage_run_directory(tmp_path, model_dirs):
    from train.stages.ppo_config import model_dir

    run = tmp_path / "sft_run"
    for step in (3, 12):        # the newest checkpoint's export is taken
        InternLM2ForCausalLM(MICRO).save_pretrained(run / "checkpoints" / f"step_{step:08d}" / "model")
    assert model_dir(str(run)) == str(run / "checkpoints" / "step_00000012" / "model")
    assert model_dir(model_dirs[0]) == model_dirs[0]
    cfg = micro_ppo_config(tmp_path, model_dirs, **{"models.actor": str(run)})
    assert cfg.models.actor == str(run)
    with pytest.raises(ConfigError, match="neither a model directory"):
        micro_ppo_config(tmp_path, model_dirs, **{"models.reward": str(tmp_path)})


def test_restart_after_a_flagged_round_resumes_exactly(tmp_path, model_dirs):
    """online.restart_after_hack = last_clean: round 1 is flagged (the reward rule's thresholds set so it always
    fires), so round 2 starts from the SFT policy — its first rollout's KL to the reference is exactly 0 — after a
    critic re-warmup against the refreshed RM; stopped after round 1 and resumed, it equals the uninterrupted run."""
    flagged = {"hacking.min_reward_gain": -1e9, "hacking.min_accuracy_drop": -1.0,
               "online.restart_after_hack": "last_clean", "online.critic_rewarmup_iterations": 1,
               "online.iterations_per_round": 1}
    full = run_ppo(micro_ppo_config(tmp_path, model_dirs, "restart_full", **flagged))
    assert full.state.episodes[0]["findings"] and full.state.restarts == [{"round": 2, "from": "sft"}]
    recs = records(full.run_dir)
    assert [(r["kind"], r["round"]) for r in recs if r["kind"] in ("critic_warmup", "restart")] == [
        ("critic_warmup", 0), ("restart", 2), ("critic_warmup", 2)]
    ppo = [r for r in recs if r["kind"] == "ppo"]
    assert ppo[0]["kl"] == 0.0 and ppo[1]["kl"] == 0.0      # both rounds' first rollouts come from the SFT policy
    rescored = full.state.evals[1]["reward_under_refreshed_rm"]
    assert set(rescored) == {"this round", "sft"} and all(isinstance(v, float) for v in rescored.values())

    cut = micro_ppo_config(tmp_path, model_dirs, "restart_cut", **flagged, **{"run.stop_after_round": 1})
    assert not run_ppo(cut).finished
    resumed = run_ppo(dataclasses.replace(cut, resume=True, run=dataclasses.replace(cut.run, stop_after_round=0)))
    for a, b in ((full.actor, resumed.actor), (full.critic, resumed.critic)):
        pa, pb = params(a), params(b)
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert dataclasses.asdict(full.state) == dataclasses.asdict(resumed.state)
    report = open(write_ppo_report(resumed, plots_enabled=False)).read()
    assert "The reward-hacking episode of round 1" in report and "started from the policy of sft" in report


def test_restart_loads_the_last_unflagged_rounds_policy_and_optimizer(tmp_path, model_dirs):
    """When an unflagged round precedes the flagged one, the restart loads that round's checkpointed actor and its
    optimizer state from disk (the flagged round's own weights are discarded)."""
    from train.stages.ppo import OnlineState, Stage, _restart_actor, load_state

    never = {"hacking.length_ratio": 100.0, "hacking.repeat_margin": 100.0, "hacking.min_reward_gain": 1e9,
             "online.rounds": 1}
    cfg = micro_ppo_config(tmp_path, model_dirs, "clean_round", **never)
    done = run_ppo(cfg)
    assert done.state.episodes[0]["findings"] == []
    saved = latest_round(done.run_dir)
    stage = Stage(cfg)
    actor, reference, critic, _ = stage.load(model_dirs[0], model_dirs[1], model_dirs[1])
    learner, _ = stage.learners(actor, critic)
    state = OnlineState(episodes=load_state(saved).episodes + [{"round": 2, "findings": [{"pattern": "x"}]}])
    _restart_actor(stage, cfg, state, learner, reference, 3)
    opt = learner.optimizer
    assert state.restarts == [{"round": 3, "from": "round 1"}]
    want = InternLM2ForCausalLM.from_pretrained(os.path.join(saved, "actor")).state_dict()
    got = actor.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["output.weight"], reference.state_dict()["output.weight"])
    opt_saved = read_saved_state(saved)["actor"]["optimizer"]["state"]       # keyed by parameter name
    names = [name for name, _ in actor.named_parameters()]
    assert opt_saved and all(torch.equal(opt.state_dict()["state"][i]["exp_avg"], opt_saved[name]["exp_avg"])
                             for i, name in enumerate(names))
