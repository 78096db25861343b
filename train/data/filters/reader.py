"""The pipeline's input reader: jsonl / jsonl.gz / parquet files into datatrove Documents, bad input included.

datatrove's own JsonlReader skips a record without text with one warning and stops a task on a malformed line;
here nothing is dropped silently: every record that cannot become a document still comes out as a Document whose
``metadata["bad_input"]`` names the reason (``malformed_json``, ``missing_text``, ``text_not_string``,
``empty_text``, ``undecodable_line`` (not UTF-8), ``undecodable_file`` (a broken gzip or parquet file: one record),
``unsupported_file``); the pipeline's first step removes these into ``removed/read/`` so they are counted.

Ids: a record's ``id`` when it has one, else ``<file path relative to the input folder>/<record index>``, which
is stable across runs and executors.
"""
from __future__ import annotations

import gzip
import os
import zlib

import orjson
from datatrove.data import Document
from datatrove.pipeline.readers.base import BaseDiskReader

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)


def split_input(spec: str) -> tuple[str, str | None]:
    """``--input`` as (folder, glob pattern or None): a directory, a single file, or a glob such as
    ``data/**/*.jsonl.gz`` (the folder is the part before the first path component with a wildcard)."""

    if os.path.isdir(spec):
        return spec, None
    if os.path.isfile(spec):
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    parts = spec.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            folder = "/".join(parts[:i]) or "."
            if not os.path.isdir(folder):
                raise ValueError(f"--input: folder {folder!r} of pattern {spec!r} does not exist")
            return folder, "/".join(parts[i:])
    raise ValueError(f"--input: {spec!r} is not a file, a directory or a glob pattern")


class InputReader(BaseDiskReader):
    """Reads every file of its shard (``data_folder.get_shard``: file i goes to task i mod tasks)."""

    name = "📖 input reader"

    def _bad(self, reason: str, text: str, filepath: str, index: int | str) -> Document:
        return Document(text=text, id=f"{filepath}/{index}",
                        metadata={"bad_input": reason, "file_path": self.data_folder.resolve_paths(filepath)})

    def _from_record(self, record, filepath: str, index: int, raw: str) -> Document:
        if not isinstance(record, dict):
            return self._bad("malformed_json", raw, filepath, index)
        if self.text_key not in record:
            return self._bad("missing_text", raw, filepath, index)
        text = record[self.text_key]
        if not isinstance(text, str):
            return self._bad("text_not_string", raw, filepath, index)
        if not text.strip():
            return self._bad("empty_text", raw, filepath, index)
        if self.id_key in record:
            record[self.id_key] = str(record[self.id_key])
        return self.get_document_from_dict(record, filepath, index)

    def _read_jsonl(self, filepath: str):
        with self.data_folder.open(filepath, "rb") as f:
            data = f.read()
        if filepath.endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as e:
                yield self._bad("undecodable_file", f"{type(e).__name__}: {e}", filepath, "file")
                return
        index = 0
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                raw = line.decode("utf-8")
            except UnicodeDecodeError:
                yield self._bad("undecodable_line", line.decode("utf-8", errors="replace"), filepath, index)
                index += 1
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                yield self._bad("malformed_json", raw, filepath, index)
            else:
                yield self._from_record(record, filepath, index, raw)
            index += 1

    def _read_parquet(self, filepath: str):
        import pyarrow.parquet as pq

        try:
            with self.data_folder.open(filepath, "rb") as f:
                table = pq.read_table(f)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not parquet
            yield self._bad("undecodable_file", f"{type(e).__name__}: {e}", filepath, "file")
            return
        for index, record in enumerate(table.to_pylist()):
            yield self._from_record(record, filepath, index, orjson.dumps(record, default=str).decode())

    def read_file(self, filepath: str):
        if filepath.endswith(JSONL_SUFFIXES):
            yield from self._read_jsonl(filepath)
        elif filepath.endswith(PARQUET_SUFFIXES):
            yield from self._read_parquet(filepath)
        else:
            yield self._bad("unsupported_file", "", filepath, "file")
