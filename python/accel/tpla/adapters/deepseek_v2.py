"""DeepSeek-V2 (``DeepseekV2ForCausalLM``): complex-exponential rotary embedding (``freqs_cis``)."""
from __future__ import annotations

from .base import MLAAdapter


class DeepseekV2Adapter(MLAAdapter):
    model_types = ("deepseek_v2",)

    def rope(self, attn, q_rot, k_rot, position_embeddings):
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb

        return apply_rotary_emb(q_rot, k_rot, position_embeddings.to(q_rot.device))
