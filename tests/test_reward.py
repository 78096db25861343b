"""Reward model: COOL RLHF losses vs plain-torch formulas, preference data and conditions, pair packing."""
import json
import math

import pytest
import torch

from train.data.chat import render
from train.data.items import ItemBatches
from train.data.preference import (
    CORRECT_OVER_WRONG,
    DEFAULT_CONDITIONS,
    MixedPreferences,
    SyntheticPreferences,
    TaskPreferences,
    conditioned,
    corrupt,
    pair_item,
    read_preferences,
    reward_token_id,
)
from train.data.tokenizer import ByteTokenizer
from train.rlhf.reward_losses import bradley_terry_loss, focal_ranking_loss, log_barrier_penalty, reward_loss


def _pairs(n, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    rc = (torch.randn(n, generator=g, dtype=torch.float64) * scale).requires_grad_()
    rr = (torch.randn(n, generator=g, dtype=torch.float64) * scale).requires_grad_()
    return rc, rr


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y = fn(*xs)
    y.backward()
    return y.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
def test_focal_ranking_loss_matches_formula(gamma):
    rc, rr = _pairs(37, seed=int(gamma * 10))

    def plain(c, r):
        p = torch.sigmoid(c - r)
        return (-(1 - 2 * torch.clamp(p - 0.5, min=0)) ** gamma * torch.log(p)).mean()

    got, got_g = _grads(lambda c, r: focal_ranking_loss(c, r, gamma), rc, rr)
    ref, ref_g = _grads(plain, rc, rr)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if gamma == 0.0:   # gamma 0 is Bradley-Terry
        torch.testing.assert_close(got, bradley_terry_loss(rc, rr).detach())


def test_focal_down_weights_easy_pairs_and_stays_finite():
    easy = focal_ranking_loss(torch.tensor([4.0]), torch.tensor([-4.0]))
    assert easy < 0.01 * bradley_terry_loss(torch.tensor([4.0]), torch.tensor([-4.0]))
    wrong = torch.tensor([-1.0]), torch.tensor([1.0])     # P < 0.5: weight 1, the full -log P
    torch.testing.assert_close(focal_ranking_loss(*wrong), bradley_terry_loss(*wrong))
    far = torch.tensor([-200.0], dtype=torch.float32, requires_grad=True)
    loss = focal_ranking_loss(far, torch.tensor([200.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(far.grad).all() and far.grad.item() == pytest.approx(-1.0)
    torch.testing.assert_close(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])),
                               torch.tensor(math.log(2.0)))


def test_log_barrier_matches_formula_inside():
    s = (torch.rand(41, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 9.8 - 4.9)
    got, (g,) = _grads(lambda x: log_barrier_penalty(x, 5.0), s)
    ref, (rg,) = _grads(lambda x: (-(torch.log(5.0 + x) + torch.log(5.0 - x))).mean(), s)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: log_barrier_penalty(x, 2.0), (s.detach() / 3).requires_grad_())


def test_log_barrier_outside_is_clamped_to_its_tangent():
    bound = 5.0
    edge = bound * (1 - 1e-3)
    s = torch.tensor([-7.0, -5.0, 5.0, 6.0, 100.0], dtype=torch.float64, requires_grad=True)
    loss = log_barrier_penalty(s, bound, reduction="none")
    loss.sum().backward()
    c = s.detach().clamp(-edge, edge)
    value = -(torch.log(bound + c) + torch.log(bound - c))
    slope = 1 / (bound - c) - 1 / (bound + c)
    torch.testing.assert_close(loss.detach(), value + slope * (s.detach() - c))
    torch.testing.assert_close(s.grad, slope)
    assert torch.isfinite(loss).all()
    assert (s.grad[:2] < -100).all() and (s.grad[2:] > 100).all()    # pushed back inside, steeply


def test_reward_loss_total_and_reductions():
    rc, rr = _pairs(16, seed=5, scale=1.5)
    total = reward_loss(rc, rr)
    ref = (focal_ranking_loss(rc, rr) + 0.02 * log_barrier_penalty(torch.cat([rc, rr]))).detach()
    torch.testing.assert_close(total.detach(), ref)
    torch.testing.assert_close(reward_loss(rc, rr, reduction="sum").detach() / 16, ref)
    bt = reward_loss(rc, rr, kind="bradley_terry", penalty=0.0)
    torch.testing.assert_close(bt.detach(), bradley_terry_loss(rc, rr).detach())
    with pytest.raises(ValueError, match="reward.loss"):
        reward_loss(rc, rr, kind="hinge")
    with pytest.raises(ValueError, match="r_rejected shape"):
        focal_ranking_loss(rc, rr[:3])


def test_reward_token_is_unused_by_text():
    tok = ByteTokenizer()
    rid = reward_token_id(tok)
    assert rid == 265 and rid not in tok.encode("".join(chr(i) for i in range(256)) + "<|im_start|><|plugin|>")
    assert reward_token_id(ByteTokenizer(92544)) == 92537


def test_synthetic_preferences_flip_between_domains():
    prefs = SyntheticPreferences(seed=2)
    for k in range(10):
        a, b = prefs[2 * k], prefs[2 * k + 1]
        assert {a.domain, b.domain} == set(SyntheticPreferences.domains)
        assert a.prompt == b.prompt and a.chosen == b.rejected and a.rejected == b.chosen
    tok = ByteTokenizer()
    rid = reward_token_id(tok)
    item = pair_item(prefs[0], tok, rid, DEFAULT_CONDITIONS, SyntheticPreferences.domains)
    (c_ids, _), (r_ids, _) = item.sequences
    assert c_ids[-1] == rid == r_ids[-1]
    text = tok.decode(c_ids[:-1])
    assert text == render(conditioned(prefs[0], prefs[0].chosen, DEFAULT_CONDITIONS))
    assert text.startswith(f"<s><|im_start|>system\n{DEFAULT_CONDITIONS[prefs[0].domain]}<|im_end|>\n")
    plain = pair_item(prefs[0], tok, rid, {}, SyntheticPreferences.domains)     # unconditional: no system prompt
    assert tok.decode(plain.sequences[0][0]).startswith("<s><|im_start|>user\n")
    with pytest.raises(ValueError, match="no condition prompt for domain 'concise'"):
        pair_item(prefs[0], tok, rid, {"helpful": "x"}, SyntheticPreferences.domains)


def test_corrupt_is_a_near_miss_never_the_answer():
    import random

    rng = random.Random(0)
    for answer in ("7", "0", "18", "Vesk", "ab", "x", "NCS", "522 * 53 = 27666", "Toka Mi lives in Ormel."):
        outs = [corrupt(rng, answer) for _ in range(200)]
        assert all(o != answer and o.strip() for o in outs)
        assert all(abs(len(o) - len(answer)) <= max(3, len(answer)) for o in outs)
    nums = [corrupt(rng, "12") for _ in range(200)]
    assert sum(n.isdigit() and abs(int(n) - 12) <= 3 for n in nums) >= 100      # mostly off by 1-3
    assert {corrupt(random.Random(k), "abcdef")[:1] for k in range(50)} >= {"a"}   # character-level edits
    cased = {corrupt(random.Random(k), "ZWAP") for k in range(200)}
    assert "zwap" in cased and cased & {"zWAP", "ZwAP", "ZWaP", "ZWAp"}   # the whole reply or one letter miscased


def test_task_preferences_chosen_passes_the_checker_rejected_fails():
    from train.rlhf.rollouts import SyntheticPrompts

    tasks = ["arithmetic", "recall", "echo"]
    prefs = TaskPreferences(seed=4, split="train", tasks=tasks, domain="concise")
    prompts = SyntheticPrompts(4, "pref-train", tasks, "concise")    # the same conversations, as PPO prompts
    for i in range(60):
        pair, prompt = prefs[i], prompts[i]
        assert pair.domain == "concise" and pair.prompt == prompt.messages
        assert prompt.check(pair.chosen[-1].content) is True
        assert prompt.check(pair.rejected[-1].content) is False
    assert prefs[3] == TaskPreferences(seed=4, split="train", tasks=tasks)[3]               # random access
    assert prefs[3] != TaskPreferences(seed=4, split="heldout", tasks=tasks)[3]


def test_mixed_preferences_share_and_reward_stage_groups():
    from train.config import repo_config
    from train.stages.align_config import parse_reward_cli
    from train.stages.reward import preference_sets

    flipped, tasks = SyntheticPreferences(1), TaskPreferences(1, "train", ["arithmetic"])
    mixed = MixedPreferences(flipped, tasks, 0.25, seed=1)
    picks = [mixed.from_second(i) for i in range(2000)]
    assert 0.2 < sum(picks) / len(picks) < 0.3
    assert all(mixed[i] == (tasks[i] if p else flipped[i]) for i, p in enumerate(picks[:50]))
    assert not any(MixedPreferences(flipped, tasks, 0.0, 1).from_second(i) for i in range(100))
    with pytest.raises(ValueError, match="task_pairs_share"):
        MixedPreferences(flipped, tasks, 1.5, 1)
    cfg = parse_reward_cli(["--config", repo_config("reward_tiny.toml"), "--reward.heldout=6", "--reward.task_pairs_share=0.5", "--reward.task_pairs_heldout=4",
                            '--reward.task_pairs_tasks=["arithmetic"]', "--reward.task_pairs_policy_prompts=0"])
    train, held, groups, names = preference_sets(cfg)
    assert names == SyntheticPreferences.domains + (CORRECT_OVER_WRONG,)
    assert groups == [p.domain for p in held[:6]] + [CORRECT_OVER_WRONG] * 4
    assert all(p.domain == "concise" for p in held[6:]) and isinstance(train, MixedPreferences)
    tok = ByteTokenizer()
    item = pair_item(held[-1], tok, reward_token_id(tok), DEFAULT_CONDITIONS, names, groups[-1])
    assert item.group == names.index(CORRECT_OVER_WRONG)
    assert tok.decode(item.sequences[0][0]).startswith(f"<s><|im_start|>system\n{DEFAULT_CONDITIONS['concise']}")


def test_read_preferences(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rec = {"domain": "math", "prompt": "1+1?", "chosen": "2", "rejected": "3"}
    tool = {"domain": "code", "tools": [{"type": "function", "function": {"name": "calc"}}],
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1?"}],
            "chosen": [{"role": "assistant", "content": "",
                        "tool_calls": [{"function": {"name": "calc", "arguments": "{}"}}]},
                       {"role": "tool", "content": "2"}, {"role": "assistant", "content": "2"}],
            "rejected": "3"}
    path.write_text(json.dumps(rec) + "\n" + json.dumps(tool) + "\n")
    a, b = read_preferences(str(path))
    assert a.domain == "math" and [m.role for m in a.prompt] == ["user"] and a.chosen[0].content == "2"
    assert [m.role for m in b.prompt] == ["system", "system", "user"] and b.prompt[1].name == "plugin"
    assert [m.role for m in b.chosen] == ["assistant", "environment", "assistant"]
    for bad, match in [({**rec, "chosen": "3"}, "are the same"), ({"domain": "x", "prompt": "p"}, "missing"),
                       ({**rec, "rejected": [{"role": "user", "content": "x"}]}, "must end with an assistant"),
                       ({**rec, "prompt": [{"role": "robot", "content": "x"}]}, "unknown role")]:
        path.write_text(json.dumps(rec) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=f"{path}:2: .*{match}"):
            read_preferences(str(path))


def test_pairs_pack_together_by_token_budget_and_resume():
    tok = ByteTokenizer()
    rid = reward_token_id(tok)
    prefs = SyntheticPreferences(seed=0)

    def source(i):
        return pair_item(prefs[i], tok, rid, DEFAULT_CONDITIONS, SyntheticPreferences.domains)

    def make():
        return ItemBatches(source, micro_batch_tokens=1024, max_seq_len=200, accumulation=2, max_seqs_per_item=2)

    stream = make()
    first = [stream.next_step() for _ in range(3)]
    state = stream.state_dict()
    after = [stream.next_step() for _ in range(2)]
    i = 0
    for step in first:
        assert len(step) == 2
        for b in step:
            n = len(b.groups)
            assert b.cu_seqlens.numel() == 2 * n + 1 and int(b.cu_seqlens[-1]) <= 1024
            for k in range(n):   # chosen at 2k, rejected at 2k + 1, both of pair i
                want = source(i)
                for j in (0, 1):
                    lo, hi = int(b.cu_seqlens[2 * k + j]), int(b.cu_seqlens[2 * k + j + 1])
                    assert b.input_ids[lo:hi].tolist() == want.sequences[j][0]
                assert b.groups[k] == want.group
                i += 1
            nxt = source(i).num_tokens   # the budget was full: the next pair did not fit
            assert int(b.cu_seqlens[-1]) + nxt > 1024
    resumed = make()
    resumed.load_state_dict(state)
    again = [resumed.next_step() for _ in range(2)]
    for s1, s2 in zip(after, again):
        for b1, b2 in zip(s1, s2):
            assert torch.equal(b1.input_ids, b2.input_ids) and torch.equal(b1.cu_seqlens, b2.cu_seqlens)
    with pytest.raises(ValueError, match="cut the end of a pair"):
        ItemBatches(source, 1024, 200, overlong="truncate", max_seqs_per_item=2)
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        ItemBatches(source, 100, 60, max_seqs_per_item=2)
    with pytest.raises(ValueError, match=r"max_seq_len \(60; stages.0.seq_len in a stage config\) is too small"):   # every synthetic pair is longer
        ItemBatches(source, 1024, 60, max_seqs_per_item=2).next_step()


def _fit_reward_model(conditions, steps=30, seed=0):
    """A micro score model trained on the domain-flipped synthetic pairs; held-out accuracy per domain."""
    import dataclasses

    from models import InternLM2Config, InternLM2ForScore
    from train.eval.reward import pair_accuracy, pair_scores
    from train.stages.reward import pair_loss_fn

    tok = ByteTokenizer()
    rid = reward_token_id(tok)
    domains = SyntheticPreferences.domains
    train = SyntheticPreferences(seed=seed)
    held = SyntheticPreferences(seed=seed, split="heldout")
    torch.manual_seed(seed)
    cfg = dataclasses.replace(InternLM2Config.preset("micro"), vocab_size=tok.vocab_size, max_position_embeddings=256)
    model = InternLM2ForScore(cfg)
    batches = ItemBatches(lambda i: pair_item(train[i], tok, rid, conditions, domains), micro_batch_tokens=1024,
                          max_seq_len=256, max_seqs_per_item=2)
    loss_fn = pair_loss_fn()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        (batch,) = batches.next_step()
        loss, n, _ = loss_fn(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    items = [pair_item(held[i], tok, rid, conditions, domains) for i in range(64)]
    return pair_accuracy(pair_scores(model, items, torch.device("cpu")), domains)


def test_conditional_reward_model_fits_flipped_preferences_only_with_conditions():
    short = {"concise": "concise", "helpful": "helpful"}      # short condition prompts keep the test fast
    with_conditions = _fit_reward_model(short)
    without = _fit_reward_model({})
    # Held-out pairs come in flipped twins (same responses, opposite labels): a model that cannot see the domain
    # gets at most one of each twin right.
    assert without["pair_acc"] <= 0.5
    assert with_conditions["pair_acc"] >= 0.9, with_conditions
    assert min(with_conditions["pair_acc_concise"], with_conditions["pair_acc_helpful"]) >= 0.8


# ---- the stage on the Trainer ----------------------------------------------------------------------------------
def _rm_args(tmp_path, name, init_from, *extra):
    return ["--config", "configs/reward_tiny.toml", f"--run.name={name}", f"--run.output_dir={tmp_path}",
            "--model.preset=micro", "--model.overrides={max_position_embeddings = 1024}",
            f"--reward.init_from={init_from}", "--reward.heldout=8", "--stages.0.steps=4", "--stages.0.seq_len=256",
            "--stages.0.micro_batch_tokens=512", "--stages.0.global_batch_tokens=1024", "--optim.warmup_steps=1",
            "--reward.task_pairs_policy_prompts=0", "--metrics.progress=false", *extra]   # made-up near misses, no sampling


def _rm_cfg(tmp_path, name, init_from, *extra):
    from train.stages.align_config import parse_reward_cli

    return parse_reward_cli(_rm_args(tmp_path, name, init_from, *extra))


def test_reward_stage_from_sft_checkpoint_resumes_exactly(tmp_path):
    import dataclasses
    import os

    from models import InternLM2Config, InternLM2ForCausalLM
    from train.metrics import read_jsonl
    from train.stages.reward import run_reward

    sft = tmp_path / "sft_model"
    torch.manual_seed(3)
    lm = InternLM2ForCausalLM(dataclasses.replace(InternLM2Config.preset("micro"), vocab_size=272,
                                                  max_position_embeddings=1024))
    lm.save_pretrained(sft, layout="llama")

    def records(path):   # everything but wall-clock times
        return [{k: v for k, v in r.items() if k not in ("window_time_s", "tokens_per_s")} for r in read_jsonl(path)]

    full = run_reward(_rm_cfg(tmp_path, "full", str(sft), "--checkpoint.every=2"))
    assert full.finished and full.init_from == str(sft)
    # the trunk is the SFT model's, the head is fresh (drawn from run.seed: the same in every build)
    trunk = {k: v for k, v in lm.state_dict().items() if k != "output.weight"}
    assert set(trunk) | {"score_head.weight"} == set(full.model.state_dict())
    from train.parallel import Runtime
    from train.stages.reward import build_score_model
    rebuilt = build_score_model(_rm_cfg(tmp_path, "x", str(sft)), Runtime(torch.device("cpu"), torch.float32), 272,
                                str(sft))
    again = build_score_model(_rm_cfg(tmp_path, "x", str(sft)), Runtime(torch.device("cpu"), torch.float32), 272,
                              str(sft))
    for k, v in trunk.items():
        assert torch.equal(rebuilt.state_dict()[k], v)
    assert torch.equal(rebuilt.score_head.weight, again.score_head.weight)

    evals = [r for r in read_jsonl(full.metrics_path) if r["kind"] == "eval"]
    assert [e["stage"] for e in evals] == ["init", "reward"]
    assert {"pair_acc", "pair_acc_concise", "pair_acc_helpful"} <= set(evals[-1])
    assert full.histogram.endswith("reward_scores.png") and full.eval["pair_acc"] == evals[-1]["pair_acc"]
    from train.eval.reward import plot_reward_training
    assert os.path.isfile(plot_reward_training(read_jsonl(full.metrics_path), str(tmp_path / "plots"))["loss"])
    cut = run_reward(_rm_cfg(tmp_path, "cut", str(sft), "--checkpoint.every=2", "--run.stop_at_step=2"))
    assert not cut.finished
    resumed = run_reward(_rm_cfg(tmp_path, "cut", str(sft), "--checkpoint.every=2", "--resume"))
    assert records(resumed.metrics_path) == records(full.metrics_path)
    from train.pipeline.align import reward_section
    summary = {"reward": {"pair_accuracy": {"concise": 0.95, "helpful": 0.5}, "unconditional_pair_accuracy": 0.5,
                          "correct_over_wrong": 0.9}}
    report = "\n".join(reward_section(resumed, {}, {"concise": "c", "helpful": "h"}, resumed, summary))
    assert "| concise | c |" in report and "| helpful | chosen |" in report and "| correct>wrong | c |" in report
    assert report.count("**not met**") == 1                             # helpful 50% < 90%; the other bars met
    # the export is the score model in InternLM2's layout
    from models import InternLM2ForScore
    exported = InternLM2ForScore.from_pretrained(tmp_path / "full" / "checkpoints" / "step_00000004" / "model")
    for k, v in full.model.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v)


def test_policy_task_pairs_reject_the_policys_own_wrong_samples(tmp_path):
    import dataclasses

    from models import InternLM2Config, InternLM2ForCausalLM
    from train.rlhf.policy_pairs import PolicySamplingConfig, PolicyTaskPreferences
    from train.rlhf.rollouts import SyntheticPrompts

    torch.manual_seed(5)
    policy = InternLM2ForCausalLM(dataclasses.replace(InternLM2Config.preset("micro"), vocab_size=272,
                                                      max_position_embeddings=512)).eval()
    tok = ByteTokenizer()
    sampling = PolicySamplingConfig(prompts=6, samples=3, temperature=1.0, top_p=0.9, max_new_tokens=8)
    pool = PolicyTaskPreferences(policy, tok, 0, "train", ["echo", "system"], "concise", sampling, batch=4)
    again = PolicyTaskPreferences(policy, tok, 0, "train", ["echo", "system"], "concise", sampling, batch=7)
    assert pool.wrong == again.wrong            # one generator per (prompt, sample): batching changes nothing
    assert pool.wrong_share == 1.0              # an untrained model gets every sampled reply wrong
    base = TaskPreferences(0, "train", ["echo", "system"], "concise")
    checks = SyntheticPrompts(0, "pref-train", ["echo", "system"], "concise")
    for i in range(12):                         # item i is prompt i mod 6, chosen = the answer, rejected = a wrong sample
        pair, n = pool[i], i % 6
        assert pair.prompt == base[n].prompt and pair.chosen == base[n].chosen and pair.domain == "concise"
        assert pair.rejected[-1].content in pool.wrong[n]
        assert checks[n].check(pair.chosen[-1].content) and not checks[n].check(pair.rejected[-1].content)
        assert 1 <= len(pool.wrong[n]) <= 3 and len(set(pool.wrong[n])) == len(pool.wrong[n])
    pool.wrong[2] = []                          # a prompt the policy always answered right: a made-up near miss
    assert pool[2].rejected[-1].content == corrupt(__import__("random").Random("policy-pref:0:train:2"),
                                                   base[2].chosen[-1].content)
    with pytest.raises(ValueError, match="task_pairs_policy_prompts"):
        PolicyTaskPreferences(policy, tok, 0, "train", ["echo"], "concise", dataclasses.replace(sampling, prompts=0))
    # the reward stage: held-out and training correct>wrong pairs both come from the init model's samples
    sft = tmp_path / "sft"
    policy.save_pretrained(sft, layout="llama")
    from train.stages.reward import load_policy, preference_sets
    cfg = _rm_cfg(tmp_path, "p", str(sft), "--reward.task_pairs_share=0.5", "--reward.task_pairs_heldout=3",
                  "--reward.task_pairs_policy_prompts=5", "--reward.task_pairs_policy_samples=2",
                  "--reward.task_pairs_max_new_tokens=8")
    train, held, groups, _ = preference_sets(cfg, load_policy(str(sft), torch.device("cpu"), torch.float32), tok)
    assert groups.count(CORRECT_OVER_WRONG) == 3 and train.second.wrong_share == 1.0
    assert held[-1].rejected[-1].content in PolicyTaskPreferences(
        policy, tok, 0, "heldout", cfg.reward.task_pairs_tasks, "concise",
        PolicySamplingConfig(3, 2, 1.0, 0.9, 8)).wrong[2]


def test_reward_config_errors(tmp_path):
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="reward.task_pairs_policy_prompts > 0 samples the policy: it needs "
                                          "reward.init_from"):
        _rm_cfg(tmp_path, "x", "", "--reward.task_pairs_policy_prompts=8")
    with pytest.raises(ConfigError, match="task_pairs_policy_samples >= 1"):
        _rm_cfg(tmp_path, "x", "", "--reward.task_pairs_policy_samples=0")

    with pytest.raises(ConfigError, match="reward.loss must be one of focal, bradley_terry"):
        _rm_cfg(tmp_path, "x", "", "--reward.loss=hinge")
    with pytest.raises(ConfigError, match="micro_batch_tokens .* must hold 2 x seq_len"):
        _rm_cfg(tmp_path, "x", "", "--stages.0.micro_batch_tokens=256", "--stages.0.global_batch_tokens=256")
    with pytest.raises(ValueError, match="no condition prompt for domain 'helpful'"):
        from train.stages.reward import run_reward
        run_reward(_rm_cfg(tmp_path, "x", "", "--reward.conditions={concise = \"short\"}"))


def _pair_batch(seed=0):
    tok = ByteTokenizer()
    prefs = SyntheticPreferences(seed=seed)
    stream = ItemBatches(lambda i: pair_item(prefs[i], tok, reward_token_id(tok), DEFAULT_CONDITIONS,
                                             SyntheticPreferences.domains), 1024, 256, max_seqs_per_item=2)
    return stream.next_micro_batch()


def test_reward_step_reads_nothing_from_the_device(monkeypatch):
    """The pair loss and the score model's packed forward/backward read no tensor value on the host (on a GPU
    each read would be a sync); the model's value checks are off as they are for GPU tensors."""
    import dataclasses
    import os
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    import models.internlm2
    import models.packing
    from models import InternLM2Config, InternLM2ForScore
    from train.stages.reward import pair_loss_fn

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sites = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:   # .item(), int(t), bool(t), ...
                repo = [f for f in traceback.extract_stack() if f.filename.startswith(root)
                        and "/.venv/" not in f.filename and "/tests/" not in f.filename]
                site = os.path.relpath(repo[-1].filename, root) if repo else "?"
                if site.startswith(("train/", "models/")):   # reads inside internlm_kernels are the kernels' own
                    self.sites.append(f"{site}:{repo[-1].lineno}")
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(models.packing, "reads_values", lambda t: False)
    monkeypatch.setattr(models.internlm2, "reads_values", lambda t: False)
    model = InternLM2ForScore(dataclasses.replace(InternLM2Config.preset("micro"), vocab_size=272))
    batch = _pair_batch()
    loss_fn = pair_loss_fn()
    with HostReads() as reads:
        loss, n, metrics = loss_fn(model, batch)
        loss.backward()
    assert not reads.sites, reads.sites
    assert isinstance(n, int) and n == len(batch.groups) and set(metrics) == {"pair_acc", "margin", "score_abs"}


@pytest.mark.gpu
def test_reward_steps_never_sync_on_gpu(tmp_path):
    """Trainer steps of the reward stage (bf16 score model, fp32 master weights) under cuda sync debug mode
    'error': any device-to-host sync raises."""
    import dataclasses

    from models import InternLM2Config, InternLM2ForScore
    from train.config import CheckpointConfig, MetricsConfig, OptimConfig
    from train.parallel import Runtime
    from train.stages.reward import pair_loss_fn
    from train.trainer import Stage, Trainer

    tok = ByteTokenizer()
    prefs = SyntheticPreferences()
    torch.manual_seed(0)
    model = InternLM2ForScore(dataclasses.replace(InternLM2Config.preset("micro"), vocab_size=272))
    trainer = Trainer(model.to("cuda", torch.bfloat16), Runtime(torch.device("cuda"), torch.bfloat16),
                      optim=OptimConfig(warmup_steps=1), checkpoint=CheckpointConfig(),
                      metrics=MetricsConfig(progress=False, log_every=100), run_dir=str(tmp_path), total_steps=10)
    data = ItemBatches(lambda i: pair_item(prefs[i], tok, reward_token_id(tok), DEFAULT_CONDITIONS,
                                           SyntheticPreferences.domains), 1024, 256, max_seqs_per_item=2)
    stage = Stage("reward", 10, data, pair_loss_fn())
    for _ in range(2):
        trainer.step(stage)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.step(stage)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert trainer.state.global_step == 5


def test_reward_stage_reads_jsonl_pairs_with_a_heldout_split(tmp_path):
    from train.stages.reward import preference_sets

    path = tmp_path / "prefs.jsonl"
    recs = [{"domain": d, "prompt": f"q{i}", "chosen": "a", "rejected": "b"}
            for i, d in enumerate(["math", "code", "math", "code", "math"])]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    train, held, groups, domains = preference_sets(_rm_cfg(tmp_path, "j", "", f"--reward.pairs={path}",
                                                           "--reward.heldout=2"))
    assert domains == ("math", "code") and [p.prompt[0].content for p in held] == ["q0", "q1"]
    assert groups == ["math", "code"]
    assert [p.prompt[0].content for p in train] == ["q2", "q3", "q4"]
    with pytest.raises(ValueError, match="leaves no training pairs"):
        preference_sets(_rm_cfg(tmp_path, "j", "", f"--reward.pairs={path}", "--reward.heldout=5"))


def test_reward_stage_tensor_parallel_equals_one_process(tmp_path):
    """torchrun, 2 gloo ranks, tp = 2: the trunk tensor + sequence parallel, the score head replicated on the
    gathered hidden states, the padding document of an odd token count never scored. Losses, the per-step pair
    metrics, the held-out evaluations and the exported weights are those of one process."""
    import os

    from distributed_harness import run_torchrun

    from train.metrics import read_jsonl
    from train.stages.reward import run_reward

    def records(path, kind):
        return [{k: v for k, v in r.items() if k not in ("window_time_s", "tokens_per_s")}
                for r in read_jsonl(path) if r["kind"] == kind]

    extra = ("--stages.0.steps=3", "--run.threads=1", "--metrics.plots=false")
    one = run_reward(_rm_cfg(tmp_path, "one", "", *extra))
    args = _rm_args(tmp_path, "two", "", *extra, "--parallel.tp=2")
    run_torchrun("train.stages.reward", args)
    two = os.path.join(tmp_path, "two", "metrics.jsonl")
    for kind, n in (("train", 3), ("eval", 2)):
        got, want = records(two, kind), records(one.metrics_path, kind)
        assert len(got) == len(want) == n
        for g, w in zip(got, want):
            assert set(g) == set(w)
            for k, v in w.items():
                if isinstance(v, float) and not k.startswith("pair_acc"):
                    # The tp ranks sum each row-parallel matmul's K/2 halves in another order, and the GEMM's
                    # blocking follows the ISA (AVX-512 vs AVX2), so the fp32 results differ by rounding (~1e-7
                    # relative). Adam's early updates are close to lr * sign(g): a gradient entry as small as that
                    # rounding can flip sign and move by ~2 lr (lr 5e-4 here). After 3 steps the weights agree to
                    # ~1e-4 (the export check below), and the metrics computed from them to the same 1e-4 relative;
                    # scores are O(1), so a mean of them with cancellation (score_mean) gets the same bound absolutely.
                    v = pytest.approx(v, rel=1e-4, abs=1e-4)
                assert g[k] == v, (kind, k)
    # the export, gathered from the tp shards: the score model of one process, in InternLM2's layout
    from models import InternLM2ForScore
    from train.checkpoint import list_checkpoints
    exported = InternLM2ForScore.from_pretrained(os.path.join(list_checkpoints(os.path.join(tmp_path, "two"))[-1],
                                                              "model")).state_dict()
    assert set(exported) == set(one.model.state_dict())
    # Entries whose gradient sits at the rounding level can take Adam's ~lr * sign(g) step either way: at most
    # 2 lr per step apart (lr 5e-4, 3 steps). Those are rare; every other entry agrees to 1e-4.
    lr, steps = 5e-4, 3
    for k, v in one.model.state_dict().items():
        diff = (exported[k] - v).abs()
        assert float(diff.max()) <= 2 * lr * steps, k
        assert float((diff > 1e-4 + 1e-4 * v.abs()).float().mean()) <= 1e-3, k


def test_alignment_summary_and_the_unconditional_control_from_hand_made_results(tmp_path):
    """summary.json's sft and reward parts: before/after exact match and tool-call exactness from the SFT metrics,
    the conditional RM's per-domain accuracy and correct>wrong, and the control's accuracy on the flipped pairs only
    (its correct>wrong group left out)."""
    from train.pipeline.align import alignment_summary, flipped_accuracy
    from train.stages.reward import RewardResult
    from train.stages.sft import SFTResult

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"kind": "eval", "step": 0, "exact_match": 0.02, "tool_call_exact": 0.0},
        {"kind": "train", "step": 1, "loss": 1.0},
        {"kind": "eval", "step": 9, "exact_match": 0.75, "tool_call_exact": 0.8}]) + "\n")
    sft = SFTResult(str(tmp_path), None, None, None, True, str(metrics), "")
    names = SyntheticPreferences.domains + (CORRECT_OVER_WRONG,)
    rm = RewardResult("", None, None, None, True, "", "", names,
                      eval={"pair_acc_concise": 0.95, "pair_acc_helpful": 0.9, f"pair_acc_{CORRECT_OVER_WRONG}": 0.88})
    # control: flipped pairs (groups 0, 1) right 1 of 4; its correct>wrong pairs (group 2) all right: not counted
    control = RewardResult("", None, None, None, True, "", "", names, scores={
        "chosen": torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 5.0]), "rejected": torch.tensor([0.0, 1.0, 0.0, 2.0, 1.0, 1.0]),
        "group": torch.tensor([0, 0, 1, 1, 2, 2])})
    assert flipped_accuracy(control) == 0.25
    assert alignment_summary(sft, rm, control) == {
        "sft": {"exact_match_before": 0.02, "exact_match_after": 0.75, "tool_call_exact_after": 0.8},
        "reward": {"pair_accuracy": {"concise": 0.95, "helpful": 0.9}, "unconditional_pair_accuracy": 0.25,
                   "correct_over_wrong": 0.88}}
