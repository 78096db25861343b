"""NeedleBench-style suite (train/eval/needle.py): prompt length and needle depth, English and Chinese filler, the
three kinds' answers and scoring, the passkey format as the smallest grid, and the command on a real export."""
from __future__ import annotations

import json
import random

import pytest
import torch

from models import InternLM2Config, InternLM2ForCausalLM
from train.data.corpus import PASSKEY_INTRO, PASSKEY_QUESTION, passkey_needle
from train.data.tokenizer import ByteTokenizer, save_hf_tokenizer
from train.eval.needle import EN, KINDS, ZH, NeedleSample, main, make_sample, passkey_grid, passkey_sample, score

TOK = ByteTokenizer()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("length", [400, 1111, 3000])
def test_length_within_one_percent(kind, lang, length):
    s = make_sample(TOK, kind, lang, length, 0.3, random.Random(f"{kind}{lang}{length}"))
    assert s.ids == TOK.encode(s.text, add_bos=True)
    assert abs(len(s.ids) - length) <= 0.01 * length
    assert len(s.ids) <= length


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_needle_at_stated_depth(lang, depth):
    """Depth in tokens of the filler: the needle starts within one filler sentence of depth x filler tokens."""
    s = make_sample(TOK, "single_retrieval", lang, 2000, depth, random.Random(7))
    start, end = s.filler_span
    lang_ = EN if lang == "en" else ZH
    at = s.needle_chars[0]
    key_at = s.text.index(s.answers[0], at)
    needle_len = len(TOK.encode(s.text[at:key_at + len(s.answers[0]) + 1]))
    filler_tokens = len(TOK.encode(s.text[start:end])) - needle_len
    before = len(TOK.encode(s.text[start:at]))
    sentence = max(len(TOK.encode(lang_.joiner + x)) for x in lang_.sentences)
    assert abs(before - depth * filler_tokens) <= sentence / 2 + 1, (before, depth * filler_tokens)


def test_fillers_are_english_and_chinese():
    en = make_sample(TOK, "single_retrieval", "en", 800, 0.5, random.Random(0))
    zh = make_sample(TOK, "single_retrieval", "zh", 800, 0.5, random.Random(0))
    cjk = lambda t: sum("\u4e00" <= ch <= "\u9fff" for ch in t)   # noqa: E731
    assert cjk(en.text) == 0 and en.text.isascii()
    filler = zh.text[zh.filler_span[0]:zh.filler_span[1]]
    assert cjk(filler) > 0.8 * len(filler.replace("。", ""))
    assert any(s in en.text for s in EN.sentences) and any(s in zh.text for s in ZH.sentences)


def test_kinds_needles_and_answers():
    rng = random.Random(3)
    multi = make_sample(TOK, "multi_retrieval", "en", 1500, 0.2, rng, needles=4)
    assert len(multi.answers) == 4 and multi.needle_chars == sorted(multi.needle_chars)
    for key, at in zip(multi.answers, multi.needle_chars):
        assert multi.text.index(key, at) < multi.text.index("\n", at)      # each needle states its own key
    chain = make_sample(TOK, "multi_reasoning", "zh", 1500, 0.0, rng, needles=3)
    assert chain.text.count(chain.expect) == 1 and chain.text.count("相同") == 2
    single = make_sample(TOK, "single_retrieval", "en", 600, 1.0, rng)
    assert single.text.count(single.expect) == 1
    # Keys are the only needle content the question does not give away.
    assert single.expect not in single.text[single.filler_span[1]:]


def test_score():
    s = NeedleSample([], "", ["11111", "22222", "33333"], [], (0, 0), "")
    assert score(s, " 11111, 22222, 33333", "multi_retrieval") == 1.0
    assert score(s, " 11111, 33333, 22222", "multi_retrieval") == pytest.approx(2 / 3)
    assert score(s, " 99999", "multi_retrieval") == 0.0
    single = NeedleSample([], "", ["12345"], [], (0, 0), "12345")
    assert score(single, " 12345.", "single_retrieval") == 1.0 and score(single, "1234", "single_retrieval") == 0.0


def test_passkey_format_is_the_corpus_format():
    s = passkey_sample(TOK, 256, 0.5, random.Random(5))
    key = s.answers[0]
    assert s.text.startswith(PASSKEY_INTRO) and s.text.endswith(PASSKEY_QUESTION)
    assert passkey_needle(key) in s.text and s.expect == f" {key}"
    assert abs(len(s.ids) - 256) <= 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        make_sample(TOK, "haystack", "en", 500, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="lang"):
        make_sample(TOK, "single_retrieval", "fr", 500, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="length"):
        make_sample(TOK, "multi_reasoning", "en", 50, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="depths"):
        make_sample(TOK, "single_retrieval", "en", 500, 1.5, random.Random(0))


@pytest.fixture(scope="module")
def micro_export(tmp_path_factory):
    torch.manual_seed(0)
    model = InternLM2ForCausalLM(InternLM2Config(vocab_size=272, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                 max_position_embeddings=512))
    path = tmp_path_factory.mktemp("needle") / "model"
    model.save_pretrained(path, layout="llama")
    save_hf_tokenizer(TOK, path)
    return model, str(path)


def test_passkey_grid_shape(micro_export):
    model, _ = micro_export
    res = passkey_grid(model, TOK, [200, 260], [0.0, 1.0], trials=2)
    assert res["lengths"] == [200, 260] and res["depths"] == [0.0, 1.0] and res["trials"] == 2
    assert len(res["accuracy"]) == 2 and all(len(r) == 2 and all(0 <= a <= 1 for a in r) for r in res["accuracy"])
    assert res["samples"] and all("generated" in x for x in res["samples"])


def test_command_writes_json_and_heatmap(micro_export, tmp_path):
    _, path = micro_export
    out = tmp_path / "needle"
    main(["--model", path, "--lengths", "400", "--depths", "0,1", "--trials", "1", "--needles", "2",
          "--passkey", "--device", "cpu", "--out", str(out)])
    data = json.loads((out / "needle.json").read_text())
    assert set(data["result"]) == set(KINDS) | {"passkey"}
    grid = data["result"]["multi_reasoning"]["zh"]
    assert grid["lengths"] == [400] and len(grid["accuracy"][0]) == 2 and 0 <= grid["mean"] <= 1
    assert (out / "needle.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="--kinds"):
        main(["--model", path, "--kinds", "nope", "--out", str(out)])
