"""What the calibrators share: a dense prefill that records each layer's last queries and its keys (``Recorder``),
the synthetic retrieval prompts they profile on (seeds disjoint from the evaluation's), and a progress bar."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..policies.base import AttentionPolicy

CALIB_SEED = 9_000_000  # evaluation samples use seed * 1000 + i with small seeds



@dataclass
class Recorder(AttentionPolicy):
    """Dense prefill that keeps each layer's last ``steps`` query rows and its keys."""

    steps: int = 64
    keep_values: bool = False

    def __post_init__(self):
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.values: dict[int, torch.Tensor] = {}

    def prefill(self, ctx, query, key, value, attention_mask, scaling, **kwargs):
        self.records[ctx.layer_idx] = (query[0, :, -self.steps:, :].float().clone(), key[0].float().clone(), float(scaling))
        if self.keep_values:
            self.values[ctx.layer_idx] = value[0].float().clone()
        return super().prefill(ctx, query, key, value, attention_mask, scaling, **kwargs)



Recorder.name = "profile"


def calibration_prompts(tokenizer, n: int, tokens: int) -> list[str]:
    """Synthetic retrieval prompts with their answers appended (half passkey, half NIAH)."""
    from ..eval.niah import make_niah
    from ..eval.passkey import make_passkey

    out = []
    for i in range(n):
        make = make_passkey if i % 2 == 0 else make_niah
        s = make(tokenizer, tokens - 24, depth=(0.1 + 0.8 * ((i * 0.37) % 1.0)), seed=CALIB_SEED + i)
        out.append(s.prompt + " " + s.answer)
    return out



def progress_bar(enabled: bool, total: int, desc: str, unit: str = "text"):
    """A tqdm bar, or None when disabled or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit=unit)
