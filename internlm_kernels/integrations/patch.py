"""Patch transformers models with our kernels: ``patch(model_or_class, rms_norm=True, rope=True, swiglu=True,
fused_linear_cross_entropy=True, attention=True)``.

Works on a loaded model (its modules are patched one by one; other models are untouched, except for the rotary
function below) and on a class before loading (the family's classes are patched: every model of the family built
afterwards, or already built, runs our kernels). What each switch replaces, per family:

  rms_norm      every RMSNorm module's forward -> ``ik.rms_norm`` with the family's numerics (Llama casting: the
                normalized row is rounded before the weight; Gemma2: ``1 + w``, all in fp32); and the decoder
                layer's forward, so that the residual add after attention is fused into the next norm
                (post_attention_layernorm; Gemma2: pre_feedforward_layernorm; InternLM2: ffn_norm)
  rope          the modeling module's ``apply_rotary_pos_emb`` -> ``ik.apply_rotary_emb`` over the per-token
                cos/sin the model computed (so every RoPE scaling type and padding-free position restarts work).
                This is a module-level function: it changes every model of the family in the process, as Liger's
                patch does
  swiglu        the MLP forward -> ``down(ik.swiglu(gate(x), up(x)))`` when the MLP's activation is SiLU (Gemma2's
                is GeLU-tanh: its MLP stays as it is)
  fused_linear_cross_entropy
                the causal-LM forward: with ``labels`` the loss is ``ik.fused_linear_cross_entropy`` of the last
                hidden states and the output embedding (Gemma2's final logit softcap included), the logits are
                never materialized and ``logits`` is None (pass ``skip_logits=False`` to get both)
  attention     transformers families: ``attn_implementation="internlm_kernels"`` (our varlen flash attention;
                padding-free packing through restarting ``position_ids`` as DataCollatorWithFlattening makes);
                InternLM2's remote code, which has no attention interface: its attention module's forward

``unpatch()`` undoes every class-level and module-level change (instance patches stay with their instances).
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import torch

from ..ops.cross_entropy import fused_linear_cross_entropy as _fused_linear_cross_entropy
from ..ops.rms_norm import rms_norm as _rms_norm
from ..ops.rotary import apply_rotary_emb as _apply_rotary_emb
from ..ops.swiglu import swiglu as _swiglu


@dataclass(frozen=True)
class Family:
    """How one model family names its parts (class names in its modeling module)."""

    name: str
    pretrained: str              # the family's PreTrainedModel base class: how a model or class is recognized
    norm: str
    mlp: str
    decoder: str                 # the decoder layer, whose forward is replaced to fuse a residual add into a norm
    decoder_forward: str         # which replacement: "llama" (pre-norm), "gemma2" (sandwich norms), "internlm2"
    norm_offset: float = 0.0     # Gemma: the weight is stored as w - 1
    casting_mode: str = "llama"
    remote_code: bool = False    # InternLM2's trust_remote_code model (no transformers attention interface)
    attention: str = ""          # the remote model's attention class


FAMILIES = {
    "llama": Family("llama", "LlamaPreTrainedModel", "LlamaRMSNorm", "LlamaMLP", "LlamaDecoderLayer", "llama"),
    "mistral": Family("mistral", "MistralPreTrainedModel", "MistralRMSNorm", "MistralMLP", "MistralDecoderLayer",
                      "llama"),
    "qwen2": Family("qwen2", "Qwen2PreTrainedModel", "Qwen2RMSNorm", "Qwen2MLP", "Qwen2DecoderLayer", "llama"),
    "qwen3": Family("qwen3", "Qwen3PreTrainedModel", "Qwen3RMSNorm", "Qwen3MLP", "Qwen3DecoderLayer", "llama"),
    "gemma2": Family("gemma2", "Gemma2PreTrainedModel", "Gemma2RMSNorm", "Gemma2MLP", "Gemma2DecoderLayer", "gemma2",
                     norm_offset=1.0, casting_mode="gemma"),
    "internlm2": Family("internlm2", "InternLM2PreTrainedModel", "InternLM2RMSNorm", "InternLM2MLP",
                        "InternLM2DecoderLayer", "internlm2", remote_code=True, attention="InternLM2Attention"),
}
SUPPORTED = tuple(FAMILIES)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def patch(model_or_class, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
          fused_linear_cross_entropy: bool = True, attention: bool = True):
    """Run a transformers model (instance, or class before loading) on our kernels; returns its argument.

    Supported: transformers' Llama, Mistral, Qwen2, Qwen3, Gemma2 and InternLM2's remote-code model. Any other
    raises ValueError naming it and the supported list.
    """
    is_class = isinstance(model_or_class, type)
    cls = model_or_class if is_class else type(model_or_class)
    family, base = _family_of(cls)
    modeling = sys.modules[base.__module__]
    for flag, value in (("rms_norm", rms_norm), ("rope", rope), ("swiglu", swiglu),
                        ("fused_linear_cross_entropy", fused_linear_cross_entropy), ("attention", attention)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be a bool, got {value!r}")

    if rope:
        _set(modeling, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    # (class name, make(original forward) -> replacement forward); the original serves the cases a replacement
    # leaves to the model (a non-SiLU MLP, the remote attention's KV-cache path).
    targets = []
    if rms_norm:
        norm_forward = _norm_forward(family.norm_offset, family.casting_mode)
        targets.append((family.norm, lambda original: norm_forward))
        decoder_forward = _DECODER_FORWARDS[family.decoder_forward]
        targets.append((family.decoder, lambda original: decoder_forward))
    if swiglu:
        targets.append((family.mlp, _mlp_forward))
    if attention and family.remote_code:
        from .patch_internlm2 import make_attention_forward
        targets.append((family.attention, make_attention_forward))
    for name, make in targets:
        owner = getattr(modeling, name)
        if is_class:
            # the class and its subclasses with their own forward (InternLM2's Sdpa / FlashAttention2 variants)
            for klass in _with_subclasses(owner):
                if "forward" in vars(klass):
                    _set(klass, "forward", make(_unpatched(vars(klass)["forward"])))
        else:
            for module in model_or_class.modules():
                if isinstance(module, owner):
                    module.forward = types.MethodType(make(_unpatched(type(module).forward)), module)

    if fused_linear_cross_entropy and _is_causal_lm(cls):
        if is_class:
            _set(cls, "forward", causal_lm_forward)
        else:
            model_or_class.forward = types.MethodType(causal_lm_forward, model_or_class)
    if attention and not family.remote_code:
        from .transformers import NAME, register
        register()
        if is_class:
            _set(base, "__init__", _init_with_our_attention(base))
        else:
            model_or_class.set_attn_implementation(NAME)
    return model_or_class


def _family_of(cls: type) -> tuple[Family, type]:
    for klass in cls.__mro__:
        for family in FAMILIES.values():
            if klass.__name__ == family.pretrained:
                return family, klass
    raise ValueError(f"patch() does not support {cls.__name__} (module {cls.__module__}); supported architectures: "
                     f"{', '.join(SUPPORTED)}")


def _with_subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _with_subclasses(sub)
    return found


def _is_causal_lm(cls: type) -> bool:
    return cls.__name__.endswith("ForCausalLM")


# Class- and module-level changes, for unpatch(): (owner, attribute, had it in its own __dict__, old value).
_CHANGES: list[tuple[object, str, bool, object]] = []


def _set(owner, name: str, value) -> None:
    had = name in vars(owner)
    _CHANGES.append((owner, name, had, vars(owner).get(name)))
    setattr(owner, name, value)


def unpatch() -> None:
    """Undo every class-level and module-level change made by patch() (models patched as instances keep theirs)."""
    while _CHANGES:
        owner, name, had, old = _CHANGES.pop()
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)


def _init_with_our_attention(base: type):
    from .transformers import NAME
    original = _unpatched(base.__init__)

    def __init__(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        self.config._attn_implementation = NAME
    __init__._ik_original = original
    return __init__


# --------------------------------------------------------------------------------------------------
# Replacements
# --------------------------------------------------------------------------------------------------
def _norm_eps(module) -> float:
    eps = getattr(module, "variance_epsilon", None)
    return module.eps if eps is None else eps


def _norm_forward(offset: float, casting_mode: str):
    def forward(self, hidden_states):
        return _rms_norm(hidden_states, self.weight, _norm_eps(self), offset=offset, casting_mode=casting_mode)
    return forward


_SILU = ("SiLU", "SiLUActivation")


def _unpatched(forward):
    """The forward a replacement wraps: patching a patched class again must not wrap our own forward."""
    return getattr(forward, "_ik_original", forward)


def _mlp_forward(original):
    def forward(self, x):
        if type(self.act_fn).__name__ not in _SILU:
            return original(self, x)  # not a SwiGLU MLP (e.g. Gemma2's GeLU-tanh)
        if hasattr(self, "gate_proj"):
            return self.down_proj(_swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.w2(_swiglu(self.w1(x), self.w3(x)))  # InternLM2: w1 gate, w3 up, w2 down
    forward._ik_original = original
    return forward


def _llama_decoder_forward(self, hidden_states, **kwargs):
    """transformers' pre-norm decoder layer with the residual add after attention fused into the second norm."""
    residual = hidden_states
    hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    norm = self.post_attention_layernorm
    hidden_states, residual = _rms_norm(hidden_states, norm.weight, _norm_eps(norm), residual=residual, prenorm=True,
                                        casting_mode="llama")
    return residual + self.mlp(hidden_states)


def _gemma2_decoder_forward(self, hidden_states, **kwargs):
    """Gemma2's sandwich-norm decoder layer with the residual add after attention fused into
    pre_feedforward_layernorm (x + post_attn_norm(attn), then normalized, in one pass)."""
    residual = hidden_states
    hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    hidden_states = self.post_attention_layernorm(hidden_states)
    norm = self.pre_feedforward_layernorm
    hidden_states, residual = _rms_norm(hidden_states, norm.weight, _norm_eps(norm), residual=residual, prenorm=True,
                                        offset=1.0, casting_mode="gemma")
    return residual + self.post_feedforward_layernorm(self.mlp(hidden_states))


def _internlm2_decoder_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                               output_attentions=False, use_cache=False, **kwargs):
    """The remote InternLM2DecoderLayer's forward (same tuple out) with the residual add fused into ffn_norm."""
    residual = hidden_states
    hidden_states, attn_weights, present = self.attention(
        hidden_states=self.attention_norm(hidden_states), attention_mask=attention_mask, position_ids=position_ids,
        past_key_value=past_key_value, output_attentions=output_attentions, use_cache=use_cache, **kwargs)
    norm = self.ffn_norm
    hidden_states, residual = _rms_norm(hidden_states, norm.weight, _norm_eps(norm), residual=residual, prenorm=True,
                                        casting_mode="llama")
    outputs = (residual + self.feed_forward(hidden_states),)
    if output_attentions:
        outputs += (attn_weights,)
    if use_cache:
        outputs += (present,)
    return outputs


_DECODER_FORWARDS = {"llama": _llama_decoder_forward, "gemma2": _gemma2_decoder_forward,
                     "internlm2": _internlm2_decoder_forward}


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """transformers' rotate-half RoPE on our kernel. q (B, Hq, S, D) and k (B, Hkv, S, D) with unsqueeze_dim=1
    ((B, S, H, D) with 2); cos/sin (B or 1, S, rd) per token, or (seqlen, rd) tables indexed by position_ids (older
    remote code). The first rd features rotate; cos/sin are [c | c] halves, as every family here builds them."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    if unsqueeze_dim not in (1, 2):
        raise NotImplementedError(f"unsqueeze_dim={unsqueeze_dim}: q/k must be (B, H, S, D) (1) or (B, S, H, D) (2)")
    return _rotate(q, cos, sin, unsqueeze_dim), _rotate(k, cos, sin, unsqueeze_dim)


def _rotate(x, cos, sin, head_axis: int):
    xs = x.transpose(1, 2) if head_axis == 1 else x          # (B, S, H, D): a contiguous view for transformers' q/k
    B, S, H, D = xs.shape
    half = cos.shape[-1] // 2
    # One table row per token: the packed (1, B·S) sequence at positions 0..B·S-1 reads row t for token t.
    cos_t = cos[..., :half].expand(B, S, half).reshape(B * S, half)
    sin_t = sin[..., :half].expand(B, S, half).reshape(B * S, half)
    out = _apply_rotary_emb(xs.reshape(1, B * S, H, D), cos_t, sin_t).view(B, S, H, D)
    return out.transpose(1, 2) if head_axis == 1 else out


def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, logits_to_keep=0,
                      skip_logits=None, return_dict=None, **kwargs):
    """The causal-LM forward with the loss from ``ik.fused_linear_cross_entropy``: with ``labels`` (and
    ``skip_logits`` not False) the (tokens, vocab) logits are never formed and ``logits`` is None. The loss is
    transformers' ForCausalLMLoss: labels shifted left (or ``shift_labels`` as given), ``ignore_index`` -100, mean
    over the counted tokens, or sum / ``num_items_in_batch`` when the Trainer passes it."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    hidden = outputs[0]
    if isinstance(logits_to_keep, int):
        hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
    else:  # positions to keep, as transformers' slice_logits_to_keep reads a tensor
        from transformers.modeling_utils import slice_logits_to_keep
        hidden = slice_logits_to_keep(hidden, logits_to_keep)
    head = self.get_output_embeddings()
    softcap = getattr(self.config, "final_logit_softcapping", None) or 0.0
    have_labels = labels is not None or shift_labels is not None
    if skip_logits is None:
        skip_logits = have_labels
    if skip_logits and not have_labels:
        raise ValueError("skip_logits=True needs labels (or shift_labels): without them there is nothing to return")

    loss = logits = None
    if have_labels:
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        target = shift_labels.to(hidden.device).reshape(-1)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = _fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, target,
                                           bias=head.bias, ignore_index=ignore_index, reduction=reduction,
                                           softcap=float(softcap))
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
    if not skip_logits:
        logits = head(hidden)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
    if isinstance(outputs, tuple):
        extra = {}
    else:  # the inner model's cache / hidden states / attentions, under the names this transformers uses
        fields = CausalLMOutputWithPast.__dataclass_fields__
        extra = {k: v for k, v in outputs.items() if k in fields}
        if "past_key_values" in outputs.keys() and "cache" in fields:  # an older remote model under transformers 5
            extra["cache"] = outputs["past_key_values"]
    if return_dict is False:
        return tuple(t for t in (loss, logits) if t is not None) + tuple(outputs[1:])
    return CausalLMOutputWithPast(loss=loss, logits=logits, **extra)
