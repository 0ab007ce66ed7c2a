"""Visual-token pruning policies: which image tokens reach the language model.

A visual policy acts before the language model: the image's tokens are scored, the top ``keep`` are
kept in their original order with their original positions, and the LM never sees the rest (its
prefill and its KV cache shrink). They compose with the LM-side policies: ``"fastervlm+hylra"``.

* ``fastervlm``: FasterVLM ([CLS] attention, Zhang et al., arXiv 2412.01818; methods.md 6.1).
* ``flowcut``: FlowCut (information flow inside the vision encoder, Tong et al., arXiv 2505.19536;
  methods.md 6.2).
* ``fastv``: a FastV-style text-guided baseline (Chen et al., "An Image is Worth 1/2 Tokens After
  Layer 2", ECCV 2024): image tokens ranked by the attention they receive in the LLM's layer ``layer``.
* ``randomprune``: uniform random keep-set (the control every pruning curve needs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import AccelError
from ..policies.base import Policy
from ..policies.registry import register_policy


@dataclass
class VisualPolicy(Policy):
    """Base: the budget. Exactly one of ``keep`` (tokens per image) and ``keep_ratio`` (fraction of each
    image's tokens) is used; default ``keep_ratio=0.25`` (576 -> 144, FasterVLM's 75%-pruned setting) [INFER].
    ``keep`` >= the image's token count keeps everything: the model's outputs are then exactly unpatched."""

    kind: ClassVar[str] = "visual"
    #: how the adapter scores tokens: "cls" (attention of [CLS] / received attention), "flowcut",
    #: "fastv" (in the LLM), "random"
    method: ClassVar[str] = ""

    keep: int | None = None
    keep_ratio: float | None = None

    def validate(self) -> None:
        if self.keep is not None and self.keep_ratio is not None:
            raise AccelError(f"{self.name}: give keep (tokens per image) or keep_ratio (fraction), not both")
        if self.keep is not None and (not isinstance(self.keep, int) or isinstance(self.keep, bool) or self.keep < 1):
            raise AccelError(f"{self.name}: keep must be an integer >= 1 (visual tokens kept per image), got {self.keep!r}")
        if self.keep_ratio is not None and not (isinstance(self.keep_ratio, (int, float)) and 0 < self.keep_ratio <= 1):
            raise AccelError(f"{self.name}: keep_ratio must be in (0, 1], got {self.keep_ratio!r}")

    def n_keep(self, n: int) -> int:
        """Tokens kept out of an image's ``n``."""
        if self.keep is not None:
            return min(int(self.keep), n)
        ratio = 0.25 if self.keep_ratio is None else float(self.keep_ratio)
        return max(1, min(n, int(round(ratio * n))))

    def build_plan(self, info):  # pragma: no cover - visual policies carry no layer plan
        raise AccelError(f"{self.name} is a visual-token policy; it has no per-layer plan")


@register_policy("fastervlm")
@dataclass
class FasterVLMPolicy(VisualPolicy):
    """FasterVLM: keep the patches the [CLS] token attends to most.

    Score = softmax attention of the [CLS] query at ``select_layer`` of the vision tower, averaged over
    heads, read at the patch columns; top-``keep`` kept, sorted. Towers without [CLS] (Qwen2-VL) use the
    mean attention each patch receives instead (VisPruner-style).

    Args:
        select_layer: vision layer whose attention scores the patches; None = the layer the VLM takes
            its features from (``vision_feature_layer``, -2 for LLaVA-1.5), as in the paper.
    """

    method: ClassVar[str] = "cls"
    select_layer: int | None = None


@register_policy("flowcut")
@dataclass
class FlowCutPolicy(VisualPolicy):
    """FlowCut: progressive pruning inside the vision encoder, [CLS] as the information relay.

    Per layer up to the select layer: score = (r + s) * ||v||_1 (see ``scoring.flowcut_scores``),
    accumulated with ``cum = ema * cum + (1 - ema) * score``; every ``prune_every``-th layer before the
    select layer (when the remaining layer count is a multiple of it) the entropy-adaptive count is
    removed; at the select layer everything down to ``keep``. [CLS] is never pruned.

    Args:
        ema: weight of the running score (0.5 in the paper's code).
        prune_every: prune when the layers left before the select layer are a multiple of this (2).
        adaptive: entropy-adaptive counts; False prunes only at the select layer (one-shot) [INFER].
        llm_stage: anyres models (LLaVA-NeXT): the paper's two-stage form. Each image's target is
            ``keep`` per crop times its crop count (the same LM token budget the per-crop policies give);
            the encoder prunes every crop to ``encoder_share`` of that target, then the LLM's decoder layer
            ``llm_layer`` (0-based) ranks the survivors from the last prompt token
            (``scoring.flowcut_llm_scores``) and keeps the target; row-end newlines are always kept. The
            scoring pass runs layers ``0..llm_layer`` over the encoder-pruned prompt, then the LLM runs
            only on the final tokens [INFER: the paper drops the tokens inside layer ``llm_layer``, so its
            first layers still see the encoder survivors]. False: encoder stage only, per crop, to ``keep``.
            Ignored on single-crop models (LLaVA-1.5), where the encoder goes straight to the target.
        llm_layer: the decoder layer of the second stage (1 in the paper's code).
        encoder_share: per-crop encoder budget as a fraction of the image's target (0.5: "~target/2").
    Batches: the adaptive count uses the batch-mean entropy so every image keeps the same count
    [INFER: the authors' code runs one image at a time].
    """

    method: ClassVar[str] = "flowcut"
    ema: float = 0.5
    prune_every: int = 2
    adaptive: bool = True
    llm_stage: bool = True
    llm_layer: int = 1
    encoder_share: float = 0.5

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.llm_stage, bool):
            raise AccelError(f"flowcut: llm_stage must be true or false, got {self.llm_stage!r}")
        if not isinstance(self.llm_layer, int) or isinstance(self.llm_layer, bool) or self.llm_layer < 0:
            raise AccelError(f"flowcut: llm_layer must be an integer >= 0 (0-based decoder layer), got {self.llm_layer!r}")
        if not (isinstance(self.encoder_share, (int, float)) and 0 < self.encoder_share <= 1):
            raise AccelError(f"flowcut: encoder_share must be in (0, 1], got {self.encoder_share!r}")
        if not 0 <= self.ema < 1:
            raise AccelError(f"flowcut: ema must be in [0, 1), got {self.ema!r}")
        if not isinstance(self.prune_every, int) or self.prune_every < 1:
            raise AccelError(f"flowcut: prune_every must be an integer >= 1, got {self.prune_every!r}")


@register_policy("fastv")
@dataclass
class FastVPolicy(VisualPolicy):
    """FastV-style text-guided baseline: image tokens ranked by the attention they receive in the LLM.

    The first ``layer`` decoder layers run once over the full prompt; the attention map of layer
    ``layer - 1`` (head mean) scores each image token by the attention it receives from the queries
    ``query`` selects ("all": every query, FastV's ranking; "last": the last prompt token; "text": the
    tokens after the last image token). The kept tokens then go through the whole LLM, so, unlike the
    original FastV (which keeps every token in its first ``layer`` layers), the LLM's KV cache holds only
    the kept tokens in every layer [INFER: keeps one cache length per sequence and a prefill cost
    comparable to the encoder-side policies; the scoring pass costs ``layer`` layers over the full prompt].
    """

    method: ClassVar[str] = "fastv"
    layer: int = 2
    query: str = "all"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.layer, int) or self.layer < 1:
            raise AccelError(f"fastv: layer must be an integer >= 1 (prune after that many LLM layers), got {self.layer!r}")
        if self.query not in ("all", "last", "text"):
            raise AccelError(f"fastv: query must be 'all', 'last' or 'text', got {self.query!r}")


@register_policy("randomprune")
@dataclass
class RandomPrunePolicy(VisualPolicy):
    """Control: keep a uniformly random subset of each image's tokens (sorted), seeded."""

    method: ClassVar[str] = "random"
    seed: int = 0
