"""Adapter for Phi3; one fused qkv_proj instead of q/k/v projections; queries/keys/values reach the attention function split, so accel needs nothing special."""
from __future__ import annotations

from .base import FusedLayout, ModelAdapter


class Phi3Adapter(ModelAdapter):
    model_types = ("phi3",)
    required_attention_attrs = ("layer_idx", "qkv_proj",)
    notes = "Phi3; one fused qkv_proj instead of q/k/v projections; queries/keys/values reach the attention function split, so accel needs nothing special."
    fused_layout = FusedLayout(qkv="packed", mlp="packed")
