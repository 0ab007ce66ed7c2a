"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
arXiv 2406.02069): SnapKV's scoring with layer budgets decreasing linearly with depth (same total)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AccelError
from .registry import register_policy
from .snapkv import SnapKVPolicy


@register_policy("pyramidkv")
@dataclass
class PyramidKVPolicy(SnapKVPolicy):
    """PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    Information Funneling"): SnapKV scoring; the average capacity ``C = budget - window`` is spread
    over layers linearly from ``2C - C/beta`` (first layer) down to ``C/beta`` (last), so the total
    equals ``L * C``; each layer keeps its capacity plus the window. ``beta`` default 20."""

    beta: float = 20.0

    def validate(self) -> None:
        super().validate()
        if not self.beta >= 1:
            raise AccelError(f"pyramidkv: beta must be >= 1, got {self.beta}")

    def layer_budget(self, layer_idx: int, num_layers: int, base: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        # a budget that covers the prompt keeps everything in every layer (no redistribution)
        return torch.where(base >= n, n, pyramid_budgets(base, num_layers, self.window, self.beta)[layer_idx])


def pyramid_budgets(base: torch.Tensor, L: int, window: int, beta: float) -> list[torch.Tensor]:
    """Per-layer budgets (window included) for per-row average budgets ``base`` [B]."""
    C = (base - window).clamp(min=0).double()
    lo = C / beta
    hi = 2 * C - lo
    out = []
    for l in range(L):
        cap = hi - (l * (hi - lo) / (L - 1) if L > 1 else 0)
        out.append(torch.round(cap).long() + torch.minimum(base, torch.full_like(base, window)))
    return out

