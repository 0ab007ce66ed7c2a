"""``config.model_type`` -> vision adapter (imported lazily, one file per architecture)."""
from __future__ import annotations

from ..._adapters import AdapterTable

ADAPTERS = AdapterTable(
    {
        "llava": "accel.vlm.adapters.llava:LlavaAdapter",
        "llava_next": "accel.vlm.adapters.llava_next:LlavaNextAdapter",
        "qwen2_vl": "accel.vlm.adapters.qwen2_vl:Qwen2VLAdapter",
        "qwen2_5_vl": "accel.vlm.adapters.qwen2_vl:Qwen2VLAdapter",
    },
    lambda model, mt, supported: (f"visual-token pruning needs a supported VLM; {type(model).__name__} (model_type "
                                  f"{mt!r}) is not one. Supported VLM types: {supported}."),
)
supported_vlm_types = ADAPTERS.types
get_vision_adapter = ADAPTERS.get
