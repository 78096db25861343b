"""internlm-kernels: Triton and CUDA kernels for training InternLM2-class models.

Drop-in for the calls people make today: flash-attn's varlen attention, rms_norm and rotary, Liger's
fused linear cross-entropy, torch's fused AdamW. See README.md for the kernel table.
"""
from . import backend, checks, integrations, nn, reference
from .backend import use_backend
from .checks import debug_checks
from .ops.attention import flash_attn_func, flash_attn_varlen_func
from .ops.attention_packed import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    pad_input,
    unpad_input,
)
from .ops.cross_entropy import cross_entropy, fused_linear_cross_entropy
from .ops.kvcache import KVCacheOverflowError, flash_attn_with_kvcache
from .ops.linear import linear
from .ops.linear_logprobs import fused_linear_logprobs
from .ops.rms_norm import rms_norm
from .ops.rotary import apply_rotary_emb, qkv_rotary, rotary_cos_sin
from .ops.swiglu import swiglu, swiglu_packed
from .optim import FusedAdamW, clip_grad_norm_

__version__ = "0.1.0"

__all__ = [
    "flash_attn_varlen_func", "flash_attn_func", "rms_norm", "swiglu", "swiglu_packed", "apply_rotary_emb",
    "qkv_rotary", "rotary_cos_sin",
    "fused_linear_cross_entropy", "FusedAdamW", "clip_grad_norm_", "use_backend", "backend", "nn", "reference",
    "integrations",
    "checks", "debug_checks",
    "flash_attn_with_kvcache", "fused_linear_logprobs",
    # drop-in surfaces of flash-attn and Liger (issue 15)
    "cross_entropy", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func", "unpad_input", "pad_input",
    "linear", "KVCacheOverflowError",
]
