"""What TPLA needs from an MLA architecture: its decoder layers, each attention module's projections,
and how the model applies rotary embeddings to the decoupled rope query and key."""
from __future__ import annotations

import torch

from ...errors import UnsupportedModelError


class MLAAdapter:
    model_types: tuple[str, ...] = ()

    def __init__(self, model):
        self.model = model
        self.config = model.config
        inner = getattr(model, "model", model)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise UnsupportedModelError(f"{type(model).__name__}: expected `.model.layers` (transformers decoder layout)")
        self.inner = inner
        self.layers = layers
        for i, layer in enumerate(layers):
            a = getattr(layer, "self_attn", None)
            if a is None or not all(hasattr(a, n) for n in ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")):
                raise UnsupportedModelError(f"layer {i}: no MLA attention (kv_a_proj_with_mqa / kv_b_proj) found")

    def attention(self, i: int):
        return self.layers[i].self_attn

    def rope(self, attn, q_rot: torch.Tensor, k_rot: torch.Tensor, position_embeddings):
        """Apply the model's rotary embedding exactly as its attention does. q ``[B, H, T, dr]``, k ``[B, 1, T, dr]``."""
        raise NotImplementedError
