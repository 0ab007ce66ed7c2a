"""Model loading (``accel.models.load``) and architecture adapters."""
from .loader import NAMED_MODELS, load
from .registry import get_adapter, supported_model_types

__all__ = ["load", "NAMED_MODELS", "get_adapter", "supported_model_types"]
