"""Tokenizers: byte-level round trip incl. InternLM2 specials, id layout, SentencePiece loader on a model trained here."""
from __future__ import annotations

import io
import random

import pytest

from train.data.tokenizer import (
    BYTE_OFFSET,
    INTERNLM2_SPECIALS,
    INTERNLM2_VOCAB_SIZE,
    ByteTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)

CHAT = ("<|im_start|>system name=<|plugin|>\ntools<|im_end|>\n<|im_start|>user\nGrüße, 東京 🙂<|im_end|>\n"
        "<|im_start|>assistant\n<|action_start|><|plugin|>{\"a\": 1}<|action_end|><|im_end|>\n"
        "<|im_start|>environment name=<|interpreter|>\nok<|im_end|></s><s>")


@pytest.mark.parametrize("vocab", [272, INTERNLM2_VOCAB_SIZE])
def test_byte_round_trip_with_specials(vocab):
    tok = ByteTokenizer(vocab)
    ids = tok.encode(CHAT, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2
    assert all(0 <= i < vocab for i in ids)
    assert tok.decode(ids) == "<s>" + CHAT + "</s>"
    assert tok.decode(tok.encode(CHAT)) == CHAT
    # Each special is one token, never its bytes.
    for name in INTERNLM2_SPECIALS:
        assert tok.encode(name) == [tok.special_ids[name]]


def test_byte_special_ids_layout():
    full = ByteTokenizer(INTERNLM2_VOCAB_SIZE)
    assert {n: full.special_ids[n] for n in INTERNLM2_SPECIALS} == INTERNLM2_SPECIALS  # real InternLM2 ids
    small = ByteTokenizer(272)
    assert {n: small.special_ids[n] for n in INTERNLM2_SPECIALS} == {n: i - 92544 + 272 for n, i in INTERNLM2_SPECIALS.items()}
    assert small.special_ids["<|im_start|>"] == 271 and small.special_ids["<|plugin|>"] == 266
    assert small.encode("A") == [ord("A") + BYTE_OFFSET]


def test_byte_round_trip_random_text():
    rng = random.Random(1)
    tok = ByteTokenizer()
    alphabet = "ab \n\t<|>éß中😀" + "".join(INTERNLM2_SPECIALS)
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert tok.decode(tok.encode(text)) == text


def test_byte_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(100)
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="text"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="ids"):
        tok.decode([272])


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = ["the", "pass", "key", "is", "green", "blue", "sky", "grass", "remember", "number"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=300, model_type="bpe", byte_fallback=True,
        user_defined_symbols=list(INTERNLM2_SPECIALS), add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


def test_sentencepiece_round_trip_with_specials(sp_model):
    tok = load_tokenizer(str(sp_model.parent))  # a directory holding tokenizer.model
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 300)
    text = "<|im_start|>user\nthe pass key is 4821 ü<|im_end|>\n<|action_start|><|plugin|>sky<|action_end|>"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    for name in INTERNLM2_SPECIALS:
        assert ids.count(tok.special_ids[name]) == text.count(name)
    assert tok.decode(ids) == "<s>" + text + "</s>"
    assert len(tok.encode("the pass key")) < len("the pass key")  # real merges, not bytes


def test_sentencepiece_bad_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(str(bad))
