"""MLA architectures TPLA can patch: one file per architecture, mapped from ``config.model_type``."""
from __future__ import annotations

from ...errors import UnsupportedModelError

_ADAPTERS = {
    "deepseek_v2": "accel.tpla.adapters.deepseek_v2:DeepseekV2Adapter",
    "deepseek_v3": "accel.tpla.adapters.deepseek_v3:DeepseekV3Adapter",
}


def supported_mla_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_mla_adapter(model):
    import importlib

    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in _ADAPTERS:
        raise UnsupportedModelError(
            f"policy 'tpla' needs a multi-head latent attention (MLA) model; {type(model).__name__} "
            f"(model_type {mt!r}) is not one. Supported: {', '.join(supported_mla_types())}"
        )
    mod, cls = _ADAPTERS[mt].split(":")
    return getattr(importlib.import_module(mod), cls)(model)
