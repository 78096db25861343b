"""Packing, readers, synthetic corpus and the resumable, sharded iterator."""
from __future__ import annotations

import json

import pytest
import torch

from train.data.corpus import TASKS, SyntheticCorpus, passkey_parts
from train.data.packing import Document, FileCorpus, PackedStream, ShardedBatches, collate, expand_paths, pack_documents
from train.data.tokenizer import ByteTokenizer


class ListSource:
    """Documents given as a list (random access by index), cycled like a real corpus."""

    def __init__(self, docs):
        self.docs = docs

    def iter_from(self, start):
        i = start
        while True:
            yield self.docs[i % len(self.docs)]
            i += 1


def _docs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 90, (n,), generator=g).tolist()
    return ["".join(chr(97 + (i + j) % 26) for j in range(k)) for i, k in enumerate(lens)]


def test_packing_loses_and_duplicates_nothing_and_bounds_are_exact():
    tok = ByteTokenizer()
    docs = _docs(60)
    encoded = [tok.encode(d, add_bos=True, add_eos=True) for d in docs]
    total = sum(map(len, encoded))
    seq_len = 37  # odd, shorter than many documents: forces cuts and remainders
    stream = PackedStream(ListSource(docs), tok, seq_len)
    rows = [stream.next_row() for _ in range(total // seq_len)]
    flat = [t for r in rows for t in r.tokens]
    stream_all = [t for d in encoded for t in d]
    assert all(len(r.tokens) == seq_len for r in rows)
    assert flat == stream_all[:len(flat)]  # order kept, nothing lost or duplicated
    # The remainder of the last cut document is exactly what comes next.
    assert stream.pending == stream_all[len(flat):len(flat) + len(stream.pending)]
    # Boundaries are the document boundaries (plus row ends): each piece is a contiguous slice of one document.
    doc_ends = set()
    pos = 0
    for d in encoded:
        pos += len(d)
        doc_ends.add(pos)
    for r_i, r in enumerate(rows):
        base = r_i * seq_len
        assert r.doc_bounds[0] == 0 and r.doc_bounds[-1] == seq_len
        for b in r.doc_bounds[1:-1]:
            assert base + b in doc_ends  # an inner boundary is always a document end
        inner_ends = [e - base for e in doc_ends if base < e < base + seq_len]
        assert sorted(inner_ends) == r.doc_bounds[1:-1]  # and every document end inside the row is a boundary


def test_remainders_start_the_next_row():
    tok = ByteTokenizer()
    long_doc = "x" * 100  # 102 tokens with bos/eos
    stream = PackedStream(ListSource([long_doc, "yy"]), tok, 40)
    rows = [stream.next_row() for _ in range(3)]
    assert rows[0].doc_bounds == [0, 40] and rows[1].doc_bounds == [0, 40]
    assert rows[2].doc_bounds == [0, 22, 26, 40]  # 22 left of the long doc, then "<s>yy</s>", then next long doc
    assert rows[1].tokens == tok.encode(long_doc, add_bos=True, add_eos=True)[40:80]


def test_collate_cu_seqlens_and_targets():
    tok = ByteTokenizer()
    stream = PackedStream(ListSource(_docs(20, seed=3)), tok, 50)
    rows = [stream.next_row() for _ in range(3)]
    b = collate(rows)
    assert b.input_ids.shape == (150,) and b.cu_seqlens.dtype == torch.int32
    expected = [0]
    for i, r in enumerate(rows):
        expected += [i * 50 + x for x in r.doc_bounds[1:]]
    assert b.cu_seqlens.tolist() == expected
    assert torch.equal(b.labels, b.input_ids)
    assert b.num_targets == 150 - (len(expected) - 1)
    assert b.max_seqlen == int((b.cu_seqlens[1:] - b.cu_seqlens[:-1]).max())
    flat = collate(rows, document_boundaries=False)
    assert flat.cu_seqlens.tolist() == [0, 50, 100, 150] and flat.num_targets == 147


def test_loss_masks_survive_cuts_and_become_labels():
    """Per-token masks (SFT: train on assistant turns only) follow their tokens across row cuts and resumes;
    collate turns them into -100 labels and counts only the kept targets."""
    docs = [Document(list(range(1, 12)), [False] * 6 + [True] * 5), Document([50, 51, 52]),
            Document([60, 61, 62, 63], [True, False, True, False])]
    stream = PackedStream(ListSource(docs), ByteTokenizer(), 8)
    rows = [stream.next_row() for _ in range(2)]
    state = stream.state_dict()
    assert rows[0].loss_mask == [False] * 6 + [True] * 2
    assert rows[1].loss_mask == [True] * 3 + [True] * 3 + [True, False]   # remainder of doc 0, doc 1, doc 2
    assert stream.pending == [62, 63] and stream.pending_mask == [True, False]
    b = collate(rows)
    assert b.labels.tolist() == [-100] * 6 + [7, 8, 9, 10, 11, 50, 51, 52, 60, -100]
    # targets: masked-in labels that are not the first token of a sequence ([0,8], [8,11], [11,14], [14,16])
    assert b.num_targets == 2 + 2 + 2 + 0 and b.max_seqlen == 8
    again = PackedStream(ListSource(docs), ByteTokenizer(), 8)
    again.load_state_dict(state)
    assert again.next_row() == stream.next_row()
    with pytest.raises(ValueError, match="loss_mask"):
        Document([1, 2], [True])


def test_fit_packing_never_cuts_a_document_that_fits_a_row():
    """"fit": every document no longer than a row lies whole in one row (first-fit over the read-ahead), longer
    ones are cut in order, the rest of a row is one padding segment without loss, nothing is lost or repeated,
    and a restored stream continues with the same rows."""
    tok = ByteTokenizer()
    seq_len = 45   # shorter than some documents (up to 91 tokens with <s> and </s>)
    texts = [f"{i}:{d}" for i, d in enumerate(_docs(200, seed=4))]    # all distinct
    docs = [Document(tok.encode(d, add_bos=True, add_eos=True), [i % 2 == 0] * (len(d) + 2))
            for i, d in enumerate(texts)]
    stream = PackedStream(ListSource(docs), tok, seq_len, packing="fit")
    rows = [stream.next_row() for _ in range(150)]
    state = stream.state_dict()
    expected = [stream.next_row() for _ in range(10)]
    placed, pieces, padding = [], [], 0
    for r in rows:
        assert len(r.tokens) == seq_len and r.doc_bounds[0] == 0 and r.doc_bounds[-1] == seq_len
        for a, b in zip(r.doc_bounds[:-1], r.doc_bounds[1:]):
            seg, mask = r.tokens[a:b], (r.loss_mask or [True] * seq_len)[a:b]
            if seg[0] == tok.bos_id:
                placed.append((seg, mask))
            elif a == 0:
                pieces.append(seg)        # the remainder of a cut document starts its row
            else:                         # padding: only ever the end of a row, no loss
                assert b == seq_len and seg == [tok.eos_id] * len(seg) and not any(mask)
                padding += len(seg)
    whole = [(d.tokens, d.loss_mask) for d in docs if len(d.tokens) <= seq_len]
    long_docs = [d.tokens for d in docs if len(d.tokens) > seq_len]
    # each document that fits is placed whole, once, with its mask; long ones are the only ones cut
    cut_heads = [t for t, m in placed if (t, m) not in whole]
    assert all(len(t) == seq_len and any(d[:seq_len] == t for d in long_docs) for t in cut_heads)
    assert len({tuple(t) for t, _ in placed}) == len(placed) and len(placed) - len(cut_heads) > 40
    assert pieces and padding < 0.1 * len(rows) * seq_len
    again = PackedStream(ListSource(docs), tok, seq_len, packing="fit")
    again.load_state_dict(state)
    assert [again.next_row() for _ in range(10)] == expected
    with pytest.raises(ValueError, match="packing"):
        PackedStream(ListSource(docs), tok, seq_len, packing="tight")
    with pytest.raises(ValueError, match="data.packing"):
        PackedStream(ListSource(docs), tok, seq_len).continue_after(state)


def test_pack_documents_finite():
    rows = pack_documents([[1] * 5, [2] * 9, [3] * 2], 6)
    assert [r.tokens for r in rows] == [[1] * 5 + [2], [2] * 6, [2, 2, 3, 3]]
    assert [r.doc_bounds for r in rows] == [[0, 5, 6], [0, 6], [0, 2, 4]]


def test_stream_resume_is_exact():
    tok = ByteTokenizer()
    source = SyntheticCorpus(seed=5, mix={"facts": 1, "passkey": 1}, passkey_chars=(100, 300))
    a = PackedStream(source, tok, 64)
    for _ in range(7):
        a.next_row()
    state = a.state_dict()
    expected = [a.next_row().tokens for _ in range(5)]
    b = PackedStream(SyntheticCorpus(seed=5, mix={"facts": 1, "passkey": 1}, passkey_chars=(100, 300)), tok, 64)
    b.load_state_dict(state)
    assert [b.next_row().tokens for _ in range(5)] == expected
    with pytest.raises(ValueError, match="seq_len"):
        PackedStream(source, tok, 32).load_state_dict(state)


def test_sharding_splits_the_global_batch():
    tok = ByteTokenizer()

    def run(rank, world):
        stream = PackedStream(ListSource(_docs(40, seed=1)), tok, 32)
        return ShardedBatches(stream, rows_per_step=4, rows_per_micro=1, rank=rank, world=world)

    single = run(0, 1)
    steps = [single.next_step() for _ in range(3)]
    assert single.accumulation_steps == 4
    shards = [run(r, 2) for r in range(2)]
    for step in steps:
        parts = [s.next_step() for s in shards]
        assert all(len(p) == 2 for p in parts)  # 4 rows / 2 ranks / 1 row per micro-batch
        merged = [parts[0][0], parts[1][0], parts[0][1], parts[1][1]]  # rank r holds rows r, r + world, ...
        assert [m.input_ids.tolist() for m in merged] == [b.input_ids.tolist() for b in step]
    assert shards[0].state_dict() == shards[1].state_dict() == single.state_dict()
    with pytest.raises(ValueError, match="does not split"):
        ShardedBatches(PackedStream(ListSource(["a"]), tok, 8), rows_per_step=3, rows_per_micro=1, world=2)


def test_synthetic_corpus_is_deterministic_and_covers_tasks():
    a = SyntheticCorpus(seed=0, mix={t: 1.0 for t in TASKS}, passkey_chars=(200, 400))
    b = SyntheticCorpus(seed=0, mix={t: 1.0 for t in TASKS}, passkey_chars=(200, 400))
    docs = [a[i] for i in range(200)]
    assert docs == [b[i] for i in range(200)]
    assert docs[:5] != [SyntheticCorpus(seed=1, mix={t: 1.0 for t in TASKS})[i] for i in range(5)]
    assert SyntheticCorpus(seed=0, split="heldout")[0] != SyntheticCorpus(seed=0)[0]
    text = "\n".join(docs)
    for marker in ("lives in", " = ", "reverse: ", "sort: ", "copy: ", "The pass key is"):
        assert marker in text
    # Verifiable answers: arithmetic lines are correct, reversals are reversed.
    for line in text.splitlines():
        if line.startswith("reverse: "):
            w, r = line[len("reverse: "):].split(" -> ")
            assert r == w[::-1]
        if " = " in line and line[0].isdigit():
            lhs, rhs = line.split(" = ")
            x, op, y = lhs.split()
            assert int(rhs) == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
    with pytest.raises(ValueError, match="unknown task"):
        SyntheticCorpus(mix={"poetry": 1.0})


def test_passkey_depth_and_length():
    import random

    for depth in (0.0, 0.5, 1.0):
        prompt, answer = passkey_parts(random.Random(0), 600, depth)
        key = answer.strip()
        assert prompt.endswith("The pass key is") and key.isdigit() and len(key) == 5
        assert 500 <= len(prompt) <= 620
        at = prompt.index(key) / len(prompt)
        assert abs(at - depth) < 0.15


def test_readers(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n" + json.dumps({"text": "fourth"}) + "\n")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["fifth", "sixth"], "n": [1, 2]}), tmp_path / "c.parquet")
    corpus = FileCorpus([str(tmp_path)])
    it = corpus.iter_from(0)
    assert [next(it) for _ in range(8)] == ["first doc", "second doc", "third", "fourth", "fifth", "sixth",
                                            "first doc", "second doc"]  # epochs repeat
    it = FileCorpus([str(tmp_path)], skip=2).iter_from(1)
    assert next(it) == "fourth"
    heldout = FileCorpus([str(tmp_path)], limit=2).iter_from(0)
    assert list(heldout) == ["first doc", "second doc"]
    assert next(FileCorpus([str(tmp_path / "a.txt")], txt_mode="file").iter_from(0)) == "first doc\n\nsecond doc\n"


def test_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        expand_paths([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="not a supported file type"):
        expand_paths([str(tmp_path / "x.csv")])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'text' field"):
        list(FileCorpus([str(tmp_path / "bad.jsonl")], limit=5).iter_from(0))
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
        next(FileCorpus([str(tmp_path / "broken.jsonl")]).iter_from(0))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no documents"):
        next(FileCorpus([str(tmp_path / "empty.txt")]).iter_from(0))
