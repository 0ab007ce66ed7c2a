"""accel: inference-time acceleration for HuggingFace transformers models.

    import accel
    model, tok = accel.models.load("smollm2-135m")
    with accel.patch(model, policy="dense"):
        model.generate(...)

Nothing is patched or registered at import time.
"""
from ._version import __version__
from .errors import (AccelError, AlreadyPatchedError, InputError, PlanValidationError, UnknownPolicyError,
                     UnsupportedModelError)


def __getattr__(name):  # lazy public surface: importing accel stays cheap and side-effect free
    if name in ("patch", "unpatch", "get_handle", "calibrate"):
        from . import api

        return getattr(api, name)
    if name == "PatchHandle":
        from .patching.lm import PatchHandle

        return PatchHandle
    if name in ("list_policies", "get_policy_class", "register_policy", "list_calibratable"):
        from .policies import registry

        return getattr(registry, name)
    if name in ("Plan", "LayerPlan", "HeadPlan"):
        from . import plan

        return getattr(plan, name)
    if name == "AccelCache":
        from .cache import AccelCache

        return AccelCache
    if name == "supported_model_types":
        from .models.registry import supported_model_types

        return supported_model_types
    if name in ("models", "tpla", "vlm", "calibration", "policies"):  # subpackages, imported on first use
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'accel' has no attribute {name!r}")


__all__ = ["__version__", "patch", "calibrate", "unpatch", "get_handle", "PatchHandle", "list_policies",
           "list_calibratable", "Plan", "LayerPlan",
           "HeadPlan", "AccelCache", "supported_model_types", "AccelError", "AlreadyPatchedError", "InputError",
           "PlanValidationError", "UnknownPolicyError", "UnsupportedModelError"]
