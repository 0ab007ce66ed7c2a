"""Adapter for Gemma3 text models (Gemma3ForCausalLM, e.g. Gemma-3-270m).

Gemma3 interleaves sliding-window layers (window 512 on the 270m model) with full-attention layers
(every 6th). accel's cache keeps a bounded ring for the sliding layers and the whole history for the
global ones; the attention scale is ``query_pre_attn_scalar**-0.5`` (passed by the module), q/k are
RMS-normalised inside the module before RoPE.
"""
from __future__ import annotations

from .base import ModelAdapter


class Gemma3Adapter(ModelAdapter):
    model_types = ("gemma3_text",)
    required_attention_attrs = ("layer_idx", "q_norm", "k_norm")
    notes = "Gemma3 text: sliding-window and global layers, q/k norm."
