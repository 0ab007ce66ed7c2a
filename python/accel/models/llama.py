"""Adapter for LlamaForCausalLM (SmolLM2, Llama 2/3)."""
from __future__ import annotations

from .base import FusedLayout, ModelAdapter


class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)
    required_attention_attrs = ("layer_idx",)
    notes = "LlamaForCausalLM (SmolLM2, Llama 2/3)."
    fused_layout = FusedLayout()
