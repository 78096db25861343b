"""The trainer: data, tokenizers, packing, the shared training loop, pretraining stages and the main pipeline.

Used from the repository root (``python -m train.pipeline``); see docs/training.md.
"""
