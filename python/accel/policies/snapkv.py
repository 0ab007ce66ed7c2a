"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You Are Looking for Before Generation", arXiv 2404.14469):
prefix tokens scored by the attention of the last ``window`` prompt queries, smoothed by 1-D pooling, top tokens per
KV head plus the window."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import AccelError
from .budgeted import _NEG, FORCED, BudgetedKVPolicy, PrefillView, group_agg
from .registry import register_policy


def window_attention(q_window, keys, valid, scaling: float) -> torch.Tensor:
    """Attention probabilities of the last ``w`` prompt queries (``q_window`` [B, H, w, D]) over all
    prompt keys, summed over those queries: [B, H, T] (fp32). Causal inside the window; padding keys
    get 0."""
    B, H, w, D = q_window.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    q = q_window.float()
    k = keys.float().repeat_interleave(H // Hkv, 1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, w, T]
    dev = keys.device
    qpos = torch.arange(T - w, T, device=dev).view(1, 1, w, 1)
    mask = torch.arange(T, device=dev).view(1, 1, 1, T) <= qpos
    if valid is not None:
        mask = mask & valid.view(B, 1, 1, T)
    logits = logits.masked_fill(~mask, _NEG)
    return torch.softmax(logits, -1).nan_to_num(0.0).sum(2)


def pool1d(x: torch.Tensor, kernel: int, mode: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """SnapKV's smoothing of per-token scores [B, Hkv, T] along T (same length). Windows at the
    edges, and next to left padding, average over the real tokens they cover only."""
    if kernel <= 1:
        return x
    B, Hkv, T = x.shape
    pad = kernel // 2
    if mode == "max":
        y = x if valid is None else x.masked_fill(~valid.view(B, 1, T), _NEG)
        y = F.max_pool1d(y.reshape(B * Hkv, 1, T), kernel, stride=1, padding=pad)
        return y[..., :T].reshape(B, Hkv, T)
    w = torch.ones(B, 1, T, device=x.device) if valid is None else valid.view(B, 1, T).float()
    num = F.avg_pool1d((x * w).reshape(B * Hkv, 1, T), kernel, stride=1, padding=pad, count_include_pad=True)
    den = F.avg_pool1d(w.expand(B, Hkv, T).reshape(B * Hkv, 1, T), kernel, stride=1, padding=pad, count_include_pad=True)
    return (num / den.clamp(min=1e-9))[..., :T].reshape(B, Hkv, T)


def snapkv_scores(view: "PrefillView", keys, valid, scaling: float, window: int, kernel: int, pooling: str = "avg",
                  agg: str = "mean") -> torch.Tensor:
    """SnapKV's per-token statistic [B, Hkv, T] fp32: the last ``window`` prompt queries' attention,
    aggregated over the GQA group (``agg``), smoothed by 1-D ``pooling`` over ``kernel`` tokens."""
    Hkv, T = keys.shape[1], keys.shape[2]
    a = group_agg(window_attention(view.window_queries(min(window, T)), keys, valid, scaling), Hkv, agg)
    return pool1d(a, kernel, pooling, valid)


def force_window(s: torch.Tensor, window: int) -> torch.Tensor:
    """SnapKV's keep scores: the statistic ``s`` [B, Hkv, T] as float64 with the last ``window`` prompt tokens (the
    observation window) forced in, newest highest."""
    T = s.shape[-1]
    w = min(window, T)
    s = s.double()
    s[..., T - w:] = FORCED + torch.arange(T - w, T, dtype=torch.float64, device=s.device)
    return s


@register_policy("snapkv")
@dataclass
class SnapKVPolicy(BudgetedKVPolicy):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You Are Looking for Before Generation"): each
    prefix token is scored by the attention the last ``window`` prompt queries give it (summed),
    smoothed by 1-D ``pooling`` over ``kernel`` tokens, aggregated over the GQA group (``agg``); every
    KV head keeps its top ``budget - window`` plus the window. Defaults from methods.md: window 32,
    kernel 7, [INFER] average pooling (the SnapKV code offers avg and max)."""

    per_kv_head = True  # scores and budgets per KV head from its own query heads

    window: int = 32
    kernel: int = 7
    pooling: str = "avg"
    agg: str = "mean"

    def validate(self) -> None:
        super().validate()
        if self.window < 1 or self.kernel < 1:
            raise AccelError(f"{self.name}: window and kernel must be >= 1, got {self.window}, {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise AccelError(f"{self.name}: pooling must be 'avg' or 'max', got {self.pooling!r}")
        if self.agg not in ("mean", "max", "sum"):
            raise AccelError(f"{self.name}: agg must be mean, max or sum, got {self.agg!r}")

    def protect(self, budgets):
        return torch.zeros_like(budgets), torch.full_like(budgets, self.window).minimum(budgets)

    def prefill_statistics(self, query, keys, valid, scaling) -> dict:
        return {"q_window": query[:, :, -self.window:].detach().clone()}

    def token_scores(self, view, keys, valid, budgets, scaling):
        s = snapkv_scores(view, keys, valid, scaling, self.window, self.kernel, self.pooling, self.agg)
        self._raw = s.clone()
        return force_window(s, self.window)

