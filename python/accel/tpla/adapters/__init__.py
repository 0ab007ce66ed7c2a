"""MLA architectures TPLA can patch: one file per architecture, mapped from ``config.model_type``."""
from __future__ import annotations

from ..._adapters import AdapterTable

ADAPTERS = AdapterTable(
    {
        "deepseek_v2": "accel.tpla.adapters.deepseek_v2:DeepseekV2Adapter",
        "deepseek_v3": "accel.tpla.adapters.deepseek_v3:DeepseekV3Adapter",
    },
    lambda model, mt, supported: (f"policy 'tpla' needs a multi-head latent attention (MLA) model; "
                                  f"{type(model).__name__} (model_type {mt!r}) is not one. Supported: {supported}"),
)
supported_mla_types = ADAPTERS.types
get_mla_adapter = ADAPTERS.get
