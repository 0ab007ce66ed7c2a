"""``config.model_type`` -> adapter class. Adapters are imported lazily (one file each)."""
from __future__ import annotations

import importlib

from ..errors import UnsupportedModelError

_ADAPTERS = {
    "llama": "accel.models.llama:LlamaAdapter",
    "mistral": "accel.models.mistral:MistralAdapter",
    "qwen2": "accel.models.qwen2:Qwen2Adapter",
    "qwen3": "accel.models.qwen3:Qwen3Adapter",
    "gemma3_text": "accel.models.gemma3:Gemma3Adapter",
    "phi3": "accel.models.phi3:Phi3Adapter",
}


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no `.config`; accel patches transformers models")
    text_cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    mt = getattr(text_cfg, "model_type", None)
    if mt not in _ADAPTERS:
        raise UnsupportedModelError(
            f"model type {mt!r} ({type(model).__name__}) is not supported by accel. "
            f"Supported model types: {', '.join(supported_model_types())}."
        )
    mod, cls = _ADAPTERS[mt].split(":")
    return getattr(importlib.import_module(mod), cls)(model)
