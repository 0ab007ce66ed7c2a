"""``config.model_type`` -> vision adapter (imported lazily, one file per architecture)."""
from __future__ import annotations

import importlib

from ...errors import UnsupportedModelError

_ADAPTERS = {
    "llava": "accel.vlm.adapters.llava:LlavaAdapter",
    "llava_next": "accel.vlm.adapters.llava_next:LlavaNextAdapter",
    "qwen2_vl": "accel.vlm.adapters.qwen2_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "accel.vlm.adapters.qwen2_vl:Qwen2VLAdapter",
}


def supported_vlm_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_vision_adapter(model):
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in _ADAPTERS:
        raise UnsupportedModelError(
            f"visual-token pruning needs a supported VLM; {type(model).__name__} (model_type {mt!r}) is not one. "
            f"Supported VLM types: {', '.join(supported_vlm_types())}."
        )
    mod, cls = _ADAPTERS[mt].split(":")
    return getattr(importlib.import_module(mod), cls)(model)
