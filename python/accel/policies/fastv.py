"""A FastV-style text-guided baseline (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play
Inference Acceleration for Large Vision-Language Models", ECCV 2024): image tokens ranked by the attention they
receive in an early layer of the language model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import AccelError
from .registry import register_policy
from .visual import VisualPolicy, keep_top_per_image


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

    method: ClassVar[str] = "none"
    layer: int = 2
    query: str = "all"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.layer, int) or self.layer < 1:
            raise AccelError(f"fastv: layer must be an integer >= 1 (prune after that many LLM layers), got {self.layer!r}")
        if self.query not in ("all", "last", "text"):
            raise AccelError(f"fastv: query must be 'all', 'last' or 'text', got {self.query!r}")

    def encode(self, runtime, pixel_values, kw) -> dict:
        feats, fixed = runtime.adapter.full_features(pixel_values, kw)  # no pruning in the tower
        return {"feats": feats, "flags": None, "fixed": fixed, "trace": {}}

    def language_model_stage(self, runtime, module, ids, img, feats, flags, enc, mask, pos):
        """Score every image token in the language model's layer ``layer - 1`` and keep the top ``keep`` per image
        (tokens the adapter marks as always kept, e.g. row-end newlines, first)."""
        full = torch.cat(feats, 0)
        scores = self.scores(runtime, module, ids, img, full, mask, pos)
        return keep_top_per_image(self, scores, feats, enc["fixed"])

    def scores(self, runtime, module, ids, img, full, mask, pos) -> torch.Tensor:
        """The attention each image token receives in decoder layer ``layer - 1`` (head mean) from the queries
        ``query`` selects, every image token of the batch in order: ``[n_image_tokens]``."""
        lm = runtime.adapter.language_model()
        nl = lm.config.num_hidden_layers
        if self.layer > nl:
            raise AccelError(f"fastv: layer {self.layer} exceeds the language model's {nl} layers")
        embeds = module.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(img[..., None], full.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
        probs = runtime.probe(self.layer - 1, embeds, mask, pos).probs()  # [B, T, T] head mean
        b, t = ids.shape
        rows = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        if mask is not None:
            rows &= mask.bool()
        if self.query == "last":
            rows = torch.zeros_like(rows)
            rows[:, -1] = True
        elif self.query == "text":
            last_img = torch.where(img.any(1), t - 1 - img.flip(1).int().argmax(1), torch.full((b,), -1, device=ids.device))
            rows &= torch.arange(t, device=ids.device)[None] > last_img[:, None]
        received = (probs * rows[..., None]).sum(1) / rows.sum(1, keepdim=True).clamp_min(1)  # [B, T]
        return received[img]
