"""COOL RLHF's PPO stage (InternLM2). The algorithms live in ``train.rlhf``; ``gae`` is public here."""
from __future__ import annotations

from .rlhf.advantages import gae

__all__ = ["gae"]
