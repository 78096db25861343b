"""Loader of the shipped tasks' jsonl files (``custom_dataset: !function data.load`` in each YAML): the path is
resolved beside this file, so ``--include_path train/eval/tasks`` works from any working directory, offline."""
from __future__ import annotations

import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def load(file: str, **metadata) -> datasets.DatasetDict:
    """{"test": the records of ``file`` (a jsonl beside this module)}; ``metadata`` (the task's version etc.),
    which lm-eval passes along, is not needed."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(os.path.join(HERE, file))})
