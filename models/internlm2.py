"""InternLM2 on internlm_kernels: one readable file, every hot op through the library's public API.

The trunk runs over *packed* tokens: input_ids (T,) with cu_seqlens (B+1,) int32 marking the documents. Rotary
positions restart at 0 in each document and attention never crosses a document (varlen flash attention). A padded
(B, S) batch with an attention mask is packed first (only the valid tokens run) and unpacked at the end, so both
layouts run the same code and give the same numbers. Positions of a padded row count its valid tokens, so left and
right padding give the same result.

One block (pre-norm; the residual add is fused into the norms):
    x, r = rms_norm(h, residual=r)                     r: the residual stream, carried between norms
    q, k, v = qkv_rotary(wqkv(x))                      packed HF layout, per KV group: g query heads, 1 k, 1 v;
                                                       split and q, k rotated in one pass
    h = wo(attention(q, k, v))                         causal, per document, GQA
    x, r = rms_norm(h, residual=r)
    h = w2(swiglu(w1(x), w3(x)))
after the last block: rms_norm(h, residual=r) -> output head (or fused linear cross-entropy for the loss).

The file reads top-down: the causal LM and the score model, then the trunk, its block and the block's parts.
Packing of padded or packed inputs is in ``models.packing``, the per-forward contexts (packed, decode) in
``models.context`` and the decode of generation in ``models.serving`` / ``models.decode_step``.

Which implementation runs each op (reference / triton / ...) is chosen by internlm_kernels' backend switch
(``ik.use_backend`` or INTERNLM_KERNELS_BACKEND), so the switch changes the whole model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import internlm_kernels as ik
from internlm_kernels.checks import check_tensor

from . import checkpoint as ckpt
from .config import InternLM2Config
from .context import ForwardContext, PackedContext
from .packing import IGNORE_INDEX, PackedInputs, pack_inputs, reads_values, shift_labels
from .serving import generate

CHECKPOINTING_MODES = (False, True, "mlp")


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None      # scalar (or (T,)/(B, S) per target token with loss_reduction="none")
    logits: torch.Tensor | None = None    # (T, V) packed or (B, S, V) padded; None when only the fused loss ran
    logprobs: torch.Tensor | None = None  # (T,) / (B, S): log-prob of each target (0 where ignored), no loss


@dataclass
class ScoreOutput:
    values: torch.Tensor                  # (T,) packed or (B, S) padded, float32: the head at every token
    scores: torch.Tensor                  # (B,) float32: the value at the last token of each sequence


class _InternLM2Base(nn.Module):
    """Shared by the causal LM and the score model: the trunk, init, activation checkpointing, checkpoints."""

    config: InternLM2Config
    model: InternLM2Model

    @property
    def gradient_checkpointing(self) -> bool | str:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, mode: bool | str) -> None:
        self.model.gradient_checkpointing = mode

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Matrices ~ N(0, initializer_range), norm weights 1. With ``seed`` the draw is reproducible per device
        type; without, it comes from torch's global RNG."""
        generators: dict[torch.device, torch.Generator] = {}
        for p in self.parameters():
            if p.is_meta:
                continue
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            gen = None
            if seed is not None:
                gen = generators.get(p.device)
                if gen is None:
                    gen = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            p.normal_(0.0, self.config.initializer_range, generator=gen)

    def set_rope_theta(self, theta: float) -> None:
        """A new RoPE base on the same weights (InternLM2's long-context stage raises it): only the cos/sin tables
        and the config change, so optimizer state, DDP wrappers and checkpoints stay valid."""
        self.model.set_rope_theta(theta)
        self.config = self.model.config

    def _pack(self, input_ids, cu_seqlens, attention_mask, position_ids, max_seqlen=None) -> PackedInputs:
        return pack_inputs(input_ids, cu_seqlens, attention_mask, position_ids, self.config.vocab_size, max_seqlen)

    def save_pretrained(self, path, dtype: torch.dtype | None = None, layout: str = "internlm2",
                        max_shard_bytes: int = ckpt.DEFAULT_MAX_SHARD_BYTES) -> None:
        """Write config.json + safetensors (sharded above ``max_shard_bytes``) atomically. ``layout="llama"``
        writes transformers' LlamaForCausalLM layout (wqkv split into q/k/v_proj), loadable with
        ``transformers.LlamaForCausalLM.from_pretrained(path)``."""
        ckpt.save_model(self, path, dtype=dtype, layout=layout, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None):
        """Load an HF-layout directory (InternLM2 or Llama layout; single or sharded safetensors). Every name and
        shape is checked before any weight is read; ``dtype`` converts, ``device`` places."""
        return ckpt.load_model(cls, path, dtype=dtype, device=device)


class InternLM2ForCausalLM(_InternLM2Base):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        self.model = InternLM2Model(config)
        self.output = ik.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_reduction: str = "mean",
                return_logits: bool = False, max_seqlen: int | None = None,
                logprobs_temperature: float | None = None) -> CausalLMOutput:
        """Packed input_ids (T,) with cu_seqlens (B+1,) int32, or padded (B, S) with attention_mask (B, S).

        labels: same shape as input_ids, HF convention (-100 ignored); the shift by one happens inside each
        sequence. With labels the loss comes from fused linear cross-entropy and logits are None unless
        ``return_logits``. ``loss_reduction``: "mean" over non-ignored targets, "sum", or "none" (per token, in
        the layout of input_ids). ``max_seqlen``: the longest sequence of packed input when the caller knows it
        on the host (the trainer's packer does); None reads it from cu_seqlens, a device-to-host sync.
        ``logprobs_temperature``: with labels, ``logprobs`` = log softmax(logits / temperature) of each target
        (``ik.fused_linear_logprobs``, no logits) instead of the loss: PPO's action log-probs through the model's
        own forward, so data-parallel wrappers (DDP, ZeRO, FSDP2) see the call.
        """
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        packed = self._pack(input_ids, cu_seqlens, attention_mask, position_ids, max_seqlen)
        hidden = self.model(packed.input_ids, PackedContext(packed, self.model.rotary))   # (T, hidden)
        out = CausalLMOutput()
        if labels is not None:
            check_tensor("labels", labels, dtypes=(torch.int64, torch.int32), device=input_ids.device)
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            targets = shift_labels(packed.pack(labels).long(), packed.cu_seqlens)   # (T,)
            if logprobs_temperature is not None:
                logp = ik.fused_linear_logprobs(hidden, self.output.weight, targets, logprobs_temperature)
                out.logprobs = packed.unpack(logp)
                return out
            loss = ik.fused_linear_cross_entropy(hidden, self.output.weight, targets, ignore_index=IGNORE_INDEX,
                                                 reduction=loss_reduction)
            out.loss = packed.unpack(loss) if loss_reduction == "none" else loss
        if labels is None or return_logits:
            out.logits = packed.unpack(self.output(hidden))                   # (T, V) or (B, S, V)
        return out

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop_token_ids=(2, 92542), generator: torch.Generator | list[torch.Generator] | None = None
                 ) -> list[list[int]]:
        """KV-cache generation for a batch of prompts of unequal length; returns the new tokens of each prompt
        (ending with the stop token when one was produced). temperature 0 is greedy; else top-p sampling with
        ``generator`` (one for the batch, or one per prompt). One call of ``models.serving.generate``."""
        completions = generate(self, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                               stop_token_ids=stop_token_ids, generator=generator)
        return [c.tokens for c in completions]


class InternLM2ForScore(_InternLM2Base):
    """The trunk with a scalar head (hidden -> 1): the reward model and the PPO critic.

    ``values`` is the head at every token; ``scores`` reads it at the last token of each sequence (where the
    reward token is appended). ``from_pretrained`` of a causal-LM directory loads the trunk, drops the LM head
    and initializes ``score_head`` fresh.
    """

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        self.model = InternLM2Model(config)
        self.score_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, max_seqlen: int | None = None) -> ScoreOutput:
        """``max_seqlen``: as in the causal LM (host-known, so packed input costs no device read)."""
        packed = self._pack(input_ids, cu_seqlens, attention_mask, position_ids, max_seqlen)
        lengths = packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]
        if reads_values(lengths) and bool((lengths == 0).any()):
            raise ValueError("every sequence needs at least one token to be scored (found an empty one)")
        hidden = self.model(packed.input_ids, PackedContext(packed, self.model.rotary))   # (T, hidden)
        values = self.score_head(hidden).squeeze(-1).float()                             # (T,)
        scores = values[packed.cu_seqlens[1:].long() - 1]                                # (B,)
        return ScoreOutput(values=packed.unpack(values), scores=scores)


# --------------------------------------------------------------------------------------------------
# The trunk and its parts
# --------------------------------------------------------------------------------------------------
class InternLM2Model(nn.Module):
    """Embeddings, blocks and the final norm; ``forward`` returns the normalized hidden states."""

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = ik.nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = self._rotary(config)
        self._checkpointing: bool | str = False

    @staticmethod
    def _rotary(config: InternLM2Config) -> ik.nn.RotaryEmbedding:
        """cos/sin tables (theta, linear or dynamic NTK), cached per length; no state in checkpoints."""
        scaling = config.rope_scaling or {}
        return ik.nn.RotaryEmbedding(config.head_dim, config.rope_theta, scaling.get("type"),
                                     scaling.get("factor", 1.0), config.max_position_embeddings)

    def set_rope_theta(self, theta: float) -> None:
        self.config = dataclasses.replace(self.config, rope_theta=float(theta))
        self.rotary = self._rotary(self.config)

    @property
    def gradient_checkpointing(self) -> bool | str:
        """False; True: recompute each block in backward (only block inputs stay alive); "mlp": recompute only
        the SwiGLU activation (the largest saved tensor, cheap to recompute)."""
        return self._checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, mode: bool | str) -> None:
        if not (isinstance(mode, bool) or mode == "mlp"):
            raise ValueError(f"gradient_checkpointing must be one of {CHECKPOINTING_MODES}, got {mode!r}")
        self._checkpointing = mode if isinstance(mode, bool) else "mlp"
        for layer in self.layers:
            layer.feed_forward.recompute_activation = mode == "mlp"

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids (N,) -> hidden (N, hidden_size); ``ctx`` supplies rotary and attention (PackedContext, or
        the paged decode context of models.serving)."""
        h = self.tok_embeddings(input_ids)                               # (N, hidden)
        residual = None
        for layer in self.layers:
            if self._checkpointing is True and torch.is_grad_enabled():
                h, residual = checkpoint(layer, h, residual, ctx, use_reentrant=False)
            else:
                h, residual = layer(h, residual, ctx)
        return self.norm(h, residual=residual)

class DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.attention_norm = ik.nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = ik.nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext):
        """h: the previous block's output, residual: the stream before it (None at the first block)."""
        x, residual = self.attention_norm(h, residual=residual, prenorm=True)
        h = self.attention(x, ctx)
        x, residual = self.ffn_norm(h, residual=residual, prenorm=True)
        return self.feed_forward(x), residual

class Attention(nn.Module):
    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.wqkv = ik.nn.Linear(config.hidden_size, config.qkv_size, bias=False)
        self.wo = ik.nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        N = x.shape[0]                                                   # tokens (packed) or sequences (decode)
        q, k, v = ctx.qkv(self.wqkv(x), self.n_kv_heads, self.head_dim)  # (N, Hq, D), (N, Hkv, D) x2, rotated
        out = ctx.attend(self.layer_idx, q, k, v)                        # (N, Hq, D)
        return self.wo(out.reshape(N, self.n_heads * self.head_dim))

class FeedForward(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.w1 = ik.nn.Linear(config.hidden_size, config.intermediate_size, bias=False)   # gate
        self.w3 = ik.nn.Linear(config.hidden_size, config.intermediate_size, bias=False)   # up
        self.w2 = ik.nn.Linear(config.intermediate_size, config.hidden_size, bias=False)   # down
        # Recompute silu(gate) * up in backward instead of keeping it for w2's weight gradient: saves
        # tokens x intermediate activations per layer for one elementwise pass.
        self.recompute_activation = False

    def _down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.w2(ik.swiglu(gate, up))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x), self.w3(x)                                # (N, intermediate) each
        if self.recompute_activation and torch.is_grad_enabled():
            return checkpoint(self._down, gate, up, use_reentrant=False)
        return self._down(gate, up)
