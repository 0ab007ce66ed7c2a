"""Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024,
arXiv 2406.10774; methods.md 7.5): query-aware page selection at decode time.

Per KV head, every page of ``page_size`` tokens keeps the element-wise min ``m`` and max ``M`` of its keys, updated
incrementally as pages fill (``accel.cache.quest.QuestMetadata``, kept in the sequence's layer state). For the current
query ``q`` a page's criticality is the upper bound ``U = sum_d max(q_d M_d, q_d m_d)`` of every ``q . k`` in it. Each
decode step attends exactly over ``max(min_pages, ceil(budget / page_size))`` pages, the current (last) page always
among them (as in Quest's code) and the others those with the highest bounds, read in place from the cache with
accel's sparse decode kernel. Prefill is dense; the first
``dense_layers`` layers stay dense (the paper's ``layer_id < 2``). A budget that covers the context is exact dense
attention.

Per layer, the plan says ``full`` (dense) or ``quest`` and may set the layer's ``topk``; the plan's ``params`` (and a
layer's own) override the policy's options, so an edited plan file takes effect; an option the user sets that the plan
sets otherwise is refused at ``patch``. [INFER] choices, switchable:
under GQA every query head selects its own pages by its own bounds, as the paper does for multi-head attention
(``agg="none"``, the default), and a KV head's group reads the union of its heads' pages once, each head attending
to its own (``decode_attention``'s ``head_mask``); ``agg="max"`` (or ``mean``, ``sum``) gives the group one page
set per KV head instead, from its query heads' bounds aggregated (``max``: a page is kept if any query head may need
it), fewer rows read at some accuracy (docs/methods/quest.md); the budget
follows ``topk_ratio`` of the context when ``topk`` is not given (default 1/8), as in accel's other sparse-attention
policies; a budget that is not a whole number of pages is rounded up to whole pages (``page_rounding="up"``: the
budget is never under-spent; Quest's code rounds down, ``page_rounding="down"``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import _ext
from ..attention.context import LayerContext
from ..attention.decode import dense_decode, sparse_attend
from ..attention.masks import first_valid_positions, step_valid
from ..attention.selection import token_budget
from ..cache.quest import QuestMetadata, upper_bounds
from ..errors import AccelError
from ..ops._selection_reference import merge_head_selections_ref
from ..models.base import ModelInfo
from ..plan import LayerPlan, Plan
from .base import AttentionPolicy
from .registry import register_policy


_AGG = {"max": 0, "mean": 1, "sum": 2, "none": 3}  # the C++ selection's codes (3: one selection per query head)
SUMMARY_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@register_policy("quest")
@dataclass
class QuestPolicy(AttentionPolicy):
    """Knobs:

    Args:
        topk: tokens attended per KV head and step (the paper's token budget: pages x page_size, the current page
            included); None: use ``topk_ratio``.
        topk_ratio: fraction of the current context when ``topk`` is None (default 1/8).
        page_size: tokens per page (4; the paper's default is 16, see docs/methods/quest.md for why accel's is smaller).
        min_pages: pages selected at least (3, as Quest's code).
        dense_layers: the first layers that stay dense (2, as the paper); it shapes ``build_plan``, and a plan's
            per-layer modes decide.
        agg: 'none' (default): every query head selects its own pages (the paper, written for multi-head attention;
            every head's bounds come from one pass over the summaries, and a KV head's group reads the union of its
            heads' pages once: up to G times the pages of one selection, counted in the bytes read); 'max', 'mean' or
            'sum': one page set per KV head, by its query heads' page bounds aggregated so.
        min_topk: with ``topk_ratio``, attend to at least this many tokens (64: short prompts stay exact).
        page_rounding: a budget that is not a whole number of pages: 'up' (default) or 'down' (Quest's code).
        summary_dtype: the page summaries' precision: 'float32' (default) or 'bfloat16' (rounded outward, so still an
            upper bound, and exact for a bf16 cache: half the summary bytes, but slower on the CPU, see the docs).
    """

    per_kv_head = True  # scores and budgets per KV head from its own query heads

    plan_modes: ClassVar[tuple] = ("full", "quest")

    topk: int | None = None
    topk_ratio: float | None = 0.125
    page_size: int = 4
    min_pages: int = 3
    dense_layers: int = 2
    agg: str = "none"
    min_topk: int = 64
    page_rounding: str = "up"
    summary_dtype: str = "float32"

    def validate(self) -> None:
        if self.topk is not None and (not isinstance(self.topk, int) or self.topk < 1):
            raise AccelError(f"quest: topk must be a positive number of tokens or None, got {self.topk!r}")
        if self.topk is None and (self.topk_ratio is None or not 0 < float(self.topk_ratio) <= 1):
            raise AccelError(f"quest: topk_ratio must be in (0, 1] when topk is None, got {self.topk_ratio!r}")
        for knob in ("page_size", "min_pages"):
            if not isinstance(getattr(self, knob), int) or getattr(self, knob) < 1:
                raise AccelError(f"quest: {knob} must be an integer >= 1, got {getattr(self, knob)!r}")
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0 or self.min_topk < 0:
            raise AccelError(f"quest: dense_layers and min_topk must be >= 0, got {self.dense_layers}, {self.min_topk}")
        if self.page_rounding not in ("up", "down"):
            raise AccelError(f"quest: page_rounding must be 'up' or 'down', got {self.page_rounding!r}")
        if self.agg not in ("max", "mean", "sum", "none"):
            raise AccelError(f"quest: agg must be 'max', 'mean', 'sum' or 'none', got {self.agg!r}")
        if not isinstance(self.summary_dtype, str) or self.summary_dtype not in SUMMARY_DTYPES:
            raise AccelError(f"quest: summary_dtype must be 'bfloat16' or 'float32', got {self.summary_dtype!r}")

    def check_plan_params(self, plan: Plan) -> None:
        self.check_plan_knobs(plan)

    def build_plan(self, info: ModelInfo) -> Plan:
        layers = [LayerPlan(mode="full" if i < self.dense_layers else "quest", attention="quest")
                  for i in range(info.num_layers)]
        return Plan(policy="quest", num_layers=info.num_layers, num_kv_heads=info.num_kv_heads,
                    model_type=info.model_type, params=self.knobs(), layers=layers)

    def decode(self, ctx: LayerContext, query, key, value, attention_mask, scaling, **kwargs):
        cl = ctx.cache_layer
        if ctx.plan.mode != "quest" or (cl is not None and cl.is_sliding) or key.shape[-1] != value.shape[-1]:
            return dense_decode(ctx, query, key, value, attention_mask, scaling)
        topk = ctx.plan.topk if ctx.plan.topk is not None else self.plan_knob(ctx, "topk")
        budget = token_budget(key.shape[2], topk, self.plan_knob(ctx, "topk_ratio"), int(self.plan_knob(ctx, "min_topk")))
        sel = quest_selection(ctx, query, key, attention_mask, budget, int(self.plan_knob(ctx, "page_size")),
                              int(self.plan_knob(ctx, "min_pages")), self.plan_knob(ctx, "agg"),
                              self.plan_knob(ctx, "page_rounding"),
                              "quest", SUMMARY_DTYPES[self.plan_knob(ctx, "summary_dtype")])
        if sel is None:  # the budget covers the context: exact dense attention
            return dense_decode(ctx, query, key, value, attention_mask, scaling)
        # agg="none": the group's union of its query heads' pages, with the head mask of who chose each row
        return sparse_attend(ctx, query, key, value, attention_mask, scaling, *sel)

    def stack_layer(self, ctx: LayerContext, T: int):
        """This decode step's work for the one-call C++ decode stack (``FusedDecode.run_stack``), which summarises the
        pages, selects them and attends over them as ``decode`` does, bit for bit: ``StackQuest`` for a Quest layer,
        None for a layer that attends densely this step (a ``full`` layer, or a budget whose pages cover the T tokens)."""
        cl = ctx.cache_layer
        if ctx.plan.mode != "quest" or cl is None or cl.is_sliding or cl.k_buf is None:
            return None
        topk = ctx.plan.topk if ctx.plan.topk is not None else self.plan_knob(ctx, "topk")
        budget = token_budget(T, topk, self.plan_knob(ctx, "topk_ratio"), int(self.plan_knob(ctx, "min_topk")))
        return stack_quest(ctx, T, budget, int(self.plan_knob(ctx, "page_size")), int(self.plan_knob(ctx, "min_pages")),
                           self.plan_knob(ctx, "agg"), self.plan_knob(ctx, "page_rounding"),
                           SUMMARY_DTYPES[self.plan_knob(ctx, "summary_dtype")])


def stack_quest(ctx, T: int, budget: int, P: int, min_pages: int, agg: str = "none", page_rounding: str = "up",
                dtype: torch.dtype = torch.float32):
    """``StackQuest`` for a layer whose Quest selection runs in the C++ decode stack this step (its summaries made
    room for), or None when the pages for ``budget`` cover the T tokens (the layer attends densely)."""
    k_pages = quest_pages(T, budget, P, min_pages, page_rounding)
    if k_pages is None:
        return None
    meta = quest_metadata(ctx, T, P, dtype)
    meta._grow(ctx.cache_layer.k_buf, T // P)  # room for every full page and the partial one
    return StackQuest(meta, k_pages, P, _AGG[agg], T)


@dataclass
class StackQuest:
    """One Quest layer's arguments to the C++ decode stack and its bookkeeping after the call."""

    meta: QuestMetadata
    k_pages: int
    page: int
    agg: int
    T: int

    def args(self):
        return [self.meta.kmin, self.meta.kmax], [self.meta.full_pages, self.k_pages, self.page, self.agg]

    def summary_bytes(self) -> int:
        """The page summaries the selection read (min and max, once: agg="none" computes every query head's bounds
        in the same pass), as ``quest_selection`` counts them."""
        B, Hkv, _, D = self.meta.kmin.shape
        return 2 * B * Hkv * (-(-self.T // self.page)) * D * self.meta.kmin.element_size()

    def done(self) -> None:
        """The stack summarised every full page (its partial last page sits in the spare slot, as ``bounds`` puts it)."""
        self.meta.full_pages = self.T // self.page


def quest_pages(T: int, budget: int, P: int, min_pages: int, page_rounding: str = "up") -> int | None:
    """Pages a step attends to for ``budget`` tokens of T (the current page counts, as in Quest's code), or None when
    they would cover the context."""
    n_pages = (T + P - 1) // P
    pages = -(-budget // P) if page_rounding == "up" else budget // P
    k_pages = max(min_pages, pages)
    return None if budget >= T or k_pages >= n_pages else k_pages


def quest_metadata(ctx, T: int, P: int, dtype: torch.dtype = torch.float32) -> QuestMetadata:
    """The layer's page summaries (``ctx.state["quest"]``: the cache layer's version and the metadata), started again
    when the cache layer's rows changed (a reorder, a crop) or the page size or the summaries' dtype did."""
    cl = ctx.cache_layer
    version = cl.version if cl is not None else None
    held = ctx.state.get("quest")
    if (held is None or held[0] != version or held[1].page != P or held[1].dtype != dtype
            or held[1].full_pages * P > T):
        held = ctx.state["quest"] = (version, QuestMetadata(P, dtype))
    return held[1]


def quest_selection(ctx, query, key, attention_mask, budget: int, P: int, min_pages: int, agg: str = "none",
                    page_rounding: str = "up", who: str = "quest", dtype: torch.dtype = torch.float32):
    """One decode step's Quest pages for ``budget`` tokens: (positions [B, Hkv, n] int32 -1 padded, counts [B, Hkv]);
    with ``agg="none"`` the union of each group's G query heads' own pages and which heads selected each position,
    (positions, counts, head_mask [B, Hkv, n] int64: bit g for query head kh * G + g); or None when the pages would
    cover the context. The page summaries live in the sequence's layer state
    (``ctx.state["quest"]``), rebuilt when the cache layer's rows change; their bytes count as read."""
    B, H, _, D = query.shape
    T = key.shape[2]
    n_pages = (T + P - 1) // P
    k_pages = quest_pages(T, budget, P, min_pages, page_rounding)
    if k_pages is None:
        return None
    meta = quest_metadata(ctx, T, P, dtype)
    ok, valid = step_valid(ctx, attention_mask, B, T)
    if not ok:
        raise AccelError(f"{who} got a per-head attention mask it cannot apply; use policy='dense' for this model")
    first = first_valid_positions(valid, B) if valid is not None else None
    mn, mx = meta.bounds(key)  # [B, Hkv, n_pages, D] views of the page summaries
    ctx.runtime.stats["kv_read_bytes"] += 2 * mn.shape[0] * mn.shape[1] * n_pages * D * mn.element_size()
    return select_pages(query[:, :, 0, :], mn, mx, n_pages, k_pages, P, T, agg, first)


@functools.lru_cache(maxsize=8)
def _per_head(quest_select) -> bool:
    """Whether a built ``quest_select`` selects per query head in one pass (agg 3; a build before it does not)."""
    return "per query head" in (quest_select.__doc__ or "")


@functools.lru_cache(maxsize=8)
def _merges(quest_select) -> bool:
    """Whether a built ``quest_select`` returns a group's union of per-query-head selections (``merged``)."""
    return "merged" in (quest_select.__doc__ or "")


@functools.lru_cache(maxsize=8)
def _reads_bf16(quest_select) -> bool:
    """Whether a built ``quest_select`` reads bfloat16 summaries (a build before them reads float32 only)."""
    return "bfloat16" in (quest_select.__doc__ or "")


def select_pages(q, kmin, kmax, n_pages: int, k_pages: int, P: int, T: int, agg: str = "none", first=None,
                 backend: str | None = None, merged: bool = True):
    """Quest's selection for queries q [B, H, D] from page summaries kmin/kmax [B, Hkv, n_pages, D]: the pages' upper
    bounds aggregated over each GQA group, pages of left padding only (``first`` [B]: each row's first real position)
    last, the current page always, the top ``k_pages`` expanded to their positions below T, ascending. Returns
    (positions [B, Hkv, k_pages * P] int32, -1 padded; counts [B, Hkv] int32); with ``agg="none"`` every query head
    selects by its own bounds, all from one pass over the summaries, and the result is each group's union: (positions
    [B, Hkv, G * k_pages * P] ascending, counts [B, Hkv], head_mask [B, Hkv, G * k_pages * P] int64, bit g where
    query head kh * G + g selected the position); ``merged=False`` gives the G selections instead, (positions [G, B,
    Hkv, k_pages * P], counts [G, B, Hkv]), query head kh * G + g at [g, :, kh]. On the CPU one C++ call
    (accel/cpu/quest.h); elsewhere (or ``backend="torch"``) torch operations, the same selection up to the order of
    summation (a tie between two pages' bounds, a NaN bound counting as +inf, may go either way)."""
    if (backend != "torch" and q.device.type == "cpu" and _ext.HAS_CPU_EXT
            and hasattr(_ext.cpu_ext(), "quest_select")
            and (kmin.dtype == torch.float32 or _reads_bf16(_ext.cpu_ext().quest_select))
            and (agg != "none" or _per_head(_ext.cpu_ext().quest_select))):
        fn = _ext.cpu_ext().quest_select
        if agg == "none" and merged and _merges(fn):
            return tuple(fn(q, kmin, kmax, n_pages, k_pages, P, T, 3, first, merged=True))
        sel = tuple(fn(q, kmin, kmax, n_pages, k_pages, P, T, _AGG[agg], first))
        return merge_head_selections_ref(*sel, T) if agg == "none" and merged else sel
    scores = upper_bounds(q, kmin, kmax, agg)  # [B, Hkv, n_pages]; agg="none": [G, B, Hkv, n_pages]
    G = scores.shape[0] if agg == "none" else 1
    if agg == "none":  # the G selections as a batch of G * B rows
        scores = scores.flatten(0, 1)
        first = first.repeat(G) if first is not None else None
    B = scores.shape[0]
    pages = torch.arange(n_pages, device=scores.device)
    if first is not None:  # pages of left padding only are never selected
        first = first.to(scores.device)
        scores = scores.masked_fill(((pages + 1) * P <= first.view(B, 1)).view(B, 1, n_pages), float("-inf"))
    k = min(k_pages, n_pages)  # the current (last) page always, then the k - 1 highest of the others
    top = scores[:, :, : n_pages - 1].topk(k - 1, dim=-1).indices
    last = torch.full((*top.shape[:2], 1), n_pages - 1, dtype=top.dtype, device=top.device)
    top = torch.cat([top, last], -1).sort(dim=-1).values  # [B, Hkv, k] ascending
    pos = (top.unsqueeze(-1) * P + torch.arange(P, device=top.device)).flatten(-2)
    inside = pos < T  # only the current (last, partial) page reaches past T, and it sorts last
    idx = torch.where(inside, pos, torch.full_like(pos, -1)).to(torch.int32).contiguous()
    counts = inside.sum(-1).to(torch.int32)
    if agg == "none":
        sel = idx.view(G, B // G, *idx.shape[1:]), counts.view(G, B // G, -1)
        return merge_head_selections_ref(*sel, T) if merged else sel
    return idx, counts
