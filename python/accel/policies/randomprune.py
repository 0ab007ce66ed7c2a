"""Random visual-token pruning: the control every pruning curve needs (a uniformly random, seeded keep-set per
image, in the original order)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .registry import register_policy
from .visual import VisualPolicy


@register_policy("randomprune")
@dataclass
class RandomPrunePolicy(VisualPolicy):
    """Control: keep a uniformly random subset of each image's tokens (sorted), seeded."""

    method: ClassVar[str] = "random"
    seed: int = 0

    def pick(self, n: int, k: int, rows: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[rows, k]`` sorted random indices among ``n`` tokens (one draw per row, from ``generator`` or the
        policy's seed)."""
        g = generator if generator is not None else torch.Generator().manual_seed(int(self.seed))
        return torch.stack([torch.sort(torch.randperm(n, generator=g)[:k]).values for _ in range(rows)])
