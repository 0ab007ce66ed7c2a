"""Vision-side adapters: where a VLM's vision tower, projector and image placeholder token are.
One file per architecture; ``accel.vlm.adapters.get_vision_adapter`` maps ``config.model_type``."""
from __future__ import annotations

from typing import ClassVar

import torch

from ...errors import UnsupportedModelError


class VisionAdapter:
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "language_model"):
            raise UnsupportedModelError(f"{type(model).__name__}: expected `.model` with a `language_model` (transformers VLM layout)")
        self.inner = inner
        tok = getattr(self.config, "image_token_id", None)
        if tok is None:
            tok = getattr(self.config, "image_token_index", None)
        if tok is None:
            raise UnsupportedModelError(f"{type(model).__name__}: config has no image_token_id")
        self.image_token_id = int(tok)
        #: details of the last ``select`` (e.g. FlowCut's per-layer token counts), for inspection
        self.trace: dict = {}

    def hook_module(self) -> torch.nn.Module:
        """The module whose forward receives ``input_ids`` and ``pixel_values`` (rewritten by the pruner)."""
        return self.inner

    def language_model(self) -> torch.nn.Module:
        return self.inner.language_model

    def tokens_per_image(self, pixel_values, kwargs) -> int:
        raise NotImplementedError

    def full_features(self, pixel_values, kwargs) -> torch.Tensor:
        raise NotImplementedError

    def select(self, pixel_values, policy, kwargs):
        raise NotImplementedError
