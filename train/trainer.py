"""The Trainer shared by the pretraining, SFT and reward stages: stages, resume, data, checkpoints, metrics and
evaluation around one ``Learner`` (train/learner.py: model + Parallel + optimizer + schedule + clipping, whose
``step(micro_batches, loss_fn)`` is the one optimizer step of every stage, PPO's included).

A stage is data + a loss + (optionally) an evaluator; it never copies the loop. The gradient of a step is the mean
over the global batch's targets whatever the accumulation and the world size. Nothing in a step reads a device
value on the host: losses, counts and the gradient norm are summed on the device and read every
``metrics.log_every`` steps (a non-finite loss is reported at that read).

Stages chain on one Trainer (one optimizer and one LR schedule): ``train(stage)`` per stage, in order.
``prepare(model)`` runs at each stage's start (InternLM2's long-context stage raises the RoPE base there); a data
source with ``continue_after(state)`` continues the previous stage's stream. ``checkpoint.resume`` restores model,
optimizer (fp32 master weights), schedule, data position and RNG from the newest checkpoint of the run directory,
on any number of ranks, and the following losses equal an uninterrupted run's.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from train.checkpoint import (
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from train.config import CheckpointConfig, MetricsConfig, OptimConfig
from train.learner import Learner, LossFn
from train.metrics import MetricsLog, Progress, peak_tflops
from train.parallel import Runtime, barrier


class DataSource(Protocol):
    """This rank's micro-batches, step by step, resumable. Optional: ``continue_after(previous_state)`` to go on
    from the state of the previous stage's source."""
    tokens_per_step: int                       # global tokens of one step (throughput); 0 if not meaningful

    def next_step(self) -> list: ...           # micro-batches (each with .to(device)) of this rank's next step
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Evaluator(Protocol):
    def __call__(self, model: nn.Module) -> dict[str, float]: ...   # the plain model; runs on every rank


@dataclass
class Stage:
    name: str
    steps: int
    data: DataSource
    loss_fn: LossFn
    evaluator: Evaluator | None = None                     # after the stage, and before step 1 of the run
    prepare: Callable[[nn.Module], None] | None = None      # at the stage's start, also when a resume skips it
    flops: Callable[[list], float] | None = None            # training FLOPs of this rank's micro-batches (MFU)
    describe: str = ""                                      # shown in the stage's start line


@dataclass
class TrainState:
    global_step: int = 0
    stage_index: int = 0
    stage_name: str = ""
    stage_step: int = 0
    tokens_seen: int = 0
    data: dict | None = None       # the data source's state (of the running stage, or of the last finished one)


class Trainer:
    def __init__(self, model: nn.Module, runtime: Runtime, *, optim: OptimConfig, checkpoint: CheckpointConfig,
                 metrics: MetricsConfig, run_dir: str, total_steps: int, signature: list | None = None,
                 stop_at_step: int = 0, extra_writer: Callable[[str], None] | None = None,
                 export_layout: str | None = "llama"):
        """``signature``: what must match for ``checkpoint.resume`` (e.g. the stages' names and lengths).
        ``extra_writer(dir)`` adds files to every checkpoint; ``export_layout``: the ``save_pretrained`` layout of
        the HF export written with the checkpoint at each stage end (None: no export)."""
        self.runtime, self.run_dir, self.signature = runtime, run_dir, signature
        self.ckpt, self.metrics_cfg, self.stop_at_step = checkpoint, metrics, stop_at_step
        self.extra_writer, self.export_layout = extra_writer, export_layout
        self.learner = Learner(model, runtime, optim, total_steps)
        self.model = model                                  # the plain model (evaluation, export, generation)
        learner = self.learner
        self.parallel, self.optimizer, self.schedule = learner.parallel, learner.optimizer, learner.schedule
        self.state = TrainState()
        self.latest = latest_checkpoint(run_dir) if checkpoint.resume else None
        if runtime.is_main:
            os.makedirs(run_dir, exist_ok=True)
            if not checkpoint.resume and os.path.isdir(checkpoint_root(run_dir)):
                print(f"[train] starting {run_dir!r} over: removing its earlier checkpoints", flush=True)
                shutil.rmtree(checkpoint_root(run_dir))
            if checkpoint.resume and self.latest is None:
                print(f"[train] --resume: no checkpoint in {run_dir}, starting from scratch", flush=True)
        barrier(runtime.dims)
        if self.latest:
            self._resume(self.latest)
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.log = MetricsLog(self.metrics_path, self.state.global_step if self.latest else None, runtime.is_main)
        self.progress = Progress(total_steps, self.state.global_step, metrics.progress and runtime.is_main)
        cuda = runtime.device.type == "cuda"
        self.peak = metrics.peak_tflops or (peak_tflops(torch.cuda.get_device_name(runtime.device)) if cuda else None)
        self._stages_seen = 0
        self._last_loss = torch.full((), math.nan)
        self._window = _Window(runtime.device)

    @property
    def stopped(self) -> bool:
        """run.stop_at_step reached."""
        return bool(self.stop_at_step) and self.state.global_step >= self.stop_at_step

    def train(self, stage: Stage) -> bool:
        """Run ``stage`` (what a resumed checkpoint left of it); False when stopped before its end."""
        st, index = self.state, self._stages_seen
        self._stages_seen += 1
        if stage.prepare is not None:
            stage.prepare(self.model)
        if index < st.stage_index or (index == st.stage_index and st.stage_step >= stage.steps):
            return True                                     # done before the checkpoint we resumed from
        if index == st.stage_index and st.stage_step > 0:
            stage.data.load_state_dict(st.data)
        elif st.data is not None and hasattr(stage.data, "continue_after"):
            stage.data.continue_after(st.data)
        if index > st.stage_index or st.stage_step == 0:
            st.stage_index, st.stage_step = index, 0
        st.stage_name = stage.name
        if st.global_step == 0:
            self.evaluate(stage, "init")
        self.progress.write(f"[train] stage {stage.name!r}: {stage.steps} steps of {stage.data.tokens_per_step} "
                            f"tokens{stage.describe}")
        self._window.restart()
        while st.stage_step < stage.steps:
            self.step(stage)
            st.data = stage.data.state_dict()
            self._log(stage)
            if st.stage_step < stage.steps and self.stopped:
                self.save()
                return False
            if st.stage_step < stage.steps and self.ckpt.every and st.global_step % self.ckpt.every == 0:
                self.save()
        self.evaluate(stage, stage.name)
        self.save(export=self.export_layout)
        return True

    def step(self, stage: Stage) -> None:
        """One optimizer step over this rank's next micro-batches (see the module docstring)."""
        micro = stage.data.next_step()
        flops = stage.flops(micro) * self.runtime.dims.dp if stage.flops else 0.0
        device = self.runtime.device
        out = self.learner.step(micro, lambda model, batch: stage.loss_fn(model, batch.to(device)))
        self._last_loss = out.loss
        self.state.global_step += 1
        self.state.stage_step += 1
        self.state.tokens_seen += stage.data.tokens_per_step
        self._window.add(out.loss, out.metrics, out.grad_norm, out.lr, stage.data.tokens_per_step, flops)
        self.progress.step()

    def _log(self, stage: Stage) -> None:
        st = self.state
        if st.global_step % self.metrics_cfg.log_every and st.stage_step < stage.steps:
            return
        w = self._window.read()
        if not math.isfinite(w["loss"]):
            raise FloatingPointError(f"the loss is {w['loss']} at step {st.global_step} (stage {stage.name!r}): "
                                     "lower optim.lr or check the data")
        record = {"kind": "train", "step": st.global_step, "stage": stage.name, **w, "tokens_seen": st.tokens_seen}
        flops = record.pop("flops")
        if self.peak:
            record["mfu"] = flops / w["window_time_s"] / (self.peak * 1e12 * self.runtime.world)
        self.log.write(record)
        self.progress.show(w["loss"], w["lr"], w["tokens_per_s"], stage.name)

    def evaluate(self, stage: Stage, label: str) -> None:
        if stage.evaluator is None:
            return
        self.model.eval()
        try:
            result = stage.evaluator(self.model)
        finally:
            self.model.train()
        if result:
            self.log.write({"kind": "eval", "step": self.state.global_step, "stage": label, **result})
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
            self.progress.write(f"[eval] step {self.state.global_step} ({label}): {shown}")
        self._window.restart()

    def save(self, export: str | None = None) -> str:
        """A checkpoint of the current step (``export``: with the HF model directory in that layout); every rank
        calls it."""
        trainer_state = {**asdict(self.state), "loss": float(self._last_loss), "schedule": self.schedule.state_dict(),
                         "rng": rng_state(), "stages": self.signature}
        self.latest = save_checkpoint(self.run_dir, self.state.global_step, self.model, self.optimizer,
                                      trainer_state, self.ckpt.keep_last, self.extra_writer, export, self.parallel)
        self._window.restart()
        return self.latest

    def _resume(self, path: str) -> None:
        saved = load_trainer_state(path)
        if saved["stages"] != self.signature:
            raise ValueError(f"--resume: checkpoint {path} was written by a run with stages {saved['stages']}, "
                             f"this config has {self.signature} (use another run.name to start a new run)")
        load_checkpoint(path, self.parallel, self.optimizer)
        self.state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__})
        self._last_loss = torch.tensor(saved["loss"])
        self.schedule.load_state_dict(saved["schedule"])
        set_rng_state(saved["rng"])

    def close(self) -> None:
        self.progress.close()


class _Window:
    """Device-side sums over the steps since the last metrics line; ``read`` is the one host read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.restart()

    def restart(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = self.tokens = 0
        self.flops = 0.0
        self.grad_norm = torch.zeros((), device=self.device)
        self.lr = 0.0
        self.start = time.perf_counter()

    def add(self, loss, metrics: dict, grad_norm, lr: float, tokens: int, flops: float) -> None:
        for key, value in {"loss": loss, **metrics}.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.grad_norm, self.lr = grad_norm, lr
        self.steps, self.tokens, self.flops = self.steps + 1, self.tokens + tokens, self.flops + flops

    def read(self) -> dict:
        values = torch.stack([*(v.double() for v in self.sums.values()), self.grad_norm.double()]).tolist()
        seconds = time.perf_counter() - self.start          # after the read: the device finished the window
        out = {key: v / self.steps for key, v in zip(self.sums, values)}
        out.update(lr=self.lr, grad_norm=values[-1], window_tokens=self.tokens, window_time_s=seconds,
                   tokens_per_s=self.tokens / seconds, flops=self.flops)
        self.restart()
        return out
