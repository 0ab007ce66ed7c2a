"""accel's entry in transformers' attention registry (``AttentionInterface``): registration and routing only.

Registration happens on the first ``accel.patch()`` (never at import). The registered function
looks up the calling attention module in the patch runtime and hands the call to that model's
policy: ``prefill`` for several queries, ``decode`` for one query per sequence. Modules that are not
patched (or calls accel cannot serve, e.g. ``output_attentions``/dropout/softcap) go to
transformers' own implementations, so behaviour is never silently different.
"""
from __future__ import annotations

import logging
import weakref

import torch

from ..attention.hf import hf_eager, hf_sdpa

logger = logging.getLogger("accel")

ATTN_NAME = "accel"
#: attention module -> (ModelRuntime, layer_idx); weak so a deleted model leaves nothing behind
MODULE_RUNTIME: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_registered = False


def register_attention(name: str, fn) -> None:
    """Register ``fn`` under ``name`` in transformers' attention-function registry, with SDPA-style masks.
    Called on first use only: importing accel registers nothing."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def ensure_registered() -> None:
    global _registered
    if not _registered:
        register_attention(ATTN_NAME, accel_attention_forward)
        _registered = True


def accel_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """The registered attention function (under ``torch.compile`` it runs inside the eager decoder call,
    ``accel.patching.handle.EagerDecoder``)."""
    entry = MODULE_RUNTIME.get(module)
    if entry is not None:
        entry[0].attn_calls += 1  # the take-over check counts every patched layer's call
    needs_hf = (
        entry is None
        or dropout > 0.0
        or kwargs.get("output_attentions", False)
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
    )
    if needs_hf:
        if kwargs.get("softcap") is not None or kwargs.get("output_attentions", False):
            return hf_eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return hf_sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    runtime, layer_idx = entry
    return runtime.attend(layer_idx, module, query, key, value, attention_mask, scaling, **kwargs)
