"""The transformers tokenizer export (train/data/tokenizer.py ``save_hf_tokenizer``): ``AutoTokenizer
.from_pretrained(dir)`` gives our ids for the byte-level and SentencePiece tokenizers (specials, Chinese, raw bytes,
whitespace), with and without <s>; decoding; the record that rebuilds ours from the export; the trainer's writer."""
from __future__ import annotations

import io
import json
import random

import pytest

from train.data.tokenizer import (
    INTERNLM2_SPECIALS,
    INTERNLM2_VOCAB_SIZE,
    ByteTokenizer,
    SentencePieceTokenizer,
    load_export_tokenizer,
    save_hf_tokenizer,
    write_checkpoint_tokenizer,
)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "<|im_start|>system name=<|plugin|>\ntools<|im_end|>\n<|im_start|>user\nGrüße, 東京 🙂<|im_end|>\n"
    "<|im_start|>assistant\n<|action_start|><|plugin|>{\"a\": 1}<|action_end|><|im_end|>\n",
    "中文的秘密代码是12345。  two  spaces\tand tab\n\n",
    "raw bytes \x00\x01\x7f and <s> and </s> inside, <|im_end|<|im_end|>>",
    " leading space",
    "",
]


def _check_same_ids(ours, hf, texts):
    for text in texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
        assert hf(text)["input_ids"] == ours.encode(text, add_bos=True), text


@pytest.mark.parametrize("vocab", [272, INTERNLM2_VOCAB_SIZE])
def test_byte_tokenizer_round_trip_through_autotokenizer(tmp_path, vocab):
    ours = ByteTokenizer(vocab)
    save_hf_tokenizer(ours, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    unused = [259, vocab - 7]                                   # ids encode never produces decode to nothing
    assert hf.decode([40] + unused + [41]) == ours.decode([40] + unused + [41]) == "%&"
    rng = random.Random(0)
    alphabet = "ab \n\t<|>éß中😀\x00" + "".join(INTERNLM2_SPECIALS)
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(30)]
    _check_same_ids(ours, hf, TEXTS + randoms)
    for text in TEXTS:
        ids = ours.encode(text)
        assert hf.decode(ids) == ours.decode(ids)
        plain = ours.decode([i for i in ids if i not in ours.special_ids.values()])
        assert hf.decode(ids, skip_special_tokens=True) == plain
    assert {n: hf.convert_tokens_to_ids(n) for n in INTERNLM2_SPECIALS} == {n: ours.special_ids[n]
                                                                             for n in INTERNLM2_SPECIALS}
    assert type(load_export_tokenizer(tmp_path, vocab)) is ByteTokenizer


def _sp_model(path, dummy_prefix: bool):
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = ["the", "pass", "key", "is", "green", "blue", "sky", "grass", "remember", "number", "中文", "东京"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=300, model_type="bpe", byte_fallback=True,
        user_defined_symbols=list(INTERNLM2_SPECIALS), add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path.write_bytes(out.getvalue())
    return SentencePieceTokenizer(path)


@pytest.mark.parametrize("dummy_prefix", [False, True])
def test_sentencepiece_round_trip_through_autotokenizer(tmp_path, dummy_prefix):
    pytest.importorskip("google.protobuf")
    ours = _sp_model(tmp_path / "sp.model", dummy_prefix)
    export = tmp_path / "export"
    written = save_hf_tokenizer(ours, export)
    assert "tokenizer.model" in written
    hf = transformers.AutoTokenizer.from_pretrained(export)
    _check_same_ids(ours, hf, TEXTS + ["the sky is green grass number 中文东京", "remember  the\n key"])
    if not dummy_prefix:   # with a dummy prefix SentencePiece's decode of each run drops its leading space
        for text in TEXTS:
            assert hf.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    rebuilt = load_export_tokenizer(export, 300)
    assert isinstance(rebuilt, SentencePieceTokenizer) and rebuilt.encode(TEXTS[1]) == ours.encode(TEXTS[1])


def test_checkpoint_writer_keeps_the_record_and_adds_the_export_files(tmp_path):
    (tmp_path / "model").mkdir()
    write_checkpoint_tokenizer(ByteTokenizer(), tmp_path)
    record = json.loads((tmp_path / "tokenizer.json").read_text())
    assert record["spec"] == "byte" and record["kind"] == "byte"              # the trainer's record, unchanged
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    assert hf("<|im_end|>a", add_special_tokens=False)["input_ids"] == ByteTokenizer().encode("<|im_end|>a")
    (tmp_path / "model" / "tokenizer_config.json").unlink()                   # an export without the record
    assert isinstance(load_export_tokenizer(tmp_path / "model", 272), ByteTokenizer)   # found beside it


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        load_export_tokenizer(tmp_path / "nowhere", 272)


def test_server_resolves_the_tokenizer_of_an_export_with_transformers_files(tmp_path):
    """models.server's loader on the trainer's layout now that model/ holds a transformers tokenizer.json (no
    ``spec`` key): it finds the record; a PPO actor export (no checkpoint record beside it) works too."""
    pytest.importorskip("starlette")
    from models.server import resolve_tokenizer

    (tmp_path / "model").mkdir()
    write_checkpoint_tokenizer(ByteTokenizer(), tmp_path)
    assert isinstance(resolve_tokenizer(str(tmp_path / "model"), None, 272), ByteTokenizer)
    actor = tmp_path / "actor"
    save_hf_tokenizer(ByteTokenizer(), actor)
    assert isinstance(resolve_tokenizer(str(actor), None, 272), ByteTokenizer)
    with pytest.raises(ValueError, match="--tokenizer"):
        resolve_tokenizer(str(tmp_path / "model" / "nothing" / "here"), None, 272)
