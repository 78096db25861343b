"""The frame every Trainer stage shares (pretrain, sft, reward): the command line around ``run_<stage>(cfg)`` and
the Trainer it builds, so a stage file holds only its data, loss and evaluation.

    main:     parse the command line (a ConfigError -> the message and exit status 2), run, end the process group,
              report
    trainer:  the run's config.json (rank 0), a Trainer whose checkpoints carry tokenizer.json
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, TypeVar

import torch.distributed as dist

from train.config import ConfigError, to_dict
from train.data.tokenizer import Tokenizer, write_checkpoint_tokenizer
from train.trainer import Trainer

C = TypeVar("C")
R = TypeVar("R")


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def stage_trainer(cfg, rt, model, tokenizer: Tokenizer, *, total_steps: int, signature: list,
                  export_layout: str = "llama") -> Trainer:
    """The Trainer of ``cfg`` (a TrainConfig or a stage's subclass) over ``model``; writes ``config.json``."""
    trainer = Trainer(model, rt, optim=cfg.optim, checkpoint=cfg.checkpoint, metrics=cfg.metrics,
                      run_dir=cfg.run_dir, total_steps=total_steps, signature=signature,
                      stop_at_step=cfg.run.stop_at_step,
                      extra_writer=lambda d: write_checkpoint_tokenizer(tokenizer, d),
                      export_layout=export_layout)
    if rt.is_main:
        write_json(os.path.join(cfg.run_dir, "config.json"), to_dict(cfg))
    return trainer


def stage_main(argv: list[str] | None, parse: Callable[[list[str]], C], run: Callable[[C], R],
               report: Callable[[C, R], None]) -> int:
    """``python -m train.stages.<stage>``: ``report(cfg, result)`` runs after the process group is gone."""
    try:
        cfg = parse(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    report(cfg, result)
    return 0
