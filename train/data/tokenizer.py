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

import json
import os
import re
import shutil
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


# --------------------------------------------------------------------------------------------------------------
# transformers export: the same ids through ``AutoTokenizer.from_pretrained(dir)``
# --------------------------------------------------------------------------------------------------------------
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIALS_FILE = "special_tokens_map.json"
SP_MODEL_FILE = "tokenizer.model"
EXPORT_RECORD_KEY = "internlm_tokenizer"


def _byte_tokenizer_json(tok: ByteTokenizer) -> dict:
    """A ``tokenizers`` definition with ByteTokenizer's ids: a BPE without merges whose vocabulary is the 256 byte
    pieces ``<0xXX>`` at 3..258 with ``byte_fallback``, so every character falls back to its UTF-8 bytes (the
    same ids as ``_encode_plain``); the specials are added tokens (split out of the text before the model, as
    ``encode`` does). No normalizer and no pre-tokenizer: the text is taken as it is. Decoding fuses the byte
    pieces back into UTF-8 (ByteFallback + Fuse). The unused ids (259..V-7, never produced by ``encode``) have
    no token: decoding skips them, as ``decode`` does, and a 92544-entry layout stays a 265-entry file."""
    vocab = {UNK: 0, BOS: 1, EOS: 2}
    vocab.update({f"<0x{b:02X}>": b + BYTE_OFFSET for b in range(256)})
    vocab.update(tok.special_ids)
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for name, i in sorted(tok.special_ids.items(), key=lambda x: x[1])]
    bos, text_a, text_b = ({"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                           {"Sequence": {"id": "B", "type_id": 1}})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": None,
        # add_special_tokens=True prepends <s> (transformers' default; ``encode(..., add_bos=True)``).
        "post_processor": {"type": "TemplateProcessing", "single": [bos, text_a], "pair": [bos, text_a, text_b],
                           "special_tokens": {BOS: {"id": BOS, "ids": [tok.bos_id], "tokens": [BOS]}}},
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": UNK, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": True, "ignore_merges": False,
                  "vocab": dict(sorted(vocab.items(), key=lambda x: x[1])), "merges": []},
    }


def _sentencepiece_tokenizer_json(tok: SentencePieceTokenizer) -> dict:
    """A ``tokenizers`` definition of the SentencePiece model file, read from its protobuf: BPE models become a BPE
    whose merges are every (left, right) split of a piece into two pieces, ranked by the piece's score (what
    SentencePiece's BPE applies), Unigram models a Unigram with the pieces' scores; byte fallback as the model's;
    spaces become "▁" (after a "▁" prepended to each text part when the model adds a dummy prefix, as
    SentencePiece does to every part ``encode`` hands it). The specials the model has are added tokens, split out
    first, as ``encode`` does. Normalization other than ``identity`` (or a precompiled charsmap) and
    ``remove_extra_whitespaces`` are refused: they would change ids silently."""
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf

    proto = sentencepiece_model_pb2.ModelProto()
    with open(tok.path, "rb") as f:
        proto.ParseFromString(f.read())
    norm = proto.normalizer_spec
    if norm.remove_extra_whitespaces:
        raise ValueError(f"tokenizer: {tok.path!r} removes extra whitespace, which the transformers export does not "
                         "reproduce")
    if norm.name != "identity" and not norm.precompiled_charsmap:
        raise ValueError(f"tokenizer: {tok.path!r} normalization {norm.name!r} has no precompiled charsmap to export")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    if proto.trainer_spec.model_type == 2:          # BPE
        merges = []
        for piece, score in pieces:
            merges += [(score, vocab[piece], piece[:k], piece[k:]) for k in range(1, len(piece))
                       if piece[:k] in vocab and piece[k:] in vocab]
        merges.sort(key=lambda m: (-m[0], m[1]))
        model = {"type": "BPE", "dropout": None, "unk_token": pieces[tok.unk_id][0], "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": byte_fallback, "ignore_merges": False,
                 "vocab": vocab, "merges": [[a, b] for _, _, a, b in merges]}
    elif proto.trainer_spec.model_type == 1:        # Unigram
        model = {"type": "Unigram", "unk_id": tok.unk_id, "vocab": [[p, s] for p, s in pieces],
                 "byte_fallback": byte_fallback}
    else:
        raise ValueError(f"tokenizer: {tok.path!r} is neither a BPE nor a Unigram SentencePiece model")
    steps = []
    if norm.name != "identity":
        import base64

        charsmap = base64.b64encode(norm.precompiled_charsmap).decode()
        steps.append({"type": "Precompiled", "precompiled_charsmap": charsmap})
    if norm.add_dummy_prefix:
        steps.append({"type": "Prepend", "prepend": "\u2581"})
    steps.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if norm.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for name, i in sorted(tok.special_ids.items(), key=lambda x: x[1])]
    post = _byte_tokenizer_json(ByteTokenizer())["post_processor"]
    post["special_tokens"][BOS]["ids"] = [tok.bos_id]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": steps}, "pre_tokenizer": None, "post_processor": post,
            "decoder": {"type": "Sequence", "decoders": decoders}, "model": model}


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike) -> list[str]:
    """Write ``tokenizer`` into ``directory`` (a model export) so that ``transformers.AutoTokenizer
    .from_pretrained(directory)`` gives the same ids: ``tokenizer.json`` (a PreTrainedTokenizerFast definition),
    ``tokenizer_config.json``, ``special_tokens_map.json``, and for SentencePiece the ``tokenizer.model`` itself.
    ``tokenizer_config.json`` also carries ``describe(tokenizer)`` under ``"internlm_tokenizer"`` (transformers
    keeps unknown keys as init arguments), so ``load_export_tokenizer`` rebuilds ours from the export alone.
    Returns the file names written."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    record = describe(tokenizer)
    written = [HF_TOKENIZER_FILE, HF_CONFIG_FILE, HF_SPECIALS_FILE]
    if isinstance(tokenizer, SentencePieceTokenizer):
        definition = _sentencepiece_tokenizer_json(tokenizer)
        shutil.copyfile(tokenizer.path, os.path.join(directory, SP_MODEL_FILE))
        record["spec"] = SP_MODEL_FILE          # relative to the export directory
        written.append(SP_MODEL_FILE)
    elif isinstance(tokenizer, ByteTokenizer):
        definition = _byte_tokenizer_json(tokenizer)
    else:
        raise ValueError(f"tokenizer: no transformers export for {type(tokenizer).__name__}")
    names = {i: n for n, i in tokenizer.special_ids.items()}
    specials = {"bos_token": names[tokenizer.bos_id], "eos_token": names[tokenizer.eos_id],
                "pad_token": names[tokenizer.pad_id]}
    if UNK in tokenizer.special_ids:
        specials["unk_token"] = UNK
    extra = [n for n in INTERNLM2_SPECIALS if n in tokenizer.special_ids]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
              "clean_up_tokenization_spaces": False,
              "add_bos_token": True, "add_eos_token": False, "additional_special_tokens": extra, **specials,
              EXPORT_RECORD_KEY: record}
    for name, obj in ((HF_TOKENIZER_FILE, definition), (HF_CONFIG_FILE, config),
                      (HF_SPECIALS_FILE, {**specials, "additional_special_tokens": extra})):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
    return written


def load_export_tokenizer(model_dir: str | os.PathLike, vocab_size: int, spec: str | None = None) -> Tokenizer:
    """The tokenizer of an exported model directory: ``spec`` when given (``byte`` or a SentencePiece model);
    else a tokenizer record (``describe``'s dict, with a ``spec`` key) found first in the export's
    ``tokenizer_config.json`` (``save_hf_tokenizer`` puts it there), then as a ``tokenizer.json`` in the export
    or beside it in the checkpoint directory (the trainer's; a transformers ``tokenizer.json`` has no ``spec`` and
    is passed over); else the export's ``tokenizer.model``. ``vocab_size`` is the model's (the byte tokenizer's id
    layout depends on it)."""
    model_dir = os.fspath(model_dir)
    if spec is None:
        spec = _recorded_spec(model_dir)
    if spec is None:
        if not os.path.isfile(os.path.join(model_dir, SP_MODEL_FILE)):
            raise ValueError(f"tokenizer: {model_dir!r} has no tokenizer record and no {SP_MODEL_FILE}, nor has "
                             "its checkpoint directory; pass 'byte' or a SentencePiece model")
        spec = model_dir
    tokenizer = load_tokenizer(spec, byte_vocab_size=vocab_size)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer: {tokenizer.vocab_size} tokens, the model has {vocab_size}")
    return tokenizer


def _recorded_spec(model_dir: str) -> str | None:
    """``load_tokenizer``'s spec from the first tokenizer record of an export (``load_export_tokenizer``)."""
    config = os.path.join(model_dir, HF_CONFIG_FILE)
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            record = json.load(f).get(EXPORT_RECORD_KEY)
        if record is not None:   # a SentencePiece spec is the model file's name inside the export
            return record["spec"] if record["kind"] == "byte" else os.path.join(model_dir, record["spec"])
    for where in (model_dir, os.path.dirname(os.path.abspath(model_dir))):
        path = os.path.join(where, HF_TOKENIZER_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                spec = json.load(f).get("spec")
            if spec is not None:
                return spec
    return None


def write_checkpoint_tokenizer(tokenizer: Tokenizer, checkpoint_dir: str | os.PathLike) -> None:
    """The trainer's ``extra_writer``: the tokenizer record (``describe``) as ``tokenizer.json`` in the checkpoint
    directory, and, when the checkpoint has its HF export ``model/``, the transformers tokenizer files in it
    (``save_hf_tokenizer``), so ``AutoTokenizer.from_pretrained(<checkpoint>/model)`` works."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    with open(os.path.join(checkpoint_dir, HF_TOKENIZER_FILE), "w") as f:
        json.dump(describe(tokenizer), f, indent=1)
    export = os.path.join(checkpoint_dir, "model")
    if os.path.isdir(export):
        save_hf_tokenizer(tokenizer, export)
