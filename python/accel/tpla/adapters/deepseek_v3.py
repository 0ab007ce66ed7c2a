"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): cos/sin rotary embedding, optionally on interleaved pairs."""
from __future__ import annotations

from .base import MLAAdapter


class DeepseekV3Adapter(MLAAdapter):
    model_types = ("deepseek_v3",)

    def rope(self, attn, q_rot, k_rot, position_embeddings):
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

        cos, sin = position_embeddings
        if attn.config.rope_interleave:
            return m.apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
        return m.apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
