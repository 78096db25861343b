"""The trainer: data, tokenizers, packing, one Trainer for every stage (train.trainer), the parallelism seam
(train.parallel), checkpoints, pretraining stages and the main pipeline.

Used from the repository root (``python -m train.pipeline``); see docs/training.md.
"""
