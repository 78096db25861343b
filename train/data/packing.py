"""Documents in, packed fixed-size token rows out: readers, packing with cu_seqlens, a resumable sharded iterator.

Pipeline: a document source (``SyntheticCorpus`` or ``FileCorpus``; both random-access by document index through
``iter_from(i)``) -> tokenize each text document as ``<s> text </s>`` (a source may instead yield ``Document``s:
token ids with a per-token loss mask, e.g. SFT conversations that train only on assistant turns)
-> ``PackedStream`` cuts the token stream into
rows of exactly ``seq_len`` tokens, in one of two ways (``packing``):

- ``"cut"`` (the default): a document that does not fit in the space left in a row is cut at the row's end and its
  remainder starts the next row (InternLM2's "longer documents truncated, remainders reused"), so no token is ever
  dropped, duplicated or padded.
- ``"fit"``: a document no longer than a row is never cut. The row takes, in order, the first of the next
  ``FIT_LOOKAHEAD`` documents that fits in the space left (first-fit); when none fits, the rest of the row is one
  padding segment (``<eos>`` tokens, no loss). Longer documents are cut as with "cut". For tasks whose targets
  depend on the whole document (a pass key and its question, a span and its repeat) a cut leaves targets that
  cannot be predicted from what the row shows, and a model trained on them learns to guess instead of to look
  (with "cut", about d / seq_len of the documents of length d are cut). Padding costs a few percent of the tokens.

Each row records its document boundaries; ``cu_seqlens`` is built from them (per-document attention, the default)
or is one span per row (``document_boundaries=False``).

Resumption: the stream's state is (index of the next document to read, the pending remainder's tokens, the
documents read ahead by "fit", rows emitted). Restoring it regenerates exactly the same rows, since sources are
deterministic by index.

Data parallelism: every rank packs the same stream and keeps the rows ``rank, rank + world, ...`` of each
step's global batch (DistributedSampler-like over rows), ``rank`` / ``world`` being the data-parallel rank and
size (the tensor-parallel ranks of one data-parallel group keep the same rows). The global batch is then independent of the world
size, and all ranks hold the same stream state, so rank 0's state is the checkpoint's.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch

from models.packing import IGNORE_INDEX
from train.data.tokenizer import Tokenizer

TEXT_EXTENSIONS = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


@dataclass
class Document:
    """A tokenized document; ``loss_mask[i]`` False means no loss is taken on predicting token i (its label
    becomes -100). None: every token is a target."""
    tokens: list[int]
    loss_mask: list[bool] | None = None

    def __post_init__(self):
        if self.loss_mask is not None and len(self.loss_mask) != len(self.tokens):
            raise ValueError(f"loss_mask has {len(self.loss_mask)} entries for {len(self.tokens)} tokens")


class DocumentSource(Protocol):
    def iter_from(self, start: int) -> Iterator[str | Document]: ...


# ---------------------------------------------------------------------------------------------------------------
# Readers


def expand_paths(paths: Sequence[str], what: str = "data.paths") -> list[str]:
    """Files named by ``paths`` (files, directories scanned recursively, or glob patterns), sorted per entry."""
    if isinstance(paths, str):
        paths = [paths]
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(TEXT_EXTENSIONS))
            if not found:
                raise ValueError(f"{what}: directory {p!r} has no {'/'.join(TEXT_EXTENSIONS)} files")
            files.extend(found)
        elif os.path.isfile(p):
            if not p.endswith(TEXT_EXTENSIONS):
                raise ValueError(f"{what}: {p!r} is not a supported file type ({', '.join(TEXT_EXTENSIONS)})")
            files.append(p)
        elif any(c in p for c in "*?["):
            found = sorted(f for f in glob.glob(p, recursive=True) if f.endswith(TEXT_EXTENSIONS))
            if not found:
                raise ValueError(f"{what}: pattern {p!r} matches no {'/'.join(TEXT_EXTENSIONS)} files")
            files.extend(found)
        else:
            raise ValueError(f"{what}: {p!r} does not exist")
    if not files:
        raise ValueError(f"{what}: no input files given")
    return files


def read_txt(path: str, mode: str = "line") -> Iterator[str]:
    """``mode="line"``: one document per non-empty line; ``mode="file"``: the whole file is one document."""
    with open(path, encoding="utf-8") as f:
        if mode == "file":
            text = f.read()
            if text.strip():
                yield text
            return
        if mode != "line":
            raise ValueError(f"data.txt_mode must be 'line' or 'file', got {mode!r}")
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                yield line


def jsonl_records(path: str) -> Iterator[tuple[str, object]]:
    """(``path:line``, record) for each non-blank line of a jsonl file (``.gz`` decompressed: the data pipeline's
    output, train.data.pipeline); a line that is not JSON raises ValueError naming ``path:line``."""
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e


def read_jsonl(path: str, text_field: str = "text") -> Iterator[str]:
    """One document per line, its ``text_field``."""
    for where, obj in jsonl_records(path):
        if not isinstance(obj, dict) or text_field not in obj:
            raise ValueError(f"{where}: no {text_field!r} field (set data.text_field)")
        text = obj[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
        if text:
            yield text


def read_parquet(path: str, text_field: str = "text") -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}; "
                         "set data.text_field)")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def read_file(path: str, text_field: str = "text", txt_mode: str = "line") -> Iterator[str]:
    if path.endswith(".txt"):
        return read_txt(path, txt_mode)
    if path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return read_jsonl(path, text_field)
    if path.endswith(".parquet"):
        return read_parquet(path, text_field)
    raise ValueError(f"{path}: unsupported file type (supported: {', '.join(TEXT_EXTENSIONS)})")


class FileCorpus:
    """The documents of txt/jsonl/parquet files in order, repeated in epochs; ``skip`` reserves the first
    documents (the held-out split) so that training never sees them."""

    def __init__(self, paths: Sequence[str], text_field: str = "text", txt_mode: str = "line", skip: int = 0,
                 limit: int | None = None):
        self.files = expand_paths(paths)
        self.text_field, self.txt_mode = text_field, txt_mode
        self.skip, self.limit = skip, limit
        self._count: int | None = None  # documents per epoch after `skip`, known after the first full pass

    def _one_pass(self) -> Iterator[str]:
        n = 0
        for path in self.files:
            for text in read_file(path, self.text_field, self.txt_mode):
                if n >= self.skip:
                    yield text
                n += 1
                if self.limit is not None and n >= self.skip + self.limit:
                    return

    def iter_from(self, start: int) -> Iterator[str]:
        if self._count is not None:
            start %= self._count
        i = 0
        while True:
            seen = 0
            for text in self._one_pass():
                seen += 1
                if i >= start:
                    yield text
                i += 1
            if seen == 0:
                raise ValueError(f"data.paths: no documents in {', '.join(self.files)}"
                                 + (f" after the {self.skip} held-out ones" if self.skip else ""))
            self._count = seen
            if self.limit is not None:  # a bounded source (held-out set) is read once
                return


# ---------------------------------------------------------------------------------------------------------------
# Packing


@dataclass
class PackedRow:
    tokens: list[int]               # (seq_len,)
    doc_bounds: list[int]           # [0, b1, ..., seq_len]: piece boundaries inside the row
    loss_mask: list[bool] | None = None   # (seq_len,) False: no loss on predicting this token; None: all True


PACKINGS = ("cut", "fit")
FIT_LOOKAHEAD = 32     # documents "fit" packing may choose from for the space left in a row


class PackedStream:
    """Rows of exactly ``seq_len`` tokens packed from a document source (``packing``: "cut" or "fit", see the
    module docstring); resumable via state_dict()."""

    def __init__(self, source: DocumentSource, tokenizer: Tokenizer, seq_len: int, start_doc: int = 0,
                 add_bos: bool = True, add_eos: bool = True, packing: str = "cut"):
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
        self.source, self.tokenizer, self.seq_len, self.packing = source, tokenizer, seq_len, packing
        self.add_bos, self.add_eos = add_bos, add_eos
        self.next_doc = start_doc
        self.pending: list[int] = []
        self.pending_mask: list[bool] | None = None   # the loss mask of ``pending`` (None: all targets)
        self.waiting: list[Document] = []              # "fit": documents read but not yet placed, in order
        self.rows = 0
        self._docs: Iterator[str | Document] | None = None

    def _next_document(self) -> Document:
        if self._docs is None:
            self._docs = self.source.iter_from(self.next_doc)
        while True:
            item = next(self._docs)
            self.next_doc += 1
            if not isinstance(item, Document):
                item = Document(self.tokenizer.encode(item, add_bos=self.add_bos, add_eos=self.add_eos))
            if item.tokens:
                return item

    def next_row(self) -> PackedRow:
        return self._fit_row() if self.packing == "fit" else self._cut_row()

    def _fit_row(self) -> PackedRow:
        """First-fit over the next ``FIT_LOOKAHEAD`` documents. A document longer than a row, once at the front
        with the row still empty, is cut: its pieces start the following rows (the last one shares its row)."""
        tokens: list[int] = []
        mask: list[bool] = []
        bounds = [0]
        while len(tokens) < self.seq_len:
            space = self.seq_len - len(tokens)
            while len(self.waiting) < FIT_LOOKAHEAD:
                self.waiting.append(self._next_document())
            if not tokens and not self.pending and len(self.waiting[0].tokens) > self.seq_len:
                doc = self.waiting.pop(0)
                self.pending, self.pending_mask = doc.tokens, doc.loss_mask
            if self.pending:                     # a piece of a document longer than a row
                piece, piece_mask = self.pending[:space], (self.pending_mask or [True] * space)[:space]
                self.pending = self.pending[space:]
                self.pending_mask = self.pending_mask[space:] if self.pending_mask and self.pending else None
            else:
                pick = next((i for i, d in enumerate(self.waiting) if len(d.tokens) <= space), None)
                if pick is None:                 # nothing fits: the rest of the row is padding without loss
                    piece, piece_mask = [self.tokenizer.eos_id] * space, [False] * space
                else:
                    doc = self.waiting.pop(pick)
                    piece = doc.tokens
                    piece_mask = doc.loss_mask if doc.loss_mask is not None else [True] * len(piece)
            tokens.extend(piece)
            mask.extend(piece_mask)
            bounds.append(len(tokens))
        self.rows += 1
        return PackedRow(tokens, bounds, None if all(mask) else mask)

    def _cut_row(self) -> PackedRow:
        tokens: list[int] = []
        mask: list[bool] = []
        masked = False
        bounds = [0]
        while len(tokens) < self.seq_len:
            if self.pending:
                piece, piece_mask = self.pending, self.pending_mask
            else:
                doc = self._next_document()
                piece, piece_mask = doc.tokens, doc.loss_mask
            space = self.seq_len - len(tokens)
            tokens.extend(piece[:space])
            mask.extend(piece_mask[:space] if piece_mask is not None else [True] * min(space, len(piece)))
            masked = masked or piece_mask is not None
            self.pending = piece[space:]
            self.pending_mask = piece_mask[space:] if piece_mask is not None and self.pending else None
            bounds.append(len(tokens))
        self.rows += 1
        return PackedRow(tokens, bounds, mask if masked else None)

    def __iter__(self) -> Iterator[PackedRow]:
        while True:
            yield self.next_row()

    def state_dict(self) -> dict:
        return {"next_doc": self.next_doc, "pending": list(self.pending), "rows": self.rows, "seq_len": self.seq_len,
                "pending_mask": None if self.pending_mask is None else list(self.pending_mask),
                "waiting": [[list(d.tokens), None if d.loss_mask is None else list(d.loss_mask)]
                            for d in self.waiting]}

    def continue_after(self, state: dict) -> None:
        """Start where another stream (e.g. the previous stage's, of another seq_len) stopped: same next document,
        its pending remainder and the documents it read ahead first."""
        self.next_doc, self.pending = int(state["next_doc"]), list(state["pending"])
        self.pending_mask = None if state.get("pending_mask") is None else list(state["pending_mask"])
        self.waiting = [Document(list(t), None if m is None else list(m)) for t, m in state.get("waiting", [])]
        if self.packing == "cut" and self.waiting:
            raise ValueError("a 'cut' stream cannot continue a 'fit' stream (its read-ahead documents); "
                             "data.packing is one setting for every stage")
        self._docs = None

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.seq_len:
            raise ValueError(f"data state was saved with seq_len {state['seq_len']}, this stream packs {self.seq_len}")
        self.continue_after(state)
        self.rows = int(state["rows"])


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int) -> list[PackedRow]:
    """Pack a finite list of token lists the same way (cut at row ends, remainders first in the next row);
    the last row holds what is left and may be shorter. Used for evaluation sets."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    rows: list[PackedRow] = []
    tokens: list[int] = []
    bounds = [0]
    for doc in docs:
        piece = list(doc)
        while piece:
            space = seq_len - len(tokens)
            tokens.extend(piece[:space])
            piece = piece[space:]
            bounds.append(len(tokens))
            if len(tokens) == seq_len:
                rows.append(PackedRow(tokens, bounds))
                tokens, bounds = [], [0]
    if tokens:
        rows.append(PackedRow(tokens, bounds))
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor    # (T,) int64, rows concatenated
    labels: torch.Tensor       # (T,) int64, HF convention (the model shifts inside each sequence); -100 = no loss
    cu_seqlens: torch.Tensor   # (B+1,) int32
    max_seqlen: int            # longest sequence, known on the host (the forward needs no device read)
    num_targets: int           # tokens that carry a loss: non-first positions of each sequence, label != -100

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                     self.cu_seqlens.to(device, non_blocking=True), self.max_seqlen, self.num_targets)


def collate(rows: Sequence[PackedRow], document_boundaries: bool = True) -> Batch:
    """Concatenate rows into one packed batch; sequences never cross rows. Labels are the tokens, -100 where a
    row's loss mask is False. Everything is built on the host (CPU tensors), so the counts cost no device read."""
    if not rows:
        raise ValueError("rows: need at least one row")
    tokens: list[int] = []
    labels: list[int] = []
    cu = [0]
    targets = 0
    for row in rows:
        base = len(tokens)
        tokens.extend(row.tokens)
        mask = row.loss_mask
        labels.extend(row.tokens if mask is None else [t if m else IGNORE_INDEX for t, m in zip(row.tokens, mask)])
        bounds = row.doc_bounds if document_boundaries else [0, len(row.tokens)]
        cu.extend(base + b for b in bounds[1:])
        for start, end in zip(bounds[:-1], bounds[1:]):   # the first token of a sequence is never a target
            targets += (end - start - 1 if mask is None else sum(mask[start + 1:end])) if end > start else 0
    ids = torch.tensor(tokens, dtype=torch.int64)
    max_seqlen = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    return Batch(ids, torch.tensor(labels, dtype=torch.int64), torch.tensor(cu, dtype=torch.int32), max_seqlen,
                 targets)


class ShardedBatches:
    """Each step's global batch (``rows_per_step`` rows) split across ranks, then into micro-batches."""

    def __init__(self, stream: PackedStream, rows_per_step: int, rows_per_micro: int, rank: int = 0, world: int = 1,
                 document_boundaries: bool = True):
        if rows_per_step % (rows_per_micro * world):
            raise ValueError(f"the global batch ({rows_per_step} rows of {stream.seq_len} tokens) does not split into "
                             f"{world} ranks x micro-batches of {rows_per_micro} rows")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.stream, self.rows_per_step, self.rows_per_micro = stream, rows_per_step, rows_per_micro
        self.rank, self.world, self.document_boundaries = rank, world, document_boundaries

    @property
    def accumulation_steps(self) -> int:
        return self.rows_per_step // (self.rows_per_micro * self.world)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one global batch (all ranks)."""
        return self.rows_per_step * self.stream.seq_len

    def next_step(self) -> list[Batch]:
        """The micro-batches of this rank for the next step (all ranks advance the stream identically)."""
        rows = [self.stream.next_row() for _ in range(self.rows_per_step)]
        mine = rows[self.rank::self.world]
        k = self.rows_per_micro
        return [collate(mine[i:i + k], self.document_boundaries) for i in range(0, len(mine), k)]

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def continue_after(self, state: dict) -> None:
        """Go on from the previous stage's stream (see ``PackedStream.continue_after``)."""
        self.stream.continue_after(state)
