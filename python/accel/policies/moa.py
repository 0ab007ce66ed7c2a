"""MoA: Mixture of Attention Spans (Fu et al., thu-nics/MoA, arXiv 2406.14909; methods.md section 4).

Every KV head has its own elastic span ``alpha + beta * N``, chosen offline (``accel plan --policy moa``
/ ``accel.calibrate(..., policy="moa")``: a per-head profile at several lengths and a mixed-integer
program solved with HiGHS through scipy, ``accel.calibration.moa``). At run time a head keeps
``cache = alpha + beta * (prompt + max_new_tokens)`` tokens (clamped to [128, prompt + max_new],
rounded up to 64): the first ``min(cache, 64)`` tokens as static sinks and the rest as a circular
window of the most recent tokens, so its memory is constant during decode. The plan holds one span
assignment per density; ``density`` picks one (default: the plan's own).

Prefill is sparse too (``sparse_prefill``, default on): each query head attends to its KV head's sink
and band in 64x64 blocks with accel's block-sparse kernel (MoA builds its masks in the same blocks);
layers whose spans cover the prompt, and padded batches, use dense prefill. Every head with
``alpha = 0, beta = 1`` is exactly dense. GQA: spans are per KV head (the group shares one cache, as
methods.md 4.1 allows instead of MoA's MHA conversion).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import math

import torch

from ..errors import AccelError
from ..attention.masks import prompt_valid
from ..models.base import ModelInfo
from ..plan import Plan
from ..plan.shipped import require_shipped_plan
from .budgeted import BudgetedKVPolicy, sinks_then_newest
from .registry import register_policy


# MoA's span constants (methods.md 4.1): the sink, the smallest cache and the rounding of a head's span
MOA_SINK = 64
MOA_MIN_CACHE = 128
MOA_SPLIT = 64


def moa_span(alpha: float, beta: float, n: int, sink: int = MOA_SINK, min_cache: int = MOA_MIN_CACHE,
             split: int = MOA_SPLIT) -> int:
    """MoA's cache size of a head for ``n`` tokens (methods.md 4.1): ``alpha + beta * n`` clamped to
    [min_cache, n], rounded up to a multiple of ``split``, never above ``n``."""
    s = alpha + beta * n
    s = max(min_cache, min(n, s))
    s = int(math.ceil(s / split) * split)
    return min(n, s)


@register_policy("moa")
@dataclass
class MoAPolicy(BudgetedKVPolicy):
    budget_ratio: float | None = None  # MoA's budget is the plan's density
    density: float | None = None
    max_new_tokens: int = 1024
    sparse_prefill: bool = True

    evict_by: ClassVar[str] = "age"
    accumulate: ClassVar[bool] = False
    needs_plan: ClassVar[bool] = True
    per_kv_head: ClassVar[bool] = True  # each KV head's span is its own (the plan's, at the model's head index)
    calibrator: ClassVar[str] = "accel.calibration.moa:calibrate_moa"
    plan_modes: ClassVar[tuple] = ("full", "compress")
    head_kinds: ClassVar[tuple] = ("budget",)

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise AccelError(f"moa: max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.density is not None and not 0 < float(self.density) <= 1:
            raise AccelError(f"moa: density must be in (0, 1], got {self.density!r}")
        if self.decode not in ("fixed", "grow"):
            raise AccelError(f"moa: decode must be 'fixed' or 'grow', got {self.decode!r}")
        if not isinstance(self.sparse_prefill, bool):
            raise AccelError(f"moa: sparse_prefill must be True or False, got {self.sparse_prefill!r}")
        self.dense_prefill = not self.sparse_prefill

    def build_plan(self, info: ModelInfo) -> Plan:
        return require_shipped_plan("moa", info, "per-head spans")

    # -- spans ------------------------------------------------------------------------------------------
    def _spans(self, plan, layer_idx: int) -> list[tuple[float, float]]:
        if plan is None:
            raise AccelError("moa: no plan attached (patch the model with a moa plan)")
        lp = plan.layers[layer_idx]
        if self.density is not None:
            sols = (plan.params or {}).get("solutions", {})
            key = next((k for k in sols if abs(float(k) - float(self.density)) < 1e-9), None)
            if key is None:
                raise AccelError(f"moa: the plan has no solution for density {self.density}; it has "
                                 f"{sorted(sols)}. Re-run `accel plan --policy moa --densities ...`")
            full = [i for i, l in enumerate(plan.layers) if l.heads is not None]
            return [tuple(x) for x in sols[key][full.index(layer_idx)]]
        if lp.heads is None or any(h.alpha is None or h.beta is None for h in lp.heads):
            raise AccelError(f"moa: plan layers[{layer_idx}] has no per-head alpha/beta; make it with `accel plan --policy moa`")
        return [(h.alpha, h.beta) for h in lp.heads]

    def _caches(self, layer_idx: int, n: torch.Tensor, Hkv: int, reserve: int = 0) -> torch.Tensor:
        """[B, Hkv] MoA cache sizes for prompts of ``n`` tokens."""
        spans = self._spans(getattr(self, "_plan", None), layer_idx)
        off = getattr(self, "_kv_offset", 0)  # a tensor-parallel rank's heads among the plan's (the model's)
        spans = spans[off:off + Hkv]
        out = torch.zeros(n.shape[0], Hkv, dtype=torch.long)
        for b in range(n.shape[0]):
            nb = int(n[b])
            total = nb + (max(0, reserve - nb) if reserve else self.max_new_tokens)
            for h, (a, be) in enumerate(spans):
                out[b, h] = moa_span(a, be, total, MOA_SINK, MOA_MIN_CACHE, MOA_SPLIT)
        return out

    def head_budgets(self, layer_idx, num_layers, n, Hkv, view, keys, valid, scaling):
        caches = self._caches(layer_idx, n, Hkv)
        total = n + self.max_new_tokens
        self._grow = caches >= total.view(-1, 1)  # a head whose span covers everything keeps everything
        return torch.minimum(caches, n.view(-1, 1)).clone()

    def growing_heads(self, budgets, n):
        return self._grow.clone() if self.decode == "fixed" else torch.ones_like(budgets, dtype=torch.bool)

    def protect(self, budgets):
        return budgets.clamp(max=MOA_SINK), torch.zeros_like(budgets)  # static part: min(cache, 64)

    def token_scores(self, view, keys, valid, budgets, scaling):
        return sinks_then_newest(keys, valid, budgets.clamp(max=MOA_SINK))

    # -- sparse prefill ---------------------------------------------------------------------------------
    def prefill_attention(self, ctx, query, key, value, attention_mask, scaling):
        """Block-sparse sink + band prefill per head, or None (dense) where it would not be exact MoA."""
        if not self.sparse_prefill or ctx.cache_layer is None or ctx.cache_layer.is_sliding:
            return None
        B, H, T, D = query.shape
        if key.shape[2] != T:
            return None  # a continuation: dense over the cache
        if prompt_valid(attention_mask, B, T) is not None:
            return None  # padding: the block kernel has no padding mask
        self._plan, self._kv_offset = ctx.runtime.plan, ctx.runtime.kv_offset
        Hkv = key.shape[1]
        caches = self._caches(ctx.layer_idx, torch.tensor([T]), Hkv)[0]  # spans at this prompt + max_new
        if bool((caches >= T).all()):
            return None
        from ..ops.sparse import block_sparse_prefill, sink_window_blocks

        G = H // Hkv
        sinks = [min(int(caches[h // G]), MOA_SINK) for h in range(H)]
        wins = [max(0, int(caches[h // G]) - sinks[h]) if int(caches[h // G]) < T else T for h in range(H)]
        blocks, counts = sink_window_blocks(H, T, T, sink=sinks, window=wins)
        out = block_sparse_prefill(query, key, value, blocks, counts, scale=scaling)
        return out.transpose(1, 2).contiguous()
