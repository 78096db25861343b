"""Long-context selection: long kept documents, scored by perplexity under our own model, as a separate set.

The candidates are the kept documents (they passed every statistics filter: Gopher, C4, FineWeb, the
classifiers, dedup) with at least ``min_chars`` characters. With ``long_context.checkpoint`` set, each candidate
is scored by the perplexity of its first ``max_tokens`` tokens under that checkpoint (models/, loaded with
models.checkpoint.load_model), ppl = exp(mean next-token loss), written to ``metadata.perplexity``; with
``max_perplexity > 0`` candidates above it are left out (reason ``perplexity``): a model that finds a long text
very surprising is usually looking at junk that the rules missed. Without a checkpoint nothing is scored and
stats.json says so. The set is written to ``OUT/long_context/`` (jsonl.gz, the same schema as ``OUT/kept/``);
the kept set is not changed by this stage.
"""
from __future__ import annotations

import math
import os

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers.jsonl import JsonlWriter

from train.data.filters.steps import Tally


class PerplexityScorer:
    """exp(mean next-token cross-entropy) of a text's first ``max_tokens`` tokens, in float32 on the CPU."""

    def __init__(self, checkpoint: str, tokenizer: str, max_tokens: int):
        self.checkpoint = checkpoint
        self.tokenizer_spec = tokenizer
        self.max_tokens = max_tokens
        self._model = None

    def _load(self):
        import torch

        from models.checkpoint import load_model
        from models.internlm2 import InternLM2ForCausalLM
        from train.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(self.tokenizer_spec)
        self._model = load_model(InternLM2ForCausalLM, self.checkpoint, dtype=torch.float32, device="cpu").eval()

    def __call__(self, text: str) -> float:
        import torch

        if self._model is None:
            self._load()
        ids = self.tokenizer.encode(text, add_bos=True)[: self.max_tokens]
        x = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            loss = self._model(x, labels=x).loss
        return math.exp(float(loss))


class LongContextSelector(PipelineStep):
    name = "📏 long-context selection"

    def __init__(self, out_dir: str, min_chars: int, scorer: PerplexityScorer | None, max_perplexity: float):
        super().__init__()
        self.out_dir = out_dir
        self.min_chars = min_chars
        self.scorer = scorer
        self.max_perplexity = max_perplexity

    def run(self, data, rank: int = 0, world_size: int = 1):
        tally = Tally()
        writer = JsonlWriter(os.path.join(self.out_dir, "long_context"), output_filename="${rank}.jsonl.gz",
                             compression="gzip")
        with writer:
            for doc in data:
                doc: Document
                tally.seen(doc)
                if len(doc.text) < self.min_chars:
                    tally.removed(doc, "below_min_chars")
                    continue
                if self.scorer is not None:
                    with self.track_time():
                        doc.metadata["perplexity"] = self.scorer(doc.text)
                    if self.max_perplexity > 0 and doc.metadata["perplexity"] > self.max_perplexity:
                        tally.removed(doc, "perplexity")
                        continue
                tally.passed(doc)
                writer.write(doc, rank)
        tally.save(self.out_dir, "long_context", rank)
        return iter(())
