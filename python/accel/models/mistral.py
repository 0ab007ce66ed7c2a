"""Adapter for Mistral; optional sliding_window on every layer, handled by the cache and the mask."""
from __future__ import annotations

from .base import FusedLayout, ModelAdapter


class MistralAdapter(ModelAdapter):
    model_types = ("mistral",)
    required_attention_attrs = ("layer_idx",)
    notes = "Mistral; optional sliding_window on every layer, handled by the cache and the mask."
    fused_layout = FusedLayout()
