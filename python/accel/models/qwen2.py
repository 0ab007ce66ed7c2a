"""Adapter for Qwen2 / Qwen2.5; biases on q/k/v; optional per-layer sliding windows via layer_types."""
from __future__ import annotations

from .base import FusedLayout, ModelAdapter


class Qwen2Adapter(ModelAdapter):
    model_types = ("qwen2",)
    required_attention_attrs = ("layer_idx",)
    notes = "Qwen2 / Qwen2.5; biases on q/k/v; optional per-layer sliding windows via layer_types."
    fused_layout = FusedLayout()
