"""Tokenizers: a built-in byte-level tokenizer with InternLM2's special tokens, and a SentencePiece loader.

Both implement the same small interface (``Tokenizer``): ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``vocab_size``, ``bos_id``/``eos_id``/``pad_id``, and ``special_ids`` (name -> id). Special-token strings that
appear in the text (``<|im_start|>`` ...) encode to their single ids, so chat data written as plain text works.

Byte-level id layout (``ByteTokenizer``):
    0 <unk>, 1 <s> (bos), 2 </s> (eos = pad), 3..258 the bytes 0x00..0xFF (as SentencePiece's byte fallback),
    then the six InternLM2 chat specials at the top of the vocabulary, in InternLM2's order:
        <|plugin|> V-6, <|interpreter|> V-5, <|action_end|> V-4, <|action_start|> V-3, <|im_end|> V-2, <|im_start|> V-1
    With V = 92544 (InternLM2's vocabulary size) these are exactly InternLM2's ids 92538..92543. The default
    V = 272 keeps the embedding and output layers tiny for CPU runs: the specials then sit at 266..271
    (the mapping is "same offset from the top"); ids 259..265 are unused and never produced.
"""
from __future__ import annotations

import os
import re
from typing import Protocol, Sequence

# InternLM2's chat specials, with their ids in the real 92544-entry vocabulary (see shared internlm2.md).
INTERNLM2_VOCAB_SIZE = 92544
INTERNLM2_SPECIALS = {
    "<|plugin|>": 92538,
    "<|interpreter|>": 92539,
    "<|action_end|>": 92540,
    "<|action_start|>": 92541,
    "<|im_end|>": 92542,
    "<|im_start|>": 92543,
}
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BYTE_OFFSET = 3
DEFAULT_BYTE_VOCAB = 272
MIN_BYTE_VOCAB = BYTE_OFFSET + 256 + len(INTERNLM2_SPECIALS)


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    special_ids: dict[str, int]

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _special_pattern(names) -> re.Pattern:
    # Longest first so that no special is matched as the prefix of a longer one.
    return re.compile("(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + ")")


class _SpecialsAware:
    """Shared encoding: special-token strings in the text become their ids, the rest goes to ``_encode_plain``."""

    bos_id: int
    eos_id: int

    def _set_specials(self, special_ids: dict[str, int]) -> None:
        self.special_ids = special_ids
        self._id_to_special = {i: name for name, i in special_ids.items()}
        self._pattern = _special_pattern(special_ids)

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        for i, part in enumerate(self._pattern.split(text)):
            if i % 2:  # odd parts of re.split with one group are the matched specials
                ids.append(self.special_ids[part])
            else:
                ids.extend(self._encode_plain(part))
        if add_eos:
            ids.append(self.eos_id)
        return ids


class ByteTokenizer(_SpecialsAware):
    """UTF-8 bytes as tokens, with bos/eos/unk and InternLM2's specials (layout in the module docstring)."""

    def __init__(self, vocab_size: int = DEFAULT_BYTE_VOCAB):
        if not isinstance(vocab_size, int) or vocab_size < MIN_BYTE_VOCAB:
            raise ValueError(f"vocab_size must be an int >= {MIN_BYTE_VOCAB} for the byte tokenizer, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.unk_id, self.bos_id, self.eos_id = 0, 1, 2
        self.pad_id = self.eos_id  # as InternLM2
        top = vocab_size - INTERNLM2_VOCAB_SIZE
        special_ids = {UNK: 0, BOS: 1, EOS: 2}
        special_ids.update({name: real + top for name, real in INTERNLM2_SPECIALS.items()})
        self._set_specials(special_ids)

    def _encode_plain(self, text: str) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        pending = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids: token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
                pending.append(i - BYTE_OFFSET)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            out.append(self._id_to_special.get(i, ""))  # unused ids decode to nothing
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


class SentencePieceTokenizer(_SpecialsAware):
    """A SentencePiece ``tokenizer.model`` (e.g. InternLM2's), with its special tokens kept whole."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer: SentencePiece model file {path!r} does not exist")
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with a terse message
            raise ValueError(f"tokenizer: {path!r} is not a SentencePiece model ({e})") from e
        self.path = path
        self.vocab_size = int(self._sp.GetPieceSize())
        self.unk_id = int(self._sp.unk_id())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else self.eos_id
        # Specials that the model actually has as pieces (control or user-defined symbols).
        special_ids = {}
        for name in (UNK, BOS, EOS, *INTERNLM2_SPECIALS):
            i = int(self._sp.PieceToId(name))
            if i != self.unk_id or name == UNK:
                special_ids[name] = i
        self._set_specials(special_ids)

    def _encode_plain(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text)) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids: token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i in self._id_to_special:
                if run:
                    out.append(self._sp.DecodeIds(run))
                    run = []
                out.append(self._id_to_special[i])
            else:
                run.append(i)
        if run:
            out.append(self._sp.DecodeIds(run))
        return "".join(out)


def describe(tokenizer: Tokenizer) -> dict:
    """What a checkpoint records about its tokenizer (``load_tokenizer`` arguments that rebuild it)."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        return {"kind": "sentencepiece", "spec": tokenizer.path, "vocab_size": tokenizer.vocab_size}
    return {"kind": "byte", "spec": "byte", "vocab_size": tokenizer.vocab_size,
            "special_ids": tokenizer.special_ids}


def load_tokenizer(spec: str, byte_vocab_size: int = DEFAULT_BYTE_VOCAB) -> Tokenizer:
    """``"byte"`` for the built-in byte-level tokenizer, else a path to a SentencePiece ``tokenizer.model``
    (or a directory containing one)."""
    if spec == "byte":
        return ByteTokenizer(byte_vocab_size)
    path = os.path.join(spec, "tokenizer.model") if os.path.isdir(spec) else spec
    return SentencePieceTokenizer(path)
