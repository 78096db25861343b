"""The training loop shared by every stage (pretraining now; SFT, reward and PPO stages reuse it).

One optimizer step:
    lr = schedule(step)
    for each micro-batch of this rank:  loss_sum = model(ids, cu_seqlens, labels, loss_reduction="sum")
                                        (loss_sum * world / global_targets).backward()   # DDP averages over ranks
    grad_norm = clip_grad_norm_(params, grad_clip)
    FusedAdamW.step()
Dividing the summed loss by the number of target tokens of the whole global batch (all micro-batches, all ranks)
makes the gradient the token-mean over the global batch, whatever the accumulation and the world size.

Precision: on CUDA the parameters are bfloat16 and FusedAdamW keeps fp32 master weights and moments
(``master_weights=True``); on CPU everything is float32 (bf16 matmuls are slow there).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

import internlm_kernels as ik

from .config import ModelConfig, OptimConfig, RunConfig
from .data import Batch


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_runtime(run: RunConfig) -> Runtime:
    """Device, dtype and (under torchrun) the process group: NCCL on CUDA, gloo on CPU."""
    if run.threads:
        torch.set_num_threads(run.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device = 'cuda' but no CUDA device is available")
    use_cuda = run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(run.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if use_cuda else torch.float32
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(device, dtype, rank, world, local_rank)


def model_config(model_cfg: ModelConfig, vocab_size: int | None = None, rope_theta: float | None = None):
    """The InternLM2Config of a run: the preset, then ``model.overrides``, then the tokenizer's vocab and the
    stage's RoPE base."""
    from models import InternLM2Config

    config = InternLM2Config.preset(model_cfg.preset)
    fields = {f.name for f in dataclasses.fields(config)}
    for key in model_cfg.overrides:
        if key not in fields:
            raise ValueError(f"model.overrides: {key!r} is not an InternLM2Config field ({', '.join(sorted(fields))})")
    changes = dict(model_cfg.overrides)
    if vocab_size is not None:
        changes["vocab_size"] = vocab_size
    if rope_theta:
        changes["rope_theta"] = float(rope_theta)
    return dataclasses.replace(config, **changes)


def build_model(config, runtime: Runtime, seed: int, init_from: str = "", state_dict=None, checkpointing=False):
    """A fresh model (initialized from ``seed``), or one loaded from an HF directory, or ``state_dict`` copied in."""
    from models import InternLM2ForCausalLM

    if init_from:
        model = InternLM2ForCausalLM.from_pretrained(init_from)
        if model.config.vocab_size < config.vocab_size:
            raise ValueError(f"model.init_from: its vocabulary ({model.config.vocab_size}) is smaller than the "
                             f"tokenizer's ({config.vocab_size})")
        if model.config.rope_theta != config.rope_theta:  # a stage's RoPE base applies to a loaded model too
            loaded = model.state_dict()
            model = InternLM2ForCausalLM(dataclasses.replace(model.config, rope_theta=config.rope_theta))
            model.load_state_dict(loaded)
    else:
        # Initialization draws from its own seeded RNG so that building a model never moves the global one
        # (an uninterrupted run and a resumed run then see the same RNG stream).
        cuda = runtime.device.type == "cuda"
        with torch.random.fork_rng(devices=[runtime.device] if cuda else []), torch.device(runtime.device):
            torch.manual_seed(seed)
            model = InternLM2ForCausalLM(config)
        if state_dict is not None:
            model.load_state_dict(state_dict)
    model.gradient_checkpointing = checkpointing
    return model.to(runtime.device, runtime.dtype)


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, runtime: Runtime) -> torch.optim.Optimizer:
    return ik.FusedAdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                         weight_decay=optim.weight_decay, master_weights=runtime.dtype != torch.float32)


def wrap_ddp(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    if not runtime.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _all_reduce_sum(values: Sequence[float], runtime: Runtime) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    if runtime.distributed:
        dist.all_reduce(t)
    return t.tolist()


@dataclass
class StepStats:
    loss: float          # token-mean cross-entropy over the global batch
    grad_norm: float     # before clipping
    lr: float
    targets: int         # target tokens in the global batch


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule, micro_batches: list[Batch],
               grad_clip: float, runtime: Runtime) -> StepStats:
    """One optimizer step over this rank's micro-batches (see the module docstring)."""
    lr = schedule.apply()
    (global_targets,) = _all_reduce_sum([sum(b.num_targets for b in micro_batches)], runtime)
    if global_targets <= 0:
        raise ValueError("the global batch has no target tokens (every sequence has length 1)")
    scale = runtime.world / global_targets
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    for i, batch in enumerate(micro_batches):
        batch = batch.to(runtime.device)
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not runtime.distributed else model.no_sync()
        with sync:
            out = model(batch.input_ids, batch.cu_seqlens, labels=batch.labels, loss_reduction="sum")
            (out.loss.float() * scale).backward()
        loss_sum += out.loss.detach().double()
    (total,) = _all_reduce_sum([loss_sum.item()], runtime)
    loss = total / global_targets
    if not torch.isfinite(torch.tensor(loss)):
        raise FloatingPointError(f"the loss is {loss} at step {schedule.step_count}: lower optim.lr or check the data")
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = ik.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    return StepStats(loss=loss, grad_norm=float(grad_norm), lr=lr, targets=int(global_targets))


def batch_flops(config, micro_batches: list[Batch]) -> float:
    """Training FLOPs of these micro-batches by the model's own count, per document length (attention grows with
    the length of each document, not of the packed row)."""
    total = 0.0
    for b in micro_batches:
        for length in (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist():
            total += length * config.flops_per_token(length)
    return total
