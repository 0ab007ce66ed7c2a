"""Model loading (``accel.models.load``) and architecture adapters."""
from .loader import NAMED_MODELS, load, local_path
from .registry import get_adapter, supported_model_types

__all__ = ["load", "local_path", "NAMED_MODELS", "get_adapter", "supported_model_types"]
