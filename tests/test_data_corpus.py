"""The synthetic corpus's curriculum tasks (train.data.corpus): induction rows and their loss masks, and the
passkey probe's held-out keys and filler (a probe hit must be retrieval from the context, never recall)."""
import random

import pytest

from train.data.corpus import (
    INDUCTION_ALPHABETS,
    INDUCTION_SPAN,
    PASSKEY_FILLER,
    TRAIN_FILLER,
    SyntheticCorpus,
    is_probe_key,
    passkey_parts,
)
from train.data.packing import Document, PackedStream
from train.data.tokenizer import load_tokenizer


def _key_and_filler(prompt: str, answer: str) -> tuple[str, list[str]]:
    key = answer.strip()
    body = prompt.split("\n")[1].replace(f" The pass key is {key}. Remember it. {key} is the pass key.", "")
    sentences = [s.strip() + "." for s in body.split(".") if s.strip()]
    return key, sentences


def test_probe_keys_and_filler_are_held_out_of_training():
    train = [passkey_parts(random.Random(f"t{i}"), random.randint(200, 1000)) for i in range(300)]
    probe = [passkey_parts(random.Random(f"p{i}"), 600, 0.5, probe=True) for i in range(300)]
    for (prompt, answer), is_probe in [(p, False) for p in train] + [(p, True) for p in probe]:
        key, sentences = _key_and_filler(prompt, answer)
        assert len(key) == 5 and key.isdigit() and is_probe_key(key) == is_probe
        assert sentences and set(sentences) <= set(PASSKEY_FILLER if is_probe else TRAIN_FILLER)
    assert not set(PASSKEY_FILLER) & set(TRAIN_FILLER)
    # about a fifth of all keys is held out, so the training keys still cover every digit pattern
    share = sum(is_probe_key(str(k)) for k in range(10000, 100000)) / 90000
    assert 0.18 < share < 0.22
    # the corpus's passkey documents draw training keys only
    corpus = SyntheticCorpus(seed=0, mix={"passkey": 1.0}, passkey_chars=(200, 400))
    for i in range(200):
        key = corpus[i].rsplit(" ", 1)[1].rstrip(".")
        assert not is_probe_key(key)


def test_induction_rows_take_loss_on_the_repeat_only():
    tok = load_tokenizer("byte")
    corpus = SyntheticCorpus(seed=3, mix={"induction": 1.0, "induction_digits": 1.0}, tokenizer=tok)
    seen = set()
    for i in range(200):
        doc = corpus[i]
        assert isinstance(doc, Document)
        n_context = doc.loss_mask.index(True)
        assert not any(doc.loss_mask[:n_context]) and all(doc.loss_mask[n_context:])
        context, target = tok.decode(doc.tokens[:n_context]), tok.decode(doc.tokens[n_context:])
        assert doc.tokens[0] == tok.bos_id and doc.tokens[-1] == tok.eos_id
        span = context.removeprefix("<s>")
        assert span.endswith(" ") and target.removesuffix("</s>") == span[:-1]
        assert INDUCTION_SPAN[0] <= len(span) - 1 <= INDUCTION_SPAN[1]
        kind = "induction_digits" if span[:-1].isdigit() else "induction"
        assert set(span[:-1]) <= set(INDUCTION_ALPHABETS[kind])
        seen.add(kind)
    assert seen == {"induction", "induction_digits"}
    # the same document without a tokenizer is its text, and the stream packs the masks into its rows
    text_corpus = SyntheticCorpus(seed=3, mix={"induction": 1.0, "induction_digits": 1.0})
    assert tok.encode(text_corpus[0], add_bos=True, add_eos=True) == corpus[0].tokens
    row = PackedStream(corpus, tok, 64).next_row()
    assert row.loss_mask is not None and 0 < sum(row.loss_mask) < len(row.loss_mask)


def test_induction_span_lengths_follow_the_stage():
    tok = load_tokenizer("byte")
    corpus = SyntheticCorpus(seed=5, mix={"induction": 1.0}, tokenizer=tok, induction_chars=(4, 6))
    lengths = {len(corpus[i].tokens) for i in range(300)}   # <s> + span + space + repeat + </s>
    assert lengths == {2 * n + 3 for n in (4, 5, 6)}
    text = SyntheticCorpus(seed=5, mix={"induction": 1.0}, induction_chars=(4, 6))
    assert {len(text[i]) for i in range(300)} == {2 * n + 1 for n in (4, 5, 6)}
    for bad in [(0, 4), (7, 6)]:
        with pytest.raises(ValueError, match="induction_chars"):
            SyntheticCorpus(mix={"induction": 1.0}, induction_chars=bad)


def test_curriculum_documents_are_random_access():
    tok = load_tokenizer("byte")
    mix = {"induction": 1.0, "induction_digits": 1.0, "passkey": 1.0, "facts": 1.0}
    a = SyntheticCorpus(seed=1, mix=mix, tokenizer=tok)
    docs = [a[i] for i in range(50)]
    b = SyntheticCorpus(seed=1, mix=mix, tokenizer=tok)
    assert [b[i] for i in reversed(range(50))] == docs[::-1]
