"""Adapter for Qwen3; RMSNorm on q and k per head (q_norm/k_norm) before RoPE, inside the attention module, so the cached keys are already normalised."""
from __future__ import annotations

from .base import FusedLayout, ModelAdapter


class Qwen3Adapter(ModelAdapter):
    model_types = ("qwen3",)
    required_attention_attrs = ("layer_idx", "q_norm", "k_norm",)
    notes = "Qwen3; RMSNorm on q and k per head (q_norm/k_norm) before RoPE, inside the attention module, so the cached keys are already normalised."
    fused_layout = FusedLayout(qk_norm=True)
