"""HyLRA: hybrid layer-reuse attention (Ai et al., arXiv 2602.00777, 2026; runtime semantics after the
authors' Unified Cache Management code, methods.md section 1).

Per layer, from the plan (``accel.calibrate`` / ``accel plan`` produce it with the HyLRA dynamic program):

* ``full``: exact attention over the whole cache. A full layer that later layers reuse (an *anchor*)
  also emits, every decode step, the top-k token positions of its current query's attention
  probabilities: aggregated per KV head (``agg``, default mean as in the profiler), summed into chunks
  of ``chunk`` tokens, sink and recent chunks forced in, sorted. The C++ kernel hands out the logits
  it computes anyway, so emitting costs no second pass over K.
* ``reuse`` (``reuse_src`` = an earlier anchor): attends only to the anchor's positions of this
  step, read in place from this layer's own cache with the sparse kernel; no scoring over the cache.
* ``select`` (optional; UCM's "computing" layers): scores its own query over the cache, takes its own
  top-k and attends sparsely.

Prefill stays dense in every layer (as in UCM; methods.md 1.6). Decode is sparse once the context
exceeds the budget (``min_context`` can hold sparsity back on short contexts). With a budget that
covers the context every layer is exact dense attention.

Without an explicit plan, ``policy="hylra"`` uses the plan shipped for a known checkpoint
(``accel/plan/shipped_plans/``; SmolLM2-135M and Gemma-3-270m). For any other model it refuses with the command
that makes one ([INFER] decision: a silent quick calibration would hide a minutes-long step and give
an unreviewed plan): ``accel plan --model PATH --policy hylra --out plan.json`` or
``accel.calibrate(model, tok, texts)``, then ``accel.patch(model, "hylra", plan=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..attention.decode import dense_decode, dense_with_scores, own_scores, ragged_decode, ragged_sparse_attend, ragged_with_scores, sparse_attend
from ..attention.masks import first_valid_positions
from ..attention.selection import AGG_CHOICES, check_budget_knobs, select_from_scores, token_budget
from ..errors import AccelError
from ..plan import Plan
from ..plan.shipped import require_shipped_plan
from ..attention.context import LayerContext
from ..models.base import ModelInfo
from .base import AttentionPolicy
from .registry import register_policy


class _LayerReuse(AttentionPolicy):
    """Full / select / reuse decode driven by the plan; subclasses set the knobs and plan source.
    Runs over accel's full cache and over KV-compressed caches (composition with a KV policy)."""

    supports_compressed_cache = True
    plan_modes = ("full", "select", "reuse")

    def _knob(self, ctx: LayerContext, name: str):
        v = getattr(ctx.plan, name, None) if name in ("topk", "sink", "recent") else ctx.plan.params.get(name)
        return getattr(self, name) if v is None else v

    def _budget(self, ctx: LayerContext, T: int) -> int:
        topk = ctx.plan.topk if ctx.plan.topk is not None else self.topk
        ratio = ctx.plan.params.get("topk_ratio", self.topk_ratio)
        return token_budget(T, topk, ratio, self.min_topk)

    def decode(self, ctx: LayerContext, query, key, value, attention_mask, scaling, **kwargs):
        lp = ctx.plan
        T = key.shape[2]
        cl = ctx.cache_layer
        if cl is not None and getattr(cl, "is_sliding", False):
            return dense_decode(ctx, query, key, value, attention_mask, scaling)  # window layers stay exact
        if cl is not None and cl.ragged is not None:
            return self._decode_compressed(ctx, query, scaling)
        budget = self._budget(ctx, T)
        sparse_on = budget < T and T >= self.min_context
        if lp.mode == "reuse":
            sel = ctx.runtime.shared.get(("sel", lp.reuse_src))
            if not sparse_on or sel is None or sel[0] != ctx.runtime.step or sel[3] != T:
                return dense_decode(ctx, query, key, value, attention_mask, scaling)
            return sparse_attend(ctx, query, key, value, attention_mask, scaling, sel[1], sel[2])
        if lp.mode == "select" and sparse_on:
            scores, lse, valid = own_scores(query, key, attention_mask, ctx, scaling)
            idx, counts = self._select(ctx, scores, lse, valid, budget, T, key.shape[1])
            if ctx.layer_idx in ctx.runtime.donors:
                ctx.runtime.shared[("sel", ctx.layer_idx)] = (ctx.runtime.step, idx, counts, T)
            return sparse_attend(ctx, query, key, value, attention_mask, scaling, idx, counts)
        # full (or select/anchor with the budget covering the context: exact)
        if ctx.layer_idx in ctx.runtime.donors and sparse_on:
            res = dense_with_scores(ctx, query, key, value, attention_mask, scaling)
            if res is not None:
                out, scores, lse, valid = res
                idx, counts = self._select(ctx, scores, lse, valid, budget, T, key.shape[1])
                ctx.runtime.shared[("sel", ctx.layer_idx)] = (ctx.runtime.step, idx, counts, T)
                return out
        return dense_decode(ctx, query, key, value, attention_mask, scaling)

    def _decode_compressed(self, ctx, query, scaling):
        """Decode over a KV-compressed layer (``hylra+snapkv`` and the like): each KV head holds its own
        kept tokens. Anchors select from exact attention over their kept tokens, and selections travel
        as absolute positions; a reuse layer attends to the positions its heads still hold. A layer
        whose heads hold no more than the budget attends to all of them (no fewer reads are possible,
        and it is exact over the compressed cache), so a budget covering the context gives exactly the
        KV policy alone. A ``select`` layer scores with a full pass over its kept tokens."""
        lp = ctx.plan
        rg = ctx.cache_layer.ragged
        T = int(ctx.cache_layer.cumulative_length)
        budget = self._budget(ctx, T)
        # the longest head decides for the layer: hylra composes only with KV policies that give every KV head the
        # same budget (the registry refuses the per-head-budget ones), so this is the same on every tensor-parallel rank
        sparse_on = budget < int(rg.lengths.max()) and T >= self.min_context
        donor = ctx.layer_idx in ctx.runtime.donors and budget < T and T >= self.min_context
        Hkv = rg.shape[1]
        if lp.mode == "reuse":
            sel = ctx.runtime.shared.get(("sel", lp.reuse_src))
            if not sparse_on or sel is None or sel[0] != ctx.runtime.step or sel[3] != T:
                return ragged_decode(ctx, query, scaling)
            return ragged_sparse_attend(ctx, query, scaling, sel[1], sel[2])
        if (lp.mode == "select" and sparse_on) or donor:
            out, scores, lse, _ = ragged_with_scores(ctx, query, scaling)
            idx, counts = self._select(ctx, scores, lse, None, budget, T, Hkv)
            if donor:
                ctx.runtime.shared[("sel", ctx.layer_idx)] = (ctx.runtime.step, idx, counts, T)
            if lp.mode == "select" and sparse_on:
                return ragged_sparse_attend(ctx, query, scaling, idx, counts)
            return out
        return ragged_decode(ctx, query, scaling)

    def _select(self, ctx, scores, lse, valid, budget, T, Hkv):
        return select_from_scores(
            scores, lse, Hkv, budget, agg=self._knob(ctx, "agg"), chunk=int(self._knob(ctx, "chunk")),
            sink=int(self._knob(ctx, "sink")), recent=int(self._knob(ctx, "recent")),
            first_valid=first_valid_positions(valid, scores.shape[0]) if valid is not None else None, T=T,
        )

    def tensor_parallel_problem(self, plan=None) -> str | None:
        """Per KV head unless a layer's selection is shared by all heads (agg='shared', here or in the plan)."""
        aggs = {self.agg} | {lp.params.get("agg") for lp in (plan.layers if plan is not None else [])}
        if "shared" in aggs:
            return "with agg='shared' a layer's selection comes from all of its heads (agg='mean' or 'max' select per KV head)"
        return None

    def validate(self) -> None:
        check_budget_knobs(self.name, self.topk, self.topk_ratio, self.sink, self.recent, self.chunk)
        if self.agg not in AGG_CHOICES:
            raise AccelError(f"{self.name}: agg must be one of {AGG_CHOICES}, got {self.agg!r}")
        if self.min_context < 0 or self.min_topk < 0:
            raise AccelError(f"{self.name}: min_context and min_topk must be >= 0, got {self.min_context}, {self.min_topk}")


@register_policy("hylra")
@dataclass
class HyLRAPolicy(_LayerReuse):
    """Knobs (global defaults; a plan's per-layer ``topk``/``sink``/``recent``/``params`` override them):

    Args:
        topk: tokens kept per KV head in reuse/select layers, sink and recent included; None: use
            ``topk_ratio``.
        topk_ratio: fraction of the current context kept when ``topk`` is None (default 1/8).
        chunk: selection granularity in tokens (UCM uses 64-128-token blocks; 16 here [INFER], a
            better fit for 2K-8K contexts of small models).
        sink, recent: tokens always kept at the start / end [INFER defaults, methods.md 1.6 gives
            64-128 and 512 for 32K+ contexts].
        agg: aggregation of the group's query heads: 'mean' (HyLRA profiler), 'max', 'sum', 'shared'.
        min_context: decode stays dense below this many cached tokens (UCM's activation threshold).
        min_topk: with ``topk_ratio``, keep at least this many tokens ([INFER]: 64, so short prompts stay
            exact rather than attending to a handful of tokens).
    """

    calibrator = "accel.calibration.hylra:calibrate_hylra"

    topk: int | None = None
    topk_ratio: float | None = 0.125
    chunk: int = 16
    sink: int = 16
    recent: int = 64
    agg: str = "mean"
    min_context: int = 0
    min_topk: int = 64

    def build_plan(self, info: ModelInfo) -> Plan:
        plan = require_shipped_plan("hylra", info, "a layer plan (which layers attend fully and which reuse whose selection)")
        plan.params.update({f"policy.{k}": v for k, v in self.knobs().items()})
        return plan
