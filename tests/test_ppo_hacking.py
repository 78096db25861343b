"""The online loop's fast path (reward-hacking rules, targeted pairs) and slow path (labelled comparisons)."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest

from train.rlhf.hacking import (
    HackingConfig,
    Sample,
    answer_pairs,
    detect_hacking,
    label_comparisons,
    length_explosion,
    load_comparisons,
    ngram_repeat_rate,
    repetition,
    reward_up_accuracy_down,
    targeted_pairs,
    write_pairs,
)
from train.rlhf.release import released_round


def sample(pid, response, reward=0.0, correct=True, tokens=None):
    return Sample(pid, "math", [{"role": "user", "content": f"q{pid}"}], response,
                  tokens if tokens is not None else [ord(c) for c in response], reward, correct)


def test_ngram_repeat_rate_by_hand():
    assert ngram_repeat_rate([1, 2, 3, 4, 5], n=2) == 0.0
    # bigrams of 1 2 1 2 1 2: (1,2) (2,1) (1,2) (2,1) (1,2) -> 2 unique of 5
    assert ngram_repeat_rate([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(1 - 2 / 5)
    assert ngram_repeat_rate([7, 7], n=3) == 0.0


def test_length_explosion_flags_long_samples_only():
    cfg = HackingConfig(length_ratio=1.5)
    baseline = [sample(str(i), "x" * 10) for i in range(4)]
    ok = [sample(str(i), "x" * 12) for i in range(4)]
    assert length_explosion(ok, baseline, cfg) is None
    hacked = [sample("0", "x" * 40), sample("1", "x" * 8), sample("2", "x" * 30), sample("3", "x" * 9)]
    f = length_explosion(hacked, baseline, cfg)
    assert f.pattern == "length_explosion" and f.sample_indices == [0, 2]
    assert "21.8" in f.evidence and "10.0" in f.evidence


def test_repetition_rule():
    cfg = HackingConfig(ngram=2, repeat_margin=0.2)
    baseline = [sample("0", "", tokens=[1, 2, 3, 4, 5, 6])]
    looping = [sample("0", "a", tokens=[1, 2] * 6), sample("1", "b", tokens=[1, 2, 3, 4, 5, 6])]
    f = repetition(looping, baseline, cfg)
    assert f.sample_indices == [0]
    assert repetition(baseline, baseline, cfg) is None


def test_reward_up_accuracy_down():
    cfg = HackingConfig(min_reward_gain=0.5, min_accuracy_drop=0.1)
    samples = [sample("0", "a", reward=3.0, correct=False), sample("1", "b", reward=1.0, correct=False),
               sample("2", "c", reward=2.0, correct=True), sample("3", "d", reward=2.5, correct=False)]
    sft = (0.0, 0.8, 0.0)                      # (reward, accuracy, SFT's reward under the same RM)
    assert reward_up_accuracy_down(samples, [sft], cfg) is None
    assert reward_up_accuracy_down(samples, [sft, (1.0, 0.75, 0.0)], cfg) is None   # accuracy held
    assert reward_up_accuracy_down(samples, [sft, (0.2, 0.5, 0.0)], cfg) is None    # reward flat
    # A refreshed RM scores everything 2 higher: above the first evaluation's reward, not above SFT's replies under
    # the same RM, so no finding (the policy did not gain reward; the scale moved).
    assert reward_up_accuracy_down(samples, [sft, (2.2, 0.6, 2.0)], cfg) is None
    # ... and a gain under a refreshed RM that scores lower than the first one is one.
    f = reward_up_accuracy_down(samples, [sft, (0.4, 0.8, 0.0), (-1.0, 0.6, -1.6)], cfg)
    assert f.sample_indices == [0, 3]          # incorrect and above the median reward 2.25
    assert (f.value, f.baseline) == (-1.0, -1.6)


def test_targeted_pairs_reject_the_hack_and_choose_short_correct():
    cfg = HackingConfig(min_pairs=3, max_pairs=4)
    baseline = [sample("0", "42", correct=True), sample("0", "42 because", correct=True),
                sample("1", "7", correct=False)]
    samples = [sample("0", "42" + " yes" * 20), sample("1", "7" + " yes" * 20), sample("2", "x" * 50)]
    findings = detect_hacking(samples, baseline, [], HackingConfig(length_ratio=1.5))
    assert [f.pattern for f in findings] == ["length_explosion", "repetition"]    # " yes" * 20 repeats too
    findings = findings[:1]
    pairs = targeted_pairs(findings, samples, baseline, {"1": "8", "2": "ok"}, cfg)
    # Pass 0: best chosen per offender (prompt 0: the shortest correct "42"; prompt 1: the reference "8", the
    # incorrect baseline "7" never chosen; prompt 2: its reference). 3 >= min_pairs, so no second pass.
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("42", samples[0].response), ("8", samples[1].response),
                                                             ("ok", samples[2].response)]
    assert all(p["source"] == "fast_path:length_explosion:correct" and p["domain"] == "math" for p in pairs)
    # Below min_pairs a second pass uses the next-best chosen response, without duplicates; max_pairs caps it.
    more = targeted_pairs(findings, samples, baseline, {"1": "8", "2": "ok"}, HackingConfig(min_pairs=10, max_pairs=10))
    assert [p["chosen"] for p in more] == ["42", "8", "ok", "42 because"]
    capped = targeted_pairs(findings, samples, baseline, {}, HackingConfig(min_pairs=1, max_pairs=1))
    assert len(capped) == 1


def test_label_comparisons_by_checker():
    groups = {"sft": [sample("0", "41", correct=False), sample("1", "9", correct=True)],
              "early_ppo": [sample("0", "42", correct=True), sample("1", "9 nine", correct=True)],
              "late_ppo": [sample("0", "42 42 42", correct=True), sample("1", "10", correct=False)]}
    pairs = label_comparisons(groups)
    got = {(p["chosen"], p["rejected"], p["source"]) for p in pairs}
    assert got == {("42", "41", "slow_path:sft_vs_early_ppo"), ("42 42 42", "41", "slow_path:sft_vs_late_ppo"),
                   ("42", "42 42 42", "slow_path:early_ppo_vs_late_ppo"), ("9", "9 nine", "slow_path:sft_vs_early_ppo"),
                   ("9", "10", "slow_path:sft_vs_late_ppo"), ("9 nine", "10", "slow_path:early_ppo_vs_late_ppo")}


def test_answer_pairs_reject_each_distinct_wrong_rollout_against_the_reference():
    rollouts = [sample("0", "41", correct=False), sample("0", "41", correct=False), sample("0", "42", correct=True),
                sample("1", "x", correct=None), sample("2", "10", correct=False), sample("3", "7", correct=False)]
    pairs = answer_pairs(rollouts, {"0": "42", "1": "y", "2": "9"}, "late_rollouts")
    assert [(p["prompt"][0]["content"], p["chosen"], p["rejected"]) for p in pairs] == [("q0", "42", "41"),
                                                                                        ("q2", "9", "10")]
    assert {p["source"] for p in pairs} == {"slow_path:answer_vs_late_rollouts"} and pairs[0]["domain"] == "math"


def test_comparisons_roundtrip_and_bad_lines(tmp_path):
    pairs = label_comparisons({"a": [sample("0", "1", correct=True)], "b": [sample("0", "2", correct=False)]})
    path = tmp_path / "c.jsonl"
    write_pairs(pairs, str(path))
    assert load_comparisons(str(path)) == pairs
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"domain": "math", "prompt": [], "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing rejected"):
        load_comparisons(str(bad))
    bad.write_text("\n" + json.dumps({"domain": "m", "prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: prompt must be a list"):
        load_comparisons(str(bad))
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not JSON"):
        load_comparisons(str(bad))


def test_contrast_pairs_isolate_the_pattern():
    """An incorrect hacked reply is also paired with an earlier reply to the same prompt that is just as incorrect but
    does not show the pattern (InternLM2's early- vs late-stage PPO comparison); a reply that shows the pattern
    itself is never chosen."""
    cfg = HackingConfig(length_ratio=1.5, min_pairs=1)
    baseline = [sample("0", "41", correct=False), sample("1", "x" * 4, correct=False)]
    early = [sample("0", "40", correct=False), sample("0", "41 41 41 41", correct=False)]
    hacked = [sample("0", "41 is what i think", correct=False), sample("1", "x" * 4, correct=False)]
    findings = detect_hacking(hacked, baseline, [], cfg)
    assert [f.pattern for f in findings] == ["length_explosion"] and findings[0].sample_indices == [0]
    f = findings[0]
    assert (f.value, f.baseline, f.bound) == (11.0, 3.0, 4.5)
    assert f.shows(hacked[0], cfg.ngram) and not f.shows(baseline[0], cfg.ngram)
    pairs = targeted_pairs(findings, hacked, baseline + early, {"0": "42"}, cfg)
    assert [(p["chosen"], p["rejected"], p["source"]) for p in pairs] == [
        ("42", hacked[0].response, "fast_path:length_explosion:correct"),
        ("41", hacked[0].response, "fast_path:length_explosion:contrast")]
    # below min_pairs, the next contrast reply ("40"); "41 41 41 41" is long itself, so never chosen
    more = targeted_pairs(findings, hacked, baseline + early, {"0": "42"}, dataclasses.replace(cfg, min_pairs=9))
    assert [p["chosen"] for p in more] == ["42", "41", "40"]
    # the reward rule has no per-reply measure: no contrast side
    assert not reward_up_accuracy_down(hacked, [(0.0, 0.5, 0.0), (1.0, 0.0, 0.0)], HackingConfig()).shows(hacked[0], 3)


def test_shipped_rules_fire_on_a_hacked_round_and_not_on_a_clean_one():
    """configs/ppo_tiny.toml's thresholds on replies to the demo's real prompts: a round whose replies are like the
    SFT model's (right or near-miss answers) is not flagged; a round whose replies carry the demo RM's hack (answers
    padded with random words) is flagged by the length rule alone, and every offender becomes a rejected reply."""
    from train.data.tokenizer import load_tokenizer
    from train.rlhf.probe_pairs import padded, wrong
    from train.rlhf.rollouts import SyntheticPrompts
    from train.stages.ppo import DEFAULT_CONFIG
    from train.stages.ppo_config import load_ppo_config

    cfg = load_ppo_config(DEFAULT_CONFIG, check_paths=False)
    tok = load_tokenizer("byte", cfg.models.byte_vocab_size)
    prompts = SyntheticPrompts(0, "ppo_compare", cfg.rollout.tasks, cfg.rollout.domain).take(0, 24)
    rng = random.Random(0)

    def replies(texts):
        return [Sample(p.prompt_id, p.domain, p.message_dicts(), t, tok.encode(t), 0.0, p.check(t))
                for p, t in zip(prompts, texts)]

    def sft_like():
        return replies([p.answer if rng.random() < 0.3 else wrong(rng, p.answer) for p in prompts])

    sft = sft_like()
    history = [(0.0, 0.3, 0.0), (0.1, 0.3, 0.0)]
    assert detect_hacking(sft_like(), sft, history, cfg.hacking) == []
    hacked = replies([padded(rng, p.answer if i % 2 else wrong(rng, p.answer)) for i, p in enumerate(prompts)])
    findings = detect_hacking(hacked, sft, history, cfg.hacking)
    assert [f.pattern for f in findings] == ["length_explosion"]
    assert findings[0].value > cfg.hacking.length_ratio * findings[0].baseline
    pairs = targeted_pairs(findings, hacked, sft, {p.prompt_id: p.answer for p in prompts}, cfg.hacking)
    assert cfg.hacking.min_pairs <= len(pairs) <= cfg.hacking.max_pairs
    assert {p["rejected"] for p in pairs} == {hacked[i].response for i in findings[0].sample_indices}
    # every pair prefers a shorter reply to the same prompt (a correct echo of three words can itself be longer than
    # the round's bound, which is 1.5x the mean over all prompts, so the bound is not the test)
    assert all(len(tok.encode(p["chosen"])) < len(tok.encode(p["rejected"])) for p in pairs)


def test_ppo_summary_from_a_hand_made_state():
    """summary.json's ppo part: SFT's and the released round's greedy accuracy and length, the last round's accuracy,
    the flagged rounds."""
    from train.eval.ppo_report import effect_lines, ppo_summary
    from train.stages.ppo import OnlineState

    def ev(name, acc, length, val=None):
        return {"name": name, "accuracy": acc, "length": length} | ({} if val is None else {"validation_accuracy": val})

    finding = {"pattern": "length_explosion", "evidence": "", "sample_indices": [0]}
    st = OnlineState(evals=[ev("sft", 0.4, 4.0), ev("round 1", 0.3, 9.0), ev("round 2", 0.625, 4.4),
                            ev("round 3", 0.55, 4.8)],
                     episodes=[{"round": 1, "findings": [finding]}, {"round": 2, "findings": []},
                               {"round": 3, "findings": []}])
    s = ppo_summary(st)                  # no validation prompts: the last round is the released one
    assert s == {"accuracy": {"sft": 0.4, "final": 0.55, "last_round": 0.55}, "length": {"sft": 4.0, "final": 4.8},
                 "released_round": 3, "flagged_rounds": [1], "final_flagged": False}
    text = " ".join(effect_lines(s))
    assert "+15.0%" in text and "1.20x" in text and "**not met**" not in text
    assert "checker" not in text and "1.5 x the task checker's verdict" in " ".join(effect_lines(s, 1.5))
    # with validation accuracy per round: round 2 (0.8) is released over round 3 (0.7) and flagged round 1 (0.9)
    st.evals = [ev(e["name"], e["accuracy"], e["length"], v) for e, v in zip(st.evals, [0.5, 0.9, 0.8, 0.7])]
    s = ppo_summary(st)
    assert s["released_round"] == 2 and s["accuracy"] == {"sft": 0.4, "final": 0.625, "last_round": 0.55}
    assert s["length"]["final"] == 4.4 and "round 2 (+22.5%" in " ".join(effect_lines(s))
    st.episodes[2]["findings"] = [finding]
    s = ppo_summary(st)
    assert s["flagged_rounds"] == [1, 3] and s["final_flagged"] is True
    assert " ".join(effect_lines(s)).count("**not met**") == 1          # only the final-round bar fails


def test_released_round_is_the_best_unflagged_on_validation():
    def ev(val):
        return {"accuracy": 0.0} if val is None else {"accuracy": 0.0, "validation_accuracy": val}
    eps = [{"round": 1, "findings": [{"pattern": "reward_up_accuracy_down"}]}, {"round": 2, "findings": []},
           {"round": 3, "findings": []}, {"round": 4, "findings": []}]
    # round 1 has the best validation accuracy but was flagged; rounds 2 and 4 tie: the earlier is released
    evals = [ev(0.9), ev(0.95), ev(0.7), ev(0.6), ev(0.7)]
    assert released_round(evals, eps) == 2
    assert released_round(evals[:2], eps[:1]) == 0                    # every round flagged: SFT
    assert released_round([ev(None)] * 5, eps) == 4                   # no validation prompts: the last round
    assert released_round([ev(0.5)], []) == 0                        # no round yet
    # against a direct search over every round
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 6)
        evals = [ev(rng.choice([0.25, 0.5, 0.75]))] + [ev(rng.choice([0.25, 0.5, 0.75])) for _ in range(n)]
        eps = [{"round": r, "findings": ["x"] if rng.random() < 0.3 else []} for r in range(1, n + 1)]
        best, best_val = 0, -1.0
        for r in range(1, n + 1):
            if not eps[r - 1]["findings"] and evals[r]["validation_accuracy"] > best_val:
                best, best_val = r, evals[r]["validation_accuracy"]
        assert released_round(evals, eps) == best
