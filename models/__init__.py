"""InternLM2 on internlm_kernels: config presets, the causal LM and the scalar-head (reward / critic) model,
HF-layout checkpoints (models.checkpoint) and KV-cache generation (models.serving). Used from the checkout."""
from .config import InternLM2Config
from .internlm2 import CausalLMOutput, InternLM2ForCausalLM, InternLM2ForScore, InternLM2Model, ScoreOutput

__all__ = ["InternLM2Config", "InternLM2ForCausalLM", "InternLM2ForScore", "InternLM2Model", "CausalLMOutput",
           "ScoreOutput"]
