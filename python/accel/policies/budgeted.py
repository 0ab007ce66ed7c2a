"""The shared base of accel's KV-cache compression policies (StreamingLLM, SnapKV, PyramidKV, H2O, DuoAttention-style
heads, Task-KV, MoA): budgets, compression into the ragged cache with real per-head memory savings, and decode-time
eviction (methods.md section 8).

Every subclass compresses each full-attention layer right after the prompt's KV is written (the prefill itself is
exact), into accel's ragged cache (``accel.cache.ragged``): every KV head keeps its own tokens in its own rows, and
the rest of the memory is released. Under GQA the query heads of a group are aggregated (``agg``: mean, max or sum)
so one KV head keeps one set.

Budgets: ``budget`` tokens per KV head, or ``budget_ratio`` of the prompt's (unpadded) length; a budget that covers
the prompt is a no-op (the cache stays dense and exact). During decode (``decode="fixed"``, default) each head stays
at its budget: every new token evicts one kept token (the lowest eviction score outside the protected sink / recent
tokens), so a long generation does not grow the cache. ``decode="grow"`` keeps all generated tokens, as the SnapKV and
PyramidKV papers do. [INFER] decode-time eviction for SnapKV/PyramidKV uses H2O-style accumulated attention seeded by
the SnapKV scores, protecting the window; StreamingLLM evicts the oldest non-sink token; H2O is defined that way.

Left-padded batches: padding is never kept (each row's sinks start at its first real token and its budget follows
its own length).

A subclass writes ``token_scores`` (its statistic) and, where it differs, ``prefill_statistics`` (what a copy of the
prompt's cache needs recorded to be compressed later), ``layer_budget`` / ``head_budgets``, ``protect`` and
``evict_by``. Its per-sequence eviction state (budgets, protected tokens, eviction order) is an ``EvictionState`` in
the runtime's per-sequence layer state, never on the cache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention.context import LayerContext
from ..attention.masks import first_valid_positions, prompt_valid
from ..errors import AccelError
from .base import KVCachePolicy

logger = logging.getLogger("accel")

_NEG = float("-inf")
_POS = float("inf")
#: forced tokens (sinks, windows, recent) score FORCED + position, in float64: above any statistic,
#: and when a budget is smaller than the forced set, the newest forced tokens win deterministically
FORCED = 1e12



def group_agg(x: torch.Tensor, Hkv: int, agg: str) -> torch.Tensor:
    """[B, H, T] -> [B, Hkv, T] over the GQA group."""
    B, H, T = x.shape
    x = x.view(B, Hkv, H // Hkv, T)
    if agg == "mean":
        return x.mean(2)
    if agg == "max":
        return x.amax(2)
    return x.sum(2)


class PrefillView:
    """What compression knows about the prompt: the live prefill queries, or the statistics a policy's
    ``prefill_statistics`` recorded during a shared dense prefill (the evaluation harness prefills each sample once
    and compresses a copy of the cache per policy)."""

    def __init__(self, query=None, recorded: dict | None = None):
        self.query, self.recorded = query, recorded or {}

    def window_queries(self, w: int) -> torch.Tensor:
        """The last ``w`` prompt queries [B, H, w, D] (recorded as ``q_window``)."""
        if self.query is not None:
            return self.query[:, :, -w:]
        qw = self.recorded.get("q_window")
        if qw is None or qw.shape[2] < w:
            raise AccelError(f"prefill statistics hold {0 if qw is None else qw.shape[2]} window queries, {w} needed; "
                             "record them with the policy that compresses the cache (prefill_statistics)")
        return qw[:, :, -w:]

    def statistic(self, name: str, compute):
        """``compute(query)`` from the live prefill, else the recorded statistic ``name``."""
        if self.query is not None:
            return compute(self.query)
        if name not in self.recorded:
            raise AccelError(f"this policy needs the prompt statistic {name!r}; record it during the prefill with the "
                             "policy's prefill_statistics")
        return self.recorded[name]


def merge_statistics(into: dict, new: dict) -> dict:
    """Several policies' recorded statistics for one layer: where two record the same name, the larger tensor wins
    (a longer observation window holds the shorter one)."""
    for k, v in new.items():
        if k not in into or v.numel() > into[k].numel():
            into[k] = v
    return into


@dataclass(eq=False)
class EvictionState:
    """One compressed layer's decode-time eviction for one sequence, kept in the runtime's per-sequence layer state
    (``ctx.state``), never on the cache. Per-head tensors are indexed by the batch rows the layer had when it was
    compressed; ``RaggedKV.batch_origin`` maps the current rows to them after beam-search reorders."""

    budget: torch.Tensor  # [B, Hkv] int64 tokens kept (int64 max: a growing head, never evicts)
    sink_end: torch.Tensor  # [B, Hkv] positions below are protected sinks
    recent: torch.Tensor  # [B, Hkv] newest tokens protected
    evict_by: str  # "score" (lowest eviction score first) or "age" (oldest first)
    accumulate: bool  # decode attention adds each kept token's attention to its eviction score (H2O)
    _flat: tuple | None = None  # (batch_version, flattened tensors for the C++ eviction)

    def current(self, rg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(budget, sink_end, recent) in the ragged layer's current batch order, flattened [B*Hkv] and contiguous."""
        if self._flat is None or self._flat[0] != rg.batch_version:
            o = rg.batch_origin
            self._flat = (rg.batch_version, self.budget[o].reshape(-1).contiguous(),
                          self.sink_end[o].reshape(-1).long().contiguous(), self.recent[o].reshape(-1).long().contiguous())
        return self._flat[1:]


def sinks_then_newest(keys, valid, sink) -> torch.Tensor:
    """Keep scores of position-based policies (StreamingLLM, DuoAttention's streaming heads, MoA): the
    first ``sink`` real tokens of each row forced (``sink``: int or [B, Hkv]), then the newest tokens."""
    B, Hkv, T, _ = keys.shape
    t = torch.arange(T, device=keys.device).view(1, 1, T)
    fv = first_valid_positions(valid, B).to(keys.device).view(B, 1, 1)
    sk = sink.to(keys.device).view(B, Hkv, 1) if isinstance(sink, torch.Tensor) else sink
    return torch.where((t >= fv) & (t < fv + sk), 2 * FORCED - t, t.double()).expand(B, Hkv, T)


def force_sinks_and_recent(score: torch.Tensor, valid, sink: int, recent: int) -> torch.Tensor:
    """``score`` [B, Hkv, T] as float64 with each row's first ``sink`` real tokens and its last ``recent``
    tokens forced in (``FORCED + position``)."""
    B, _, T = score.shape
    t = torch.arange(T, device=score.device).view(1, 1, T)
    fv = first_valid_positions(valid, B).to(score.device).view(B, 1, 1)
    forced = ((t >= fv) & (t < fv + sink)) | (t >= T - recent)
    return torch.where(forced, FORCED + t.double(), score.double())


def keep_top(score: torch.Tensor, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, h): the ``budgets[b, h]`` highest-scoring tokens (-inf never kept), sorted by position.
    Returns (keep [B, Hkv, M] int64, counts [B, Hkv])."""
    B, Hkv, T = score.shape
    M = int(min(T, budgets.max())) if budgets.numel() else 0
    M = max(M, 1)
    top = score.topk(M, dim=-1)
    ok = (torch.arange(M, device=score.device).view(1, 1, M) < budgets.to(score.device).view(B, Hkv, 1)) & (top.values > _NEG)
    counts = ok.sum(-1)
    idx = torch.where(ok, top.indices, T)  # invalid entries sort to the end
    idx = idx.sort(-1).values
    return idx.clamp(max=T - 1).cpu(), counts.cpu()  # cache metadata lives on the CPU


@dataclass
class BudgetedKVPolicy(KVCachePolicy):
    """Shared machinery: budgets, validity, compression into the ragged cache, decode-time eviction.

    Subclasses implement ``token_scores`` (higher = keep; +inf forced, -inf never) and may override
    ``layer_budget`` (per-layer budgets), ``protect`` (sink/recent protected at decode) and
    ``evict_by`` ("score": lowest score first, "age": oldest first).
    """

    budget: int | None = None
    budget_ratio: float | None = 0.25
    decode: str = "fixed"
    #: the fewest tokens a head keeps whatever the budget says (None: the policy's own sink + window + recent,
    #: 0: no floor). Below it the policy's own structure does not fit (SnapKV's observation window alone is 32
    #: tokens), so a short prompt stays whole instead of being cut to a few tokens.
    min_budget: int | None = None

    evict_by: ClassVar[str] = "score"
    accumulate: ClassVar[bool] = True

    def validate(self) -> None:
        if self.budget is None and self.budget_ratio is None:
            raise AccelError(f"{self.name}: give a budget (tokens per KV head) or a budget_ratio in (0, 1]")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise AccelError(f"{self.name}: budget must be a positive number of tokens per KV head, got {self.budget!r}")
        if self.budget is None and not (0 < float(self.budget_ratio) <= 1):
            raise AccelError(f"{self.name}: budget_ratio must be in (0, 1], got {self.budget_ratio!r}")
        if self.decode not in ("fixed", "grow"):
            raise AccelError(f"{self.name}: decode must be 'fixed' (stay at the budget) or 'grow', got {self.decode!r}")
        if self.min_budget is not None and (not isinstance(self.min_budget, int) or self.min_budget < 0):
            raise AccelError(f"{self.name}: min_budget must be a number of tokens >= 0 (or None: sink + window + "
                             f"recent), got {self.min_budget!r}")

    def budget_floor(self) -> int:
        """Tokens per head no budget goes below: ``min_budget``, by default the policy's sink + observation window +
        recent tokens (the part of its kept set that does not depend on the budget)."""
        if self.min_budget is not None:
            return int(self.min_budget)
        return sum(int(getattr(self, a, 0) or 0) for a in ("sink", "window", "recent"))

    # -- budgets -----------------------------------------------------------------------------------------
    def base_budget(self, n: torch.Tensor) -> torch.Tensor:
        """Average tokens per KV head for prompts of ``n`` real tokens ([B] -> [B] int64)."""
        if self.budget is not None:
            return torch.full_like(n, int(self.budget))
        return torch.ceil(n.double() * float(self.budget_ratio)).long().clamp(min=1)

    def layer_budget(self, layer_idx: int, num_layers: int, base: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return base

    def head_budgets(self, layer_idx: int, num_layers: int, n: torch.Tensor, Hkv: int, view, keys, valid,
                     scaling) -> torch.Tensor:
        """[B, Hkv] tokens each head keeps (policies with per-head budgets override)."""
        return self.layer_budget(layer_idx, num_layers, self.base_budget(n), n).view(-1, 1).expand(-1, Hkv).clone()

    def growing_heads(self, budgets: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """[B, Hkv] bool: heads that keep every decode token (``decode="grow"``: all of them)."""
        return torch.full_like(budgets, self.decode == "grow", dtype=torch.bool)

    def protect(self, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, Hkv] sink tokens, [B, Hkv] recent tokens) never evicted during decode."""
        z = torch.zeros_like(budgets)
        return z, z

    # -- compression -----------------------------------------------------------------------------------
    def token_scores(self, view: PrefillView, keys, valid, budgets, scaling) -> torch.Tensor:
        """[B, Hkv, T] keep scores (higher = keep, >= FORCED forced, -inf never)."""
        raise NotImplementedError

    STATE_KEY: ClassVar[str] = "eviction"

    def after_prefill(self, ctx: LayerContext, query, attention_mask) -> None:
        cl = ctx.cache_layer
        if cl is None:
            raise AccelError(
                f"{self.name} compresses accel's cache, but this forward pass uses another cache object; "
                "let accel create the cache (pass no cache, or an empty DynamicCache)"
            )
        if cl.is_sliding:
            return  # window layers are bounded already
        if cl.ragged is not None:  # more prompt tokens on a compressed cache: back down to the budgets, as a decode
            self.after_decode(ctx, query, attention_mask)  # step does (not under decode="grow"; a lost state raises)
            return
        T = cl.end - cl.start
        # a prompt continued on a cache the budget covered so far (a second turn, a chunked prompt): compress what
        # the cache holds now, observed by this chunk's queries (they are the newest positions, as a one-shot
        # prefill's observation window is)
        valid = prompt_valid(attention_mask, cl.keys.shape[0], T)
        scaling = getattr(ctx.module, "scaling", None) or query.shape[-1] ** -0.5
        self.compress(cl, ctx.layer_idx, ctx.runtime.info.num_layers, PrefillView(query=query), valid, scaling,
                      ctx.state, reserve=int(getattr(ctx.runtime, "reserve", 0) or 0), plan=ctx.runtime.plan,
                      kv_offset=ctx.runtime.kv_offset)

    def compress(self, cl, layer_idx: int, num_layers: int, view: PrefillView, valid, scaling: float, state: dict,
                 reserve: int = 0, plan=None, kv_offset: int = 0) -> None:
        """Compress one full-attention ``AccelLayer`` holding a prompt (``valid``: [B, T] real tokens); the layer's
        eviction state goes into ``state`` (this sequence's layer state). ``kv_offset``: the model's index of the
        layer's first KV head (a tensor-parallel rank's slice; per-head plans are indexed by the model's heads)."""
        keys = cl.keys
        B, Hkv, T, _ = keys.shape
        # budget bookkeeping on the CPU (the ragged cache's metadata lives there); scores on the data's device
        n = valid.sum(1).cpu() if valid is not None else torch.full((B,), T, dtype=torch.long)
        self._plan, self._kv_offset = plan, kv_offset
        budgets = self.head_budgets(layer_idx, num_layers, n, Hkv, view, keys, valid, scaling).clamp(min=1)
        floor = self.budget_floor()
        if floor and bool((budgets < floor).any()):
            log = logger.warning if self.budget is not None else logger.info  # an explicit budget was overridden
            log("%s: layer %d budgets raised to the floor of %d tokens per head (min_budget)", self.name,
                layer_idx, floor)
            budgets = budgets.clamp(min=floor)
        budgets = torch.minimum(budgets, n.view(B, 1))
        # a head whose budget covers its prompt is not compressed at all: like the dense no-op, it keeps
        # every generated token too (so a padded batch behaves as each row alone)
        grow = self.growing_heads(budgets, n) | (budgets >= n.view(B, 1))
        if valid is None and bool((budgets >= T).all()):
            return  # the budget covers the prompt: nothing to drop, the cache stays dense and exact
        self._raw = None
        score = self.token_scores(view, keys, valid, budgets, scaling)
        if valid is not None:
            score = score.masked_fill(~valid.view(B, 1, T), _NEG)
        seed = None
        if self.evict_by == "score":  # the statistic itself (before forcing), where a policy kept it
            seed = self._raw if self._raw is not None else score.masked_fill(score >= FORCED, 0.0)
        self._raw = None
        sink, recent = self.protect(budgets)
        self._store(cl, state, score, budgets, grow, valid, reserve, seed, sink, recent)

    def _store(self, cl, state: dict, score, budgets, grow, valid, reserve: int, seed, sink, recent) -> None:
        """Keep each head's top ``budgets`` tokens of ``score`` in the layer's ragged pool and set up its
        decode-time eviction in ``state``: heads in ``grow`` keep every new token, the others stay at their budget,
        evicting outside ``sink`` (per row, from its first real token) and ``recent`` ([B, Hkv])."""
        B, Hkv, T = score.shape
        keep, counts = keep_top(score, budgets)
        caps = torch.where(grow, counts + max(64, reserve - T + 1), counts + 1)
        cl.compress(keep, counts, caps, scores=seed)
        state[self.STATE_KEY] = EvictionState(
            budget=torch.where(grow, torch.iinfo(torch.int64).max, budgets),  # growing heads never evict
            sink_end=first_valid_positions(valid, B).view(B, 1) + sink,  # positions below: protected sinks
            recent=recent, evict_by=self.evict_by,
            accumulate=self.accumulate and self.decode == "fixed" and self.evict_by == "score")

    def scored_layer(self, layer_idx: int, plan) -> bool:
        """Whether a compressed layer evicts by a score its decode steps accumulate (the cost model's ``kv_scored``
        kind) rather than by age or a fixed score (``kv_plain``); per layer where a plan sets the rule per layer."""
        return bool(self.accumulate) and self.evict_by == "score"

    def accumulates(self, ctx: LayerContext) -> bool:
        st = ctx.state.get(self.STATE_KEY)
        return st is not None and st.accumulate

    @torch.no_grad()  # statistics and eviction are bookkeeping: never build an autograd graph
    def compress_recorded(self, cache, runtime, attention_mask=None) -> None:
        """Compress a (forked) ``AccelCache`` whose prefill recorded ``prefill_stats`` (the evaluation harness
        prefills each sample once and compresses a copy per policy); the eviction state goes into the runtime's
        per-sequence state of ``cache``."""
        stats = getattr(cache, "prefill_stats", None) or {}
        seq = runtime.sequence(cache)
        modules = list(runtime.adapter.attention_modules())
        for i, layer in enumerate(cache.layers):
            if layer.is_sliding or layer.ragged is not None or layer.keys is None:
                continue
            T = layer.end - layer.start
            valid = prompt_valid(attention_mask, layer.keys.shape[0], T) if attention_mask is not None else None
            view = PrefillView(recorded=stats.get(i, {}))
            scaling = getattr(modules[i], "scaling", None) or layer.keys.shape[-1] ** -0.5
            self.compress(layer, i, len(cache.layers), view, valid, scaling, seq.layer_state.setdefault(i, {}),
                          reserve=int(runtime.reserve or 0), plan=runtime.plan, kv_offset=runtime.kv_offset)

    def after_decode(self, ctx: LayerContext, query, attention_mask) -> None:
        cl = ctx.cache_layer
        if cl is None or cl.ragged is None or self.decode != "fixed":
            return
        st = ctx.state.get(self.STATE_KEY)
        if st is None:
            raise AccelError(
                f"{self.name}: layer {ctx.layer_idx} of this cache is compressed but its eviction state is gone (the "
                "cache was copied other than with copy.deepcopy, or compressed by another KV policy); continue the "
                "cache a patched call returned, or copy it with copy.deepcopy"
            )
        self.evict_to_budget(cl.ragged, st)

    @staticmethod
    def evict_to_budget(rg, st: EvictionState | None) -> None:
        """Evict from every head of the ragged layer ``rg`` until it holds no more than its budget."""
        if st is None:
            return
        from .. import _ext

        budget, sink_end, recent = st.current(rg)
        if _ext.HAS_CPU_EXT and rg.k.device.type == "cpu":
            _ext.cpu_ext().ragged_evict(rg.k, rg.v, rg.pos, rg.score, rg.offsets.reshape(-1), rg.lengths.view(-1),
                                        budget, sink_end, recent, st.evict_by != "score")
            return
        shape = rg.shape
        while True:
            over = rg.lengths.long() > budget.view(shape)
            if not bool(over.any()):
                return
            rg.evict(victims(rg, sink_end.view(shape), recent.view(shape), st.evict_by), over)


def victims(rg, sink_end: torch.Tensor, recent: torch.Tensor, evict_by: str) -> torch.Tensor:
    """[B, Hkv] slot to evict in every head of a compressed layer: the lowest eviction score (or the oldest token,
    ``evict_by == "age"``) outside the protected sinks (positions below ``sink_end``) and ``recent`` newest tokens;
    if every live token is protected, the oldest non-sink token."""
    rows, live = rg.rows()
    pos = rg.pos[rows]
    newest = pos.masked_fill(~live, -1).amax(-1, keepdim=True)
    sink_end = sink_end.view(*rg.shape, 1)
    recent = recent.view(*rg.shape, 1)
    protected = (pos < sink_end) | (pos > newest - recent)
    cand = live & ~protected
    if evict_by == "score":
        key = rg.score[rows].masked_fill(~cand, _POS)
        pick = key.argmin(-1)
        has = cand.any(-1)
    else:
        pick = pos.float().masked_fill(~cand, _POS).argmin(-1)
        has = cand.any(-1)
    fallback = live & (pos >= sink_end)
    fb = pos.float().masked_fill(~fallback, _POS).argmin(-1)
    last = pos.float().masked_fill(~live, _POS).argmin(-1)
    return torch.where(has, pick, torch.where(fallback.any(-1), fb, last))
