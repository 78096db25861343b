"""``make eval``'s runner (train/eval/suite.py): checkpoint discovery, the summary merge that keeps other keys, and
the side-by-side table. (The evaluation itself is covered by test_eval_lm_adapter.py and test_eval_needle.py.)"""
from __future__ import annotations

import json

import pytest

from train.eval.suite import find_checkpoints, merge_summary, report_table


def test_find_checkpoints_takes_the_newest(tmp_path):
    for d in ("tiny_cpu/checkpoints/step_00000100/model", "tiny_cpu/checkpoints/step_00000396/model",
              "ppo_tiny/rounds/round_01/actor", "ppo_tiny/rounds/round_03/actor"):
        (tmp_path / d).mkdir(parents=True)
    found = find_checkpoints(str(tmp_path))
    assert found == {"pretrain": str(tmp_path / "tiny_cpu/checkpoints/step_00000396/model"),
                     "ppo": str(tmp_path / "ppo_tiny/rounds/round_03/actor")}
    assert find_checkpoints(str(tmp_path), [f"mine={tmp_path}"])["mine"] == str(tmp_path)
    with pytest.raises(ValueError, match="--checkpoint"):
        find_checkpoints(str(tmp_path), ["nodir"])
    with pytest.raises(ValueError, match="make demo"):
        find_checkpoints(str(tmp_path / "empty"))


def test_merge_summary_keeps_other_keys(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"seed": 0, "pretrain": {"passkey_final": {"256": 1.0}}, "eval": {"old": 1}}))
    merge_summary(str(path), {"pretrain": {"tasks": {}}})
    d = json.loads(path.read_text())
    assert d == {"seed": 0, "pretrain": {"passkey_final": {"256": 1.0}}, "eval": {"pretrain": {"tasks": {}}}}
    merge_summary(str(tmp_path / "new" / "summary.json"), {"x": 1})
    assert json.loads((tmp_path / "new" / "summary.json").read_text()) == {"eval": {"x": 1}}


def test_report_table_side_by_side():
    res = {n: {"tasks": {"ik_choice": {"acc,none": a}, "ik_heldout": {"byte_perplexity,none": 3.5}},
               "needle": {"single_retrieval": {"en": a, "zh": 0.0}}} for n, a in (("pretrain", 0.25), ("sft", 0.5))}
    table = report_table(res)
    assert table.splitlines()[0] == "| | pretrain | sft |"
    assert "| multiple choice accuracy | 25.0% | 50.0% |" in table
    assert "| held-out byte perplexity | 3.500 | 3.500 |" in table
    assert "| chat exact match | – | – |" in table
    assert "| needle single_retrieval (zh), mean over the grid | 0.0% | 0.0% |" in table
