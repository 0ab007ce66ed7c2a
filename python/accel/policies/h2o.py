"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
arXiv 2306.14048): accumulated attention ("heavy hitters") + recent tokens, the accumulation continued at every
decode step."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AccelError
from .budgeted import _NEG, FORCED, BudgetedKVPolicy, group_agg
from .registry import register_policy


def column_sums(query, keys, valid, scaling: float, max_elems: int = 1 << 24) -> torch.Tensor:
    """H2O's prefill statistic: for every key, the attention it receives summed over all (causal)
    prompt queries, [B, H, T] fp32. Computed in query blocks (bounded memory), each block against the
    keys up to its last query only (causality halves the work)."""
    B, H, T, D = query.shape
    Hkv = keys.shape[1]
    G = H // Hkv
    k = keys.float()
    out = torch.zeros(B, Hkv, G, T, device=keys.device)
    blk = max(16, min(T, max_elems // max(1, B * H * T)))
    for a in range(0, T, blk):
        e = min(T, a + blk)
        qb = query[:, :, a:e].float().reshape(B, Hkv, G * (e - a), D)
        logits = torch.matmul(qb, k[:, :, :e].transpose(-1, -2)).mul_(scaling).view(B, Hkv, G, e - a, e)
        ar = torch.arange(a, e, device=keys.device)
        diag = ar.view(-1, 1) < ar.view(1, -1)  # future keys of the block
        logits[..., a:e].masked_fill_(diag, _NEG)
        if valid is not None:
            logits.masked_fill_(~valid[:, :e].view(B, 1, 1, 1, e), _NEG)
        p = torch.softmax(logits, -1)
        if valid is not None:
            p = p.nan_to_num_(0.0) * valid[:, a:e].view(B, 1, 1, e - a, 1)
        out[..., :e] += p.sum(3)
    return out.view(B, H, T)


@register_policy("h2o")
@dataclass
class H2OPolicy(BudgetedKVPolicy):
    """H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference"): each
    KV head keeps ``recent_ratio`` of its budget as the most recent tokens and the rest as heavy
    hitters, the tokens with the largest attention accumulated over all queries so far (prefill
    column sums, then every decode step; GQA: mean over the group). Evicts the lowest accumulated
    score outside the recent window. Its prefill statistic needs the whole attention matrix, so
    compression costs about one extra attention pass."""

    per_kv_head = True  # scores and budgets per KV head from its own query heads

    recent_ratio: float = 0.5
    agg: str = "mean"

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.recent_ratio <= 1:
            raise AccelError(f"h2o: recent_ratio must be in [0, 1], got {self.recent_ratio}")

    def protect(self, budgets):
        return torch.zeros_like(budgets), torch.floor(budgets.double() * self.recent_ratio).long()

    def prefill_statistics(self, query, keys, valid, scaling) -> dict:
        return {"colsum": column_sums(query, keys, valid, scaling)}

    def token_scores(self, view, keys, valid, budgets, scaling):
        B, Hkv, T, _ = keys.shape
        s = group_agg(view.statistic("colsum", lambda q: column_sums(q, keys, valid, scaling)), Hkv, self.agg)
        self._raw = s.clone()
        recent = torch.floor(budgets.double() * self.recent_ratio).long().to(s.device)  # [B, Hkv]
        t = torch.arange(T, device=s.device).view(1, 1, T)
        s = torch.where(t >= T - recent.view(B, Hkv, 1), FORCED + t.double(), s.double())
        return s

