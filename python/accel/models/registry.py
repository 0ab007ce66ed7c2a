"""``config.model_type`` -> language-model adapter class (one file per architecture, imported lazily)."""
from __future__ import annotations

from .._adapters import AdapterTable
from ..errors import UnsupportedModelError


def _text_model_type(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no `.config`; accel patches transformers models")
    text_cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    return getattr(text_cfg, "model_type", None)


ADAPTERS = AdapterTable(
    {
        "llama": "accel.models.llama:LlamaAdapter",
        "mistral": "accel.models.mistral:MistralAdapter",
        "qwen2": "accel.models.qwen2:Qwen2Adapter",
        "qwen3": "accel.models.qwen3:Qwen3Adapter",
        "gemma3_text": "accel.models.gemma3:Gemma3Adapter",
        "phi3": "accel.models.phi3:Phi3Adapter",
    },
    lambda model, mt, supported: (f"model type {mt!r} ({type(model).__name__}) is not supported by accel. "
                                  f"Supported model types: {supported}."),
    model_type=_text_model_type,
)
supported_model_types = ADAPTERS.types
get_adapter = ADAPTERS.get
