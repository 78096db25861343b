"""Building a run's model and optimizer from the config (shared by every stage)."""
from __future__ import annotations

import dataclasses

import torch

from train.config import ModelConfig
from train.data.packing import Batch
from train.parallel import Runtime


def model_config(model_cfg: ModelConfig, vocab_size: int | None = None, rope_theta: float | None = None):
    """The InternLM2Config of a run: the preset, then ``model.overrides``, then the tokenizer's vocab and the
    stage's RoPE base (the keys were checked when the config was loaded)."""
    from models import InternLM2Config

    changes = dict(model_cfg.overrides)
    if vocab_size is not None:
        changes["vocab_size"] = vocab_size
    if rope_theta:
        changes["rope_theta"] = float(rope_theta)
    return dataclasses.replace(InternLM2Config.preset(model_cfg.preset), **changes)


def build_model(config, runtime: Runtime, seed: int, init_from: str = "", checkpointing=False, compile: bool = False):
    """A fresh model (initialized from ``seed``), or one loaded from an HF directory (with ``config``'s RoPE base).
    ``compile``: torch.compile the forward in place (parameter names, hence checkpoints, do not change)."""
    from models import InternLM2ForCausalLM

    if init_from:
        model = InternLM2ForCausalLM.from_pretrained(init_from)
        if model.config.vocab_size < config.vocab_size:
            raise ValueError(f"model.init_from: its vocabulary ({model.config.vocab_size}) is smaller than the "
                             f"tokenizer's ({config.vocab_size})")
        model.set_rope_theta(config.rope_theta)
    else:
        # Initialization draws from its own seeded RNG so that building a model never moves the global one
        # (an uninterrupted run and a resumed run then see the same RNG stream).
        cuda = runtime.device.type == "cuda"
        with torch.random.fork_rng(devices=[runtime.device] if cuda else []), torch.device(runtime.device):
            torch.manual_seed(seed)
            model = InternLM2ForCausalLM(config)
    model.gradient_checkpointing = checkpointing
    model = model.to(runtime.device, runtime.dtype)
    if compile:
        model.compile()
    return model


def batch_flops(config, micro_batches: list[Batch]) -> float:
    """Training FLOPs of these micro-batches by the model's own count, per document length (attention grows with
    the length of each document, not of the packed row). Reads the host-side cu_seqlens."""
    total = 0.0
    for b in micro_batches:
        for length in (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist():
            total += length * config.flops_per_token(length)
    return total
