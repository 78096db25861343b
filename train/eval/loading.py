"""Loading an exported checkpoint for evaluation: the model on a device, with the tokenizer it was trained with."""
from __future__ import annotations

import sys

import torch

from models import InternLM2ForCausalLM
from models.checkpoint import read_config
from train.data.tokenizer import Tokenizer, load_export_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``device`` (lm-eval's CLI passes ``cuda:0`` by default), or CUDA when available, else CPU; a CUDA device
    asked for on a machine without one falls back to CPU with a note on stderr."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"internlm_kernels: device {device!r} asked for but CUDA is not available; running on CPU",
              file=sys.stderr)
        return torch.device("cpu")
    return dev


def load_export(model_dir: str, tokenizer: str | None = None, device: str | None = None,
                dtype: str = "auto") -> tuple[InternLM2ForCausalLM, Tokenizer, torch.device]:
    """(model in eval mode, its tokenizer, device) of an exported checkpoint directory."""
    dev = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    config, _ = read_config(model_dir)
    model = InternLM2ForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], device=dev).eval()
    return model, load_export_tokenizer(model_dir, config.vocab_size, tokenizer), dev
