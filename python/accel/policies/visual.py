"""The base of the visual-token pruning policies for VLMs (FasterVLM, FlowCut, FastV-style, random): the budget and
the hooks the VLM runtime (``accel.vlm.runtime``) calls.

A visual policy acts before the language model: the image's tokens are scored, the top ``keep`` are kept in their
original order with their original positions, and the LM never sees the rest (its prefill and its KV cache shrink).
They compose with the LM-side policies: ``"fastervlm+hylra"``. Per architecture, the vision adapter runs the tower
and hands each scoring layer's projections to the policy (``method`` says which tower pass the policy needs);
policies that score in the language model override ``encode`` / ``language_model_stage``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import AccelError
from .base import Policy


def heads_of(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, T, H*d]`` -> ``[B, H, T, d]`` in fp32 (the vision tower's projections, token axis first)."""
    b, t, _ = x.shape
    return x.reshape(b, t, num_heads, -1).transpose(1, 2).float()


def keep_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores per row, sorted ascending (original order kept). ``[B, k]``.
    Ties go to the lower index (stable), so the result is deterministic."""
    n = scores.shape[-1]
    if k >= n:
        return torch.arange(n, device=scores.device).expand(scores.shape[0], n)
    # stable: sort descending by score, ascending by index among equals
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=-1).values



def keep_top_per_image(policy, scores: torch.Tensor, feats: list, fixed) -> tuple[list, list]:
    """Per image, keep the ``policy.n_keep`` tokens with the largest ``scores`` (every image token of the batch in
    order), tokens ``fixed`` marks (e.g. row-end newlines) first. Returns ``(flags, kept feats)`` per image."""
    flags, out, start = [], list(feats), 0
    for i, f in enumerate(feats):
        n = int(f.shape[0])
        sc = scores[start:start + n].clone()
        fx = fixed[i] if fixed is not None else None
        if fx is not None:
            sc[fx] = float("inf")  # always-kept tokens first
        k = policy.n_keep(n - (int(fx.sum()) if fx is not None else 0)) + (int(fx.sum()) if fx is not None else 0)
        fl = torch.zeros(n, dtype=torch.bool, device=scores.device)
        fl[keep_topk(sc[None], k)[0]] = True
        flags.append(fl)
        out[i] = f[fl.to(f.device)]
        start += n
    return flags, out


@dataclass
class VisualPolicy(Policy):
    """Base: the budget. Exactly one of ``keep`` (tokens per image) and ``keep_ratio`` (fraction of each
    image's tokens) is used; default ``keep_ratio=0.25`` (576 -> 144, FasterVLM's 75%-pruned setting) [INFER].
    ``keep`` >= the image's token count keeps everything: the model's outputs are then exactly unpatched."""

    kind: ClassVar[str] = "visual"
    #: the tower pass the vision adapter runs for this policy: "cls" (one scoring layer's attention), "flowcut"
    #: (every layer up to the feature layer, pruning as it goes), "random" (no scores), "none" (no pruning in
    #: the tower: the policy scores in the language model)
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

    # -- hooks of the VLM runtime ----------------------------------------------------------------------------
    def encode(self, runtime, pixel_values, kw) -> dict:
        """Encode the images and prune in the tower: ``{"feats": [k_i, D] per image, "flags": bool [N_i] per image
        (None: not pruned yet), "fixed": bool [N_i] tokens always kept (or None), "trace": {...}}``."""
        adapter = runtime.adapter
        feats, flags = adapter.select(pixel_values, self, kw)
        enc = {"feats": feats, "flags": flags, "fixed": None, "trace": dict(adapter.trace)}
        if adapter.llm_stage is not None:  # per image, so generate's batch expansion repeats them
            enc["stage_targets"] = list(adapter.llm_stage["targets"])
            enc["stage_fixed"] = list(adapter.llm_stage["fixed"])
        return enc

    def language_model_stage(self, runtime, module, ids, img, feats, flags, enc, mask, pos):
        """Prune further (or at all) in the language model, after the tower: returns ``(flags, feats)``. ``runtime``
        offers ``probe(layer, embeds, mask, pos)`` (a decoder layer's attention inputs over a prompt) and
        ``compact(...)`` (the prompt with only the kept image tokens). Default: the tower's choice stands."""
        return flags, feats
