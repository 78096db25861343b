"""InternLM2Config: the model's hyper-parameters, presets, and the HF ``config.json`` (InternLM2 keys).

Sizes follow ``internlm2.md`` (the released HF configs of internlm/internlm2-*). ``head_dim`` is derived
(hidden_size / num_attention_heads) as in InternLM2's own config; a config.json naming a different head_dim
is refused rather than ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ROPE_SCALING_TYPES = ("linear", "dynamic")

# Keys of an InternLM2 config.json that carry no hyper-parameter of the math (bookkeeping, generation defaults).
_METADATA_KEYS = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "attn_implementation", "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "pretraining_tp",
}


@dataclass
class InternLM2Config:
    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    # None, or {"type": "linear" | "dynamic", "factor": float} as in InternLM2's config.json.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim (hidden_size / num_attention_heads = {self.head_dim}) must be even for RoPE")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)

    # ---------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_query_groups(self) -> int:
        """Query heads per KV head (g in the packed wqkv layout)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_size(self) -> int:
        """Output rows of the packed wqkv: (n_heads + 2 * n_kv_heads) * head_dim."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @classmethod
    def preset(cls, name: str) -> "InternLM2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
        return cls(**PRESETS[name])

    def num_parameters(self) -> int:
        """All parameters: input embedding, blocks, final norm and the (untied) output head."""
        h = self.hidden_size
        per_layer = self.qkv_size * h + self.num_attention_heads * self.head_dim * h + 3 * h * self.intermediate_size
        per_layer += 2 * h  # the two RMSNorm weights
        return 2 * self.vocab_size * h + self.num_hidden_layers * per_layer + h

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at causal document length ``seq_len``.

        6·N for the matmuls of all N parameters (2 forward, 4 backward), plus the attention scores and their
        weighted sum: per layer and head, QKᵀ and PV cost 2·D FLOPs each per (query, key) pair, a token of a
        causal document of length L attends to L/2 keys on average, and backward is twice forward:
        3 · 2 · 2·D · L/2 · n_heads · n_layers = 6·n_layers·n_heads·D·L.
        (The peer anchor counts the attention backward as 2.5× forward, i.e. 7·… instead of 6·….)
        """
        attention = 6 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6.0 * self.num_parameters() + attention

    # ---------------------------------------------------------------------------------------------
    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """config.json in InternLM2's HF layout (the keys of internlm/internlm2-*)."""
        d = {
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rms_norm_eps": self.rms_norm_eps,
            "initializer_range": self.initializer_range,
            "bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if dtype is not None:
            d["torch_dtype"] = dtype
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "InternLM2Config":
        """Read an InternLM2 config.json dict. Keys that change the math but that this model does not implement
        (biases, tied embeddings, another activation or head_dim) raise NotImplementedError."""
        if d.get("model_type", "internlm2") != "internlm2":
            raise ValueError(f"config.json has model_type {d.get('model_type')!r}, expected 'internlm2' "
                             "(Llama-layout directories are read by models.checkpoint)")
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act={d['hidden_act']!r}: only 'silu' (SwiGLU) is implemented")
        if d.get("bias", False):
            raise NotImplementedError("bias=True: InternLM2 has no linear biases and this model implements none")
        if d.get("tie_word_embeddings", False):
            raise NotImplementedError("tie_word_embeddings=True: InternLM2's output head is untied")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "head_dim" in d and d["head_dim"] is not None:
            derived = d["hidden_size"] // d["num_attention_heads"]
            if d["head_dim"] != derived:
                raise NotImplementedError(f"head_dim={d['head_dim']} differs from hidden_size / num_attention_heads "
                                          f"= {derived}; InternLM2 derives it")
        if "rope_parameters" in d and d["rope_parameters"]:  # transformers 5 style
            params = dict(d["rope_parameters"])
            kwargs.setdefault("rope_theta", params.pop("rope_theta", cls.rope_theta))
            if params.get("rope_type", params.get("type", "default")) != "default":
                kwargs.setdefault("rope_scaling", params)
        known = names | _METADATA_KEYS | {"hidden_act", "bias", "tie_word_embeddings", "head_dim", "rope_parameters"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NotImplementedError(f"config.json keys this model does not implement: {', '.join(unknown)}")
        return cls(**kwargs)


def _normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """{"type": ..., "factor": ...} from InternLM2's form or transformers' ("rope_type"); None for no scaling."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict like {{'type': 'dynamic', 'factor': 2.0}} or None, "
                         f"got {scaling!r}")
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise NotImplementedError(f"rope_scaling type {kind!r} is not implemented (choose from "
                                  f"{', '.join(ROPE_SCALING_TYPES)})")
    extra = set(scaling) - {"type", "rope_type", "factor", "rope_theta"}
    if extra:
        raise NotImplementedError(f"rope_scaling keys not implemented: {', '.join(sorted(extra))}")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1.0:
        raise ValueError(f"rope_scaling factor must be a number >= 1, got {factor!r}")
    return {"type": kind, "factor": float(factor)}


_COMMON = dict(vocab_size=92544, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-5)

PRESETS: dict[str, dict[str, Any]] = {
    # For tests: every kernel path at a size the Triton interpreter runs in seconds (head_dim 32, odd vocab and
    # intermediate sizes, a short max_position_embeddings so dynamic NTK is reachable).
    "micro": dict(vocab_size=101, hidden_size=128, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=10_000.0, rms_norm_eps=1e-5),
    # CPU-sized, the demo's model (configs/tiny_cpu.toml): 0.81M parameters with the byte tokenizer's 272-entry
    # vocabulary (the trainer sets vocab_size from its tokenizer; 512 here). Small enough that the copy curriculum
    # forms the induction circuit and the long-context stage teaches retrieval within minutes on 2 CPU cores;
    # 4 layers because the circuit formed in fewer steps than with 2 (docs/training.md).
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-5),
    # internlm2.md leaves 1.8B's scaling open ("none or dynamic 2.0"); we take dynamic 2.0 as for 7B. It only
    # matters beyond 32k tokens.
    "1_8b": dict(_COMMON, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, rope_scaling={"type": "dynamic", "factor": 2.0}),
    "7b": dict(_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, rope_scaling={"type": "dynamic", "factor": 2.0}),
    "20b": dict(_COMMON, hidden_size=6144, intermediate_size=16384, num_hidden_layers=48, num_attention_heads=48,
                num_key_value_heads=8, rope_scaling={"type": "dynamic", "factor": 3.0}),
}
