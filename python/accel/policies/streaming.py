"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453):
attention sinks + the most recent tokens, per KV head, in accel's ragged cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import AccelError
from .budgeted import BudgetedKVPolicy, sinks_then_newest
from .registry import register_policy


@register_policy("streaming")
@dataclass
class StreamingLLMPolicy(BudgetedKVPolicy):
    """StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks"):
    keep the first ``sink`` tokens and the most recent ``budget - sink``. Keys are cached after RoPE
    with their original positions (methods.md section 8: the positional variant accel implements;
    the paper's in-cache re-rotation is not done). Decode evicts the oldest non-sink token."""

    per_kv_head = True  # scores and budgets per KV head from its own query heads

    sink: int = 4

    evict_by: ClassVar[str] = "age"
    accumulate: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        if self.sink < 0:
            raise AccelError(f"streaming: sink must be >= 0, got {self.sink}")

    def protect(self, budgets):
        return torch.full_like(budgets, self.sink), torch.zeros_like(budgets)

    def token_scores(self, view, keys, valid, budgets, scaling):
        return sinks_then_newest(keys, valid, self.sink)

