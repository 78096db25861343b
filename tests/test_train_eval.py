"""Evaluation: passkey prompts, the probe's outputs (table, heatmap), generation chunking, held-out perplexity."""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from models import InternLM2Config, InternLM2ForCausalLM
from train.data.corpus import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_QUESTION, passkey_needle
from train.data.tokenizer import ByteTokenizer
from train.eval.pretrain import (
    _chunks,
    heldout_loss,
    heldout_rows,
    passkey_probe,
    passkey_prompt,
    passkey_table,
    write_passkey,
)


def _micro_model(vocab=272):
    torch.manual_seed(0)
    return InternLM2ForCausalLM(InternLM2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))


def test_passkey_prompt_lengths_and_needle():
    tok = ByteTokenizer()
    for length in (200, 300, 1024):
        for depth in (0.0, 0.5, 1.0):
            ids, answer = passkey_prompt(tok, random.Random(f"{length}:{depth}"), length, depth)
            assert ids[0] == tok.bos_id and abs(len(ids) - length) <= 0.06 * length + 8
            text = tok.decode(ids[1:])
            key = answer.strip()
            assert text.endswith("The pass key is") and text.count(key) == 2
            # Depth is the needle's place in the filler, exact up to one filler sentence.
            needle = passkey_needle(key)
            at = text.index(needle) - len(PASSKEY_INTRO)
            filler = len(text) - len(PASSKEY_INTRO) - len(needle) - len(PASSKEY_QUESTION)
            sentence = max(len(f) for f in PASSKEY_FILLER) + 1
            assert abs(at - depth * filler) <= sentence


def test_passkey_lengths_below_the_bare_prompt_are_refused():
    with pytest.raises(ValueError, match=r"eval.passkey_lengths: \[128\] are shorter than the passkey prompt"):
        passkey_probe(_micro_model(), ByteTokenizer(), [128, 256], [0.5], trials=1)


def test_generation_chunks_bound_prompt_tokens():
    prompts = [[0] * n for n in (5, 7, 3, 10, 1, 1, 12)]
    ranges = _chunks(prompts, 12)
    assert ranges == [(0, 2), (2, 3), (3, 6), (6, 7)]
    assert [i for a, b in ranges for i in range(a, b)] == list(range(len(prompts)))  # every prompt exactly once
    assert all(sum(len(p) for p in prompts[a:b]) <= 12 for a, b in ranges)
    assert _chunks([[0] * 50], 12) == [(0, 1)]  # a prompt longer than the budget runs alone


def test_passkey_probe_outputs(tmp_path):
    result = passkey_probe(_micro_model(), ByteTokenizer(), [180, 240], [0.0, 1.0], trials=2, batch_tokens=400)
    assert result["lengths"] == [180, 240] and len(result["accuracy"]) == 2
    assert all(len(row) == 2 and all(a in (0.0, 0.5, 1.0) for a in row) for row in result["accuracy"])
    assert result["samples"] and all(len(s["answer"]) == 5 for s in result["samples"])
    paths = write_passkey(result, str(tmp_path))
    assert all(os.path.getsize(p) > 0 for p in paths.values())
    table = passkey_table(result).splitlines()
    assert table[0].startswith("| length | depth 0% | depth 100% | mean |") and table[2].startswith("| 180 |")
    with open(paths["heatmap"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_heldout_perplexity_of_a_uniform_model_is_the_vocab_size():
    model = _micro_model()
    with torch.no_grad():
        model.output.weight.zero_()  # uniform next-token distribution over the 272 ids
    rows = heldout_rows(["first document", "a second, longer document " * 5, "x"], ByteTokenizer(), seq_len=40)
    r = heldout_loss(model, rows, torch.device("cpu"), batch_tokens=64)
    assert math.isclose(r["ppl"], 272.0, rel_tol=1e-4)
    # targets: every token but the first of each piece
    assert r["tokens"] == sum(len(row.tokens) - (len(row.doc_bounds) - 1) for row in rows)
