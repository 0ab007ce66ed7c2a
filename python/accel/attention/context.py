"""What a policy's ``prefill`` / ``decode`` and the attention primitives receive for one layer and one call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(eq=False)
class LayerContext:
    """Per-layer, per-call context handed to policies and to the primitives of ``accel.attention``.

    Attributes:
        layer_idx: decoder layer index.
        module: the layer's attention module (read-only for policies).
        plan: this layer's ``LayerPlan``.
        runtime: the model-wide runtime: ``shared`` (cross-layer data within a step, such as a donor layer's
            selected positions), ``step`` (decode steps of this sequence), ``donors`` (layers whose selection a
            later layer reuses), ``stats`` (the decode KV-read counter), ``info`` (the model's ``ModelInfo``).
        cache_layer: the layer's ``AccelLayer`` when accel's cache is in use, else ``None``.
        state: this sequence's per-layer dict for the policies (survives across the decode steps of one
            generation; a new sequence starts empty).
        accumulate: the layer's KV policy asks the decode attention to add each kept token's attention to its
            eviction score (H2O-style accumulation, fused into the decode kernel's logits output).
    """

    layer_idx: int
    module: torch.nn.Module
    plan: Any
    runtime: Any
    cache_layer: Any
    state: dict
    accumulate: bool = False
