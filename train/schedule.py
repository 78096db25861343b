"""Learning-rate schedule: linear warmup, then cosine decay to a fraction of the peak (InternLM2: 10%).

Step ``s`` counts optimizer steps from 0 over the whole pretraining (all stages share one schedule, as InternLM2's
long-context phase is part of its single cosine run):
    s <  W:            lr = peak * (s + 1) / W
    W <= s < T:        p = (s - W) / max(1, T - 1 - W);  lr = floor + (peak - floor) * (1 + cos(pi * p)) / 2
    s >= T:            lr = floor,            with floor = min_ratio * peak
so the first step already trains (lr = peak / W), the peak is reached at step W - 1, and the floor exactly at
the last step T - 1.
"""
from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Sets the learning rate of every parameter group before each optimizer step; state = the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer | None, peak_lr: float, warmup_steps: int, total_steps: int,
                 min_ratio: float = 0.1):
        if not peak_lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {peak_lr}")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total steps must be an int >= 1, got {total_steps!r}")
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"optim.warmup_steps must be an int in [0, {total_steps}], got {warmup_steps!r}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {min_ratio}")
        self.optimizer = optimizer
        self.peak, self.warmup, self.total, self.floor = peak_lr, warmup_steps, total_steps, peak_lr * min_ratio
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if step >= self.total:
            return self.floor
        p = (step - self.warmup) / max(1, self.total - 1 - self.warmup)
        return self.floor + (self.peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * p))

    def apply(self) -> float:
        """Set the rate for the upcoming step (number ``step_count``) and return it."""
        lr = self.lr_at(self.step_count)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        return lr

    def step(self) -> None:
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "peak": self.peak, "warmup": self.warmup, "total": self.total,
                "floor": self.floor}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
