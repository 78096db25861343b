"""The Learner: one trained model and everything its optimizer step needs, the same for every stage.

    model        the plain model (evaluation, generation, export); ``parallel.model`` is what a loss function calls
    parallel     how the model is spread over the ranks (train/parallel.py: ddp, zero1, zero2, fsdp, with tp)
    optimizer    FusedAdamW over what this rank updates, fp32 master weights and moments when the parameters
                 are 16-bit
    schedule     warmup + cosine over ``total_steps`` (train/schedule.py); none: the rate stays ``optim.lr``

One ``step(micro_batches, loss_fn)``:
    lr = schedule(step)
    for each micro-batch:  loss_sum, n, metrics = loss_fn(parallel.model, batch);  loss_sum.backward()
                           (gradient communication only after the last one: parallel.no_sync)
    totals = all-reduce(loss sums, n, metric sums)           one device tensor over the data-parallel ranks
    gradients *= dp / N   (N = the global targets)           parallel.finish_gradients, on the device
    grad_norm = clip(grad_clip);  optimizer.step()
so the gradient is that of (sum of the global batch's losses) / N whatever the accumulation and the world size.
A loss that is already a mean returns n = 1 (PPO's policy and value losses, the reward model's pair loss): its
gradient is then multiplied by exactly 1 in one process. Nothing is read on the host.

The pretraining / SFT / reward Trainer composes one Learner; PPO trains two (actor, critic) and refreshes the reward
model through a third. ``state_dict`` is the {"model", "optimizer"} state for torch.distributed.checkpoint, keyed
by parameter name and sharded as the mode holds it, so a checkpoint saved on N ranks loads on M.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

import internlm_kernels as ik
from train.config import OptimConfig
from train.parallel import Runtime, parallelize
from train.schedule import WarmupCosine

# (model, micro-batch) -> (summed loss: scalar tensor, its number of targets: tensor or int,
# {name: summed value}: reported as the sum over the global batch divided by the targets)
LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, "torch.Tensor | int", dict[str, torch.Tensor]]]


def optimizer_factory(optim: OptimConfig, dtype: torch.dtype):
    """The one optimizer builder: FusedAdamW over the given parameters, fp32 master weights and moments when the
    parameters are 16-bit."""
    def make(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
        return ik.FusedAdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, master_weights=dtype != torch.float32)
    return make


@dataclass
class StepResult:
    """One optimizer step's outcome, all on the device."""
    totals: torch.Tensor              # [loss sum, targets, *metric sums] over the data-parallel ranks (float64)
    keys: list[str]                   # the metric names of totals[2:]
    grad_norm: torch.Tensor           # before clipping
    lr: float

    @property
    def loss(self) -> torch.Tensor:
        """The global mean loss."""
        return self.totals[0] / self.totals[1]

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Each metric's global sum divided by the global targets."""
        return {k: v / self.totals[1] for k, v in zip(self.keys, self.totals[2:])}


class Learner:
    def __init__(self, model: nn.Module, runtime: Runtime, optim: OptimConfig, total_steps: int = 0):
        """``total_steps`` > 0: warmup + cosine over that many steps (``optim.warmup_steps``,
        ``optim.min_lr_ratio``); 0: a constant ``optim.lr``."""
        self.runtime, self.optim = runtime, optim
        self.model = model
        self.parallel = parallelize(model, runtime)
        self.optimizer = self.parallel.build_optimizer(optimizer_factory(optim, runtime.dtype))
        self.schedule = (WarmupCosine(self.optimizer, optim.lr, optim.warmup_steps, total_steps, optim.min_lr_ratio)
                         if total_steps else None)

    def reset_optimizer(self) -> None:
        """Fresh moments (and masters, from the current parameters): a reward-model refresh, or an actor that
        restarts from the SFT policy."""
        self.parallel.reset_optimizer(self.optimizer)

    def load_weights(self, state: dict) -> None:
        """The model's parameters <- ``state`` (a state dict laid out like the model's: the reference's, for an
        actor that restarts from the SFT policy)."""
        self.parallel.load_weights(state)

    def step(self, micro_batches: list, loss_fn: LossFn) -> StepResult:
        """One optimizer step over this rank's ``micro_batches`` (module docstring)."""
        lr = self.schedule.apply() if self.schedule is not None else self.optimizer.param_groups[0]["lr"]
        device = self.runtime.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        targets = torch.zeros((), dtype=torch.float64, device=device)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext() if i + 1 == len(micro_batches) else self.parallel.no_sync()
            with sync:
                loss, n, metrics = loss_fn(self.parallel.model, batch)
                loss.float().backward()
            loss_sum += loss.detach().double()
            targets += n
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.detach().double()
        totals = self.parallel.all_reduce_(torch.stack([loss_sum, targets, *sums.values()]))
        self.parallel.finish_gradients(totals[1])
        grad_norm = self.parallel.clip_grad_norm_(self.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.schedule is not None:
            self.schedule.step()
        return StepResult(totals, list(sums), grad_norm, lr)

    def plain_model(self) -> nn.Module:
        """A full, unsharded copy of the model when the mode shards it (collective: every rank calls), else the
        model itself: what one rank alone can run (generation)."""
        return self.parallel.plain_model()

    def state_dict(self, optimizer: bool = True) -> dict:
        """{"model", "optimizer"} (``optimizer=False``: {"model"}) for torch.distributed.checkpoint."""
        if optimizer:
            return self.parallel.state_dict(self.optimizer)
        return {"model": self.parallel.model_state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """After ``dcp.load`` filled ``state`` (from ``state_dict()``): the live model and optimizer follow it."""
        if "optimizer" in state:
            self.parallel.load_state_dict(self.optimizer, state)
        else:
            self.parallel.load_model_state_dict(state["model"])
