"""DELTA: dynamic layer-aware token attention (arXiv 2510.09883; methods.md section 7.1).

Layers fall in three groups: a few initial full-attention layers; Delta-layers that run full attention
*and* select a page set from their attention map; sparse layers that attend only to the pages chosen by
the nearest preceding Delta-layer in the same decode step. Page scores follow the authors' code:
softmax probabilities of the current query, max over *all* heads ("unified head selection": one set
shared by every head of the layer), summed over the tokens of a page, top pages with the last
``recent_pages`` pages forced in, sorted. The full KV cache is kept (no eviction).

Layer layout (``layout``, [INFER], switchable):

* ``"paper"``: no calibration: layers 0-1 are full, Delta-layers sit at layer 2 and at 50% and 78% of
  the depth (the authors' 28-layer setting, full [0, 1, 2] and Delta [14, 22], scaled to the model;
  layer 2 is made a Delta-layer so layers before the middle have a source).
* ``"calibrated"`` (default): the Delta-layers are the layers the model's shipped HyLRA plan computes
  in full (the scheduler's retrieval-aware dynamic program, ``accel plan --policy hylra``), so the
  layers that read a needle select their own pages; models without a shipped plan fall back to
  ``"paper"`` (logged). The DELTA paper picks its Delta-layers by hand per model; on SmolLM2-135M the
  scaled paper layout loses passkey retrieval entirely (0/20 at 4K), the calibrated one does not.

``full_layers`` / ``delta_layers`` override either.

Budget: ``topk`` tokens (``subset_size`` pages x ``page_size``) or ``topk_ratio`` of the context.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import AccelError
from ..models.base import ModelInfo
from ..plan import LayerPlan, Plan
from ..plan.shipped import shipped_plan
from .hylra import _LayerReuse
from .registry import register_policy

logger = logging.getLogger("accel")


def delta_layout(num_layers: int, full_layers=None, delta_layers=None,
                 calibrated_full: list[int] | None = None) -> tuple[list[int], list[int]]:
    """``(full, delta)`` layer lists; ``calibrated_full`` = the full layers of a calibrated HyLRA plan."""
    full = list(full_layers) if full_layers is not None else [i for i in (0, 1) if i < num_layers]
    if delta_layers is not None:
        delta = sorted(set(delta_layers))
    elif calibrated_full is not None:
        delta = sorted(set(i for i in calibrated_full if i not in full and 0 <= i < num_layers))
    else:
        cand = {2, round(0.5 * num_layers), round(0.78 * num_layers)}
        delta = sorted(i for i in cand if 0 <= i < num_layers and i not in full)
    return full, delta


@register_policy("delta")
@dataclass
class DeltaPolicy(_LayerReuse):
    """Args:
        topk / topk_ratio: tokens kept by sparse layers (whole pages), default 1/8 of the context.
        page_size: tokens per page (the authors' code: 16 [likely, not confirmed]).
        recent_pages: last pages always kept (the "stable recency window", 8 in the paper's code).
        layout: "calibrated" (Delta-layers from the model's shipped HyLRA plan) or "paper" (the
            scaled authors' layout); see the module docstring.
        full_layers / delta_layers: layer indices; None = from ``layout``.
        min_topk: with ``topk_ratio``, keep at least this many tokens ([INFER], 64).
    """

    topk: int | None = None
    topk_ratio: float | None = 0.125
    page_size: int = 16
    recent_pages: int = 8
    layout: str = "calibrated"
    full_layers: list[int] | None = None
    delta_layers: list[int] | None = None
    min_context: int = 0
    min_topk: int = 64
    # the machinery reads agg / chunk / sink / recent
    @property
    def agg(self) -> str:
        return "shared"  # unified head selection: max over all heads, one page set per layer

    @property
    def chunk(self) -> int:
        return self.page_size

    @property
    def sink(self) -> int:
        return 0

    @property
    def recent(self) -> int:
        return self.recent_pages * self.page_size

    def tensor_parallel_problem(self, plan=None) -> str | None:
        return "it selects one page set per layer from all of its heads (the unified selection)"

    def validate(self) -> None:
        if not isinstance(self.page_size, int) or self.page_size < 1 or self.recent_pages < 0:
            raise AccelError(f"delta: page_size must be >= 1 and recent_pages >= 0, got {self.page_size}, {self.recent_pages}")
        if self.layout not in ("calibrated", "paper"):
            raise AccelError(f"delta: layout must be 'calibrated' or 'paper', got {self.layout!r}")
        super().validate()

    def _layout(self, info: ModelInfo) -> tuple[list[int], list[int], str]:
        cal = None
        source = "DELTA default layout"
        if self.layout == "calibrated" and self.delta_layers is None:
            hp = shipped_plan("hylra", info)
            if hp is None:
                logger.info("delta: no shipped HyLRA plan for %s; using the paper's layout scaled to %d layers",
                            info.fingerprint, info.num_layers)
            else:
                cal = [i for i, lp in enumerate(hp.layers) if lp.mode == "full"]
                source = "Delta-layers = full layers of the shipped HyLRA plan"
        full, delta = delta_layout(info.num_layers, self.full_layers, self.delta_layers, cal)
        return full, delta, source

    def not_supported_reasons(self, info: ModelInfo) -> list[str]:
        full, delta, _ = self._layout(info)
        bad = [i for i in full + delta if not (0 <= i < info.num_layers)]
        return [f"layer indices {bad} are outside 0..{info.num_layers - 1}"] if bad else []

    def build_plan(self, info: ModelInfo) -> Plan:
        full, delta, source = self._layout(info)
        layers = []
        last = None
        for i in range(info.num_layers):
            if i in delta:
                layers.append(LayerPlan(mode="full", attention="delta"))
                last = i
            elif i in full or last is None:
                layers.append(LayerPlan(mode="full", attention="delta"))
            else:
                layers.append(LayerPlan(mode="reuse", attention="delta", reuse_src=last))
        return Plan(policy="delta", num_layers=info.num_layers, num_kv_heads=info.num_kv_heads,
                    model_type=info.model_type, params=self.knobs(), layers=layers,
                    provenance={"source": source, "full_layers": full, "delta_layers": delta})
