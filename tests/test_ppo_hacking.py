"""The online loop's fast path (reward-hacking rules, targeted pairs) and slow path (labelled comparisons)."""
from __future__ import annotations

import json

import pytest

from train.rlhf.hacking import (
    HackingConfig,
    Sample,
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
    assert reward_up_accuracy_down(samples, [(0.0, 0.8)], cfg) is None
    assert reward_up_accuracy_down(samples, [(0.0, 0.8), (1.0, 0.75)], cfg) is None   # accuracy held
    assert reward_up_accuracy_down(samples, [(0.0, 0.8), (0.2, 0.5)], cfg) is None    # reward flat
    f = reward_up_accuracy_down(samples, [(0.0, 0.8), (0.4, 0.8), (1.0, 0.6)], cfg)
    assert f.sample_indices == [0, 3]          # incorrect and above the median reward 2.25


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
    assert all(p["source"] == "fast_path:length_explosion" and p["domain"] == "math" for p in pairs)
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
