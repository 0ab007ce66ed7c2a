"""Vision-side adapters: where a VLM's vision tower, projector and image placeholder token are.
One file per architecture; ``accel.vlm.adapters.get_vision_adapter`` maps ``config.model_type``."""
from __future__ import annotations

from typing import ClassVar

import torch

from ...errors import UnsupportedModelError


class VisionAdapter:
    """What the pruning runtime needs from a VLM architecture.

    ``select(pixel_values, policy, kw) -> (features, flags)``: per image, the kept features ``[k_i, D]``
    (in order) and a bool mask ``[N_i]`` over that image's placeholder tokens marking the kept ones.
    ``full_features(pixel_values, kw) -> (features, fixed)``: every image's unpruned features (what the
    unpatched model computes) and, per image, a bool mask of tokens that must always be kept (or None).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: further keyword arguments of ``get_image_features`` / forward that belong to the images
    extra_image_kwargs: ClassVar[tuple[str, ...]] = ()
    #: position ids have more than one axis (Qwen2-VL's M-RoPE: [3, B, T])
    multi_axis_positions: ClassVar[bool] = False
    #: names of ``get_image_features``' positional arguments after ``pixel_values``
    feature_arg_names: ClassVar[tuple[str, ...]] = ("image_sizes",)

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "language_model"):
            raise UnsupportedModelError(f"{type(model).__name__}: expected `.model` with a `language_model` (transformers VLM layout)")
        self.inner = inner
        tok = getattr(self.config, "image_token_id", None)
        if tok is None:
            tok = getattr(self.config, "image_token_index", None)
        if tok is None:
            raise UnsupportedModelError(f"{type(model).__name__}: config has no image_token_id")
        self.image_token_id = int(tok)
        #: details of the last ``select`` (e.g. FlowCut's per-layer token counts), for inspection
        self.trace: dict = {}
        #: set by ``select`` when a second, in-LLM stage must finish the selection (FlowCut on anyres):
        #: ``{"targets": [visual tokens kept per image], "fixed": [bool mask over the kept tokens that
        #: stay regardless (row-end newlines)]}``
        self.llm_stage: dict | None = None

    def hook_module(self) -> torch.nn.Module:
        """The module whose forward receives ``input_ids`` and ``pixel_values`` (rewritten by the pruner)."""
        return self.inner

    def language_model(self) -> torch.nn.Module:
        return self.inner.language_model

    def tokens_per_image(self, pixel_values, kwargs) -> int:
        raise NotImplementedError

    def full_features(self, pixel_values, kwargs) -> torch.Tensor:
        raise NotImplementedError

    def select(self, pixel_values, policy, kwargs):
        raise NotImplementedError

    # -- positions (overridden by architectures with multi-axis rotary positions) -------------------------
    def prompt_positions(self, kwargs, ids, mask):
        """The unpruned prompt's position ids: the caller's, else what the unpatched model would use."""
        pos = kwargs.get("position_ids")
        if pos is None:
            b, n = ids.shape
            pos = torch.arange(n, device=ids.device).expand(b, n)
        return pos

    def gather_positions(self, pos, gidx, real):
        raise NotImplementedError

    def after_prefill_rewrite(self, runtime, kwargs, ids, keep_cols, gidx, real) -> None:
        """Hook for architecture state that depends on the rewritten prompt (default: none)."""

    def next_positions(self, kwargs):
        return None

    def decode_positions(self, state, ref, past: int):
        """Position ids of a decode step when the caller gave none: the original positions continue
        (the unpatched model would use ``past + arange``, counted over the unpruned prompt)."""
        q = ref.shape[1]
        return (torch.arange(q, device=ref.device) + past + state["dropped"]).expand(ref.shape[0], q)
