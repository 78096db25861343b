"""Pipeline steps that count: every document in, out and removed (with its reason) is tallied per task.

``FilterStep`` runs any datatrove ``BaseFilter`` (or one of ours) on the documents it applies to and passes the
others through untouched; removed documents go to ``OUT/removed/<step>/<rank>.jsonl.gz`` with
``metadata.filter_reason``. ``PassStep`` wraps a datatrove step that is not a ``BaseFilter`` (exact / MinHash dedup
filters, which write their own exclusions) and tallies what it drops as ``reason``.

Each step writes its tally, atomically, to ``OUT/work/tally/<step>/<rank>.json`` when its input is exhausted, so a
task killed half-way leaves no tally and its rerun (datatrove resumes incomplete tasks only) writes a whole one.
``inputs`` counts input records: a joined code repository carries ``metadata.n_inputs`` = its number of files, so
``inputs in = inputs kept + inputs removed`` holds through the code join.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Callable, Iterable

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.pipeline.writers.jsonl import JsonlWriter

TALLY_DIR = os.path.join("work", "tally")


def doc_bytes(doc: Document) -> int:
    return len(doc.text.encode("utf-8"))


def doc_inputs(doc: Document) -> int:
    return int(doc.metadata.get("n_inputs", 1))


class Tally:
    """Documents, bytes and input records in / out / removed (per reason) of one step in one task."""

    def __init__(self):
        self.data = {"in": [0, 0, 0], "out": [0, 0, 0], "removed": defaultdict(lambda: [0, 0, 0])}

    @staticmethod
    def _add(slot: list[int], doc: Document) -> None:
        slot[0] += 1
        slot[1] += doc_bytes(doc)
        slot[2] += doc_inputs(doc)

    def seen(self, doc: Document) -> None:
        self._add(self.data["in"], doc)

    def passed(self, doc: Document) -> None:
        self._add(self.data["out"], doc)

    def removed(self, doc: Document, reason: str) -> None:
        self._add(self.data["removed"][reason], doc)

    def save(self, out_dir: str, step: str, rank: int) -> None:
        folder = os.path.join(out_dir, TALLY_DIR, step)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{rank:05d}.json")
        data = {"in": self.data["in"], "out": self.data["out"], "removed": dict(self.data["removed"])}
        with open(path + ".tmp", "w") as f:
            json.dump(data, f)
        os.replace(path + ".tmp", path)


def removed_writer(out_dir: str, step: str) -> JsonlWriter:
    return JsonlWriter(os.path.join(out_dir, "removed", step), output_filename="${rank}.jsonl.gz",
                       compression="gzip")


class FilterStep(PipelineStep):
    """Applies ``filt`` to the documents ``applies(doc)`` selects.

    ``edits=False`` (every filter but the normaliser): the filter sees a copy, so a filter that rewrites text on
    the way (datatrove's C4 filter drops lines) only decides; the kept document is the one that came in.
    """

    type = "🔻 - FILTER"

    def __init__(self, step: str, filt: BaseFilter, out_dir: str, applies: Callable[[Document], bool] | None = None,
                 edits: bool = False):
        self.name = f"{step} ({type(filt).__name__})"   # before PipelineStep.__init__, which names the stats
        super().__init__()
        self.step = step
        self.filt = filt
        self.out_dir = out_dir
        self.applies = applies
        self.edits = edits

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tally = Tally()
        with removed_writer(self.out_dir, self.step) as writer:
            for doc in data:
                tally.seen(doc)
                if self.applies is not None and not self.applies(doc):
                    tally.passed(doc)
                    yield doc
                    continue
                with self.track_time():
                    probe = doc if self.edits else Document(text=doc.text, id=doc.id, metadata=dict(doc.metadata))
                    keep, reason = get_filter_result(self.filt.filter(probe))
                if keep:
                    self.stat_update("forwarded")
                    tally.passed(doc)
                    yield doc
                else:
                    reason = reason or self.step
                    self.stat_update("dropped", f"dropped_{reason}")
                    doc.metadata["filter_reason"] = reason
                    doc.metadata["removed_by"] = self.step
                    tally.removed(doc, reason)
                    writer.write(doc, rank)
        tally.save(self.out_dir, self.step, rank)


class PassStep(PipelineStep):
    """Runs a datatrove step over the stream and tallies what went in and what came out; the difference is
    removed under ``reason`` (the wrapped step writes those documents to ``removed/<step>/`` itself)."""

    type = "🫂 - DEDUPS"

    def __init__(self, step: str, inner: PipelineStep, out_dir: str, reason: str):
        self.name = f"{step} ({type(inner).__name__})"
        super().__init__()
        self.step = step
        self.inner = inner
        self.out_dir = out_dir
        self.reason = reason

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tally = Tally()
        pending: dict[str, list[Document]] = defaultdict(list)   # in, not yet out (ids may repeat in bad input)

        def counted(docs: Iterable[Document]):
            for doc in docs:
                tally.seen(doc)
                pending[doc.id].append(doc)
                yield doc

        for doc in self.inner.run(counted(data), rank, world_size):
            tally.passed(doc)
            same = pending[doc.id]
            same.pop()
            if not same:
                del pending[doc.id]
            yield doc
        for same in pending.values():  # what the inner step dropped
            for doc in same:
                tally.removed(doc, self.reason)
        tally.save(self.out_dir, self.step, rank)
