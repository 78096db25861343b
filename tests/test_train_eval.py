"""Evaluation: passkey prompts, the probe's outputs (table, heatmap), held-out perplexity."""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from models import InternLM2Config, InternLM2ForCausalLM
from train.data.corpus import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_QUESTION, is_probe_key, passkey_needle
from train.data.tokenizer import ByteTokenizer
from train.eval.needle import PASSKEY, passkey_sample
from train.eval.pretrain import (
    heldout_loss,
    heldout_rows,
    passkey_probe,
    passkey_table,
    write_passkey,
)


def _micro_model(vocab=272):
    torch.manual_seed(0)
    return InternLM2ForCausalLM(InternLM2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))


def test_passkey_probe_prompts_hold_a_held_out_key_at_the_depth():
    """The probe is the needle suite's single-needle grid in the corpus's format, with a held-out key."""
    tok = ByteTokenizer()
    for length in (200, 300, 1024):
        for depth in (0.0, 0.5, 1.0):
            s = passkey_sample(tok, length, depth, random.Random(f"{length}:{depth}"), PASSKEY)
            assert s.ids[0] == tok.bos_id and len(s.ids) == length
            text = tok.decode(s.ids[1:])
            key = s.expect.strip()
            assert is_probe_key(key) and text.endswith("The pass key is") and text.count(key) == 2
            # Depth is the needle's place in the filler, exact up to one filler sentence.
            needle = passkey_needle(key)
            at = text.index(needle) - len(PASSKEY_INTRO)
            filler = len(text) - len(PASSKEY_INTRO) - len(needle) - len(PASSKEY_QUESTION)
            sentence = max(len(f) for f in PASSKEY_FILLER) + 1
            assert abs(at - depth * filler) <= sentence


def test_passkey_lengths_below_the_bare_prompt_are_refused():
    with pytest.raises(ValueError, match=r"eval.passkey_lengths: \[128\] are shorter than the passkey prompt"):
        passkey_probe(_micro_model(), ByteTokenizer(), [128, 256], [0.5], trials=1)


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
