"""Flux Attention (Qiu et al., "Context-Aware Hybrid Attention for Efficient LLMs Inference", arXiv 2604.07394;
methods.md 7.3): a lightweight trained layer router on a frozen model decides, per layer and per request, whether
the layer runs full attention (FA) or sparse attention (SA).

At the end of each layer's prefill the layer's routing features are read off the prompt's last ``probe`` queries
(``layer_features``: how much of their attention mass the sparse backend's budget would miss, as sink + window and
as an oracle top-k, and how spread it is). At the request's first decode step the router (``Router``, a two-layer
MLP over those features and the layer's identity, weights in the plan; a score is the router's estimate of the layer's standardised log-KL)
scores every routed layer of every batch row;
per row the ``full_ratio`` of layers with the highest scores run FA and the rest SA, until the next prefill. Routing
is per layer (all heads of a layer take the same route), as in the paper, so a layer's decode stays one dense or one
sparse kernel call; rows of one batch may take different routes.

The router is trained by ``accel plan --policy flux`` (``accel.calibration.flux``) on the frozen model: a request's
label for layer l is the KL divergence of the next-token distributions (over teacher-forced continuation tokens)
when layer l alone runs SA, and the router regresses its logarithm. [INFER] choices, switchable:

* ``backend``: the SA layers' attention: ``quest`` (Quest's page bounds, ``accel.policies.quest``), ``select``
  (hylra-style: the layer scores its own query over the cache and attends its top-k chunks, sink and recent forced),
  ``window`` (sink + recent tokens only). The plan holds one router per backend it was trained for.
* ``routing``: ``ratio`` (per row, the top ``full_ratio`` of routed layers by score: the target FA ratio exactly),
  ``threshold`` (FA where the score passes the plan's threshold, set on the training data to give ``full_ratio`` on
  average; a request's ratio varies), ``static`` (the same layers for every request: those with the highest mean
  label in training, the ablation without context).
* Prefill stays dense in every layer (the router needs the prompt first; the paper also sparsifies the prefill of
  SA layers, which is not done here), and decode applies the routes.
* ``route="full"`` / ``"sparse"`` force every routed layer FA / SA (the invariants: dense / the backend alone).

A budget that covers the context (``topk`` >= context) makes every SA layer exact dense attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from ..attention.context import LayerContext
from ..attention.decode import dense_decode, own_scores, sparse_attend
from ..attention.hf import hf_sdpa
from ..attention.masks import first_valid_positions, prompt_valid, step_valid
from ..attention.selection import check_budget_knobs, select_from_scores, token_budget
from ..errors import AccelError
from ..models.base import ModelInfo
from ..plan import Plan
from ..plan.shipped import require_shipped_plan
from .base import AttentionPolicy
from .quest import SUMMARY_DTYPES, quest_selection, stack_quest
from .registry import register_policy

BACKENDS = ("quest", "select", "window")
ROUTINGS = ("ratio", "threshold", "static")
FEATURES = ("log_window_miss_mean", "log_window_miss_max", "log_topk_miss_mean", "log_topk_miss_max",
            "entropy", "log2_context")
_EPS = 1e-4
_STATE = "flux.features"
_ROUTE = "flux.route"


@register_policy("flux")
@dataclass
class FluxPolicy(AttentionPolicy):
    """Knobs:

    Args:
        backend: the sparse attention of SA layers: 'quest' (default), 'select' or 'window' (module docstring).
        full_ratio: target fraction of the routed layers that run full attention per request (default 1/3).
        routing: 'ratio' (default), 'threshold' or 'static' (module docstring).
        route: 'router' (default), or 'full' / 'sparse' to force every routed layer.
        dense_layers: the model's first layers, which the router's routings ('ratio', 'threshold', 'static') always
            run full (0: the router decides every routed layer; [INFER], Quest keeps its first two layers dense).
            'ratio' and 'static' count them in ``full_ratio`` and pick the rest; where they alone exceed it they
            all still run full. 'threshold' adds them to the layers past the threshold.
        topk: tokens an SA layer attends per KV head and step; None: ``topk_ratio`` of the context (default 1/8),
            at least ``min_topk`` (64).
        page_size, min_pages: Quest's pages (16 tokens, at least 3) for ``backend='quest'``.
        summary_dtype: Quest's page summaries, 'float32' (default, as quest's) or 'bfloat16' (rounded outward).
        chunk, sink, recent, agg: the 'select' backend's chunks (16), forced sink (16) and recent (64) tokens and its
            aggregation of a KV head's query heads ('max'; the quest backend aggregates its page bounds the same way,
            and with 'none', quest's backend only and quest's own default, every query head selects its own pages);
            the 'window'
            backend keeps ``sink`` tokens and fills the rest of the budget with the most recent ones.
        probe: prompt queries (the last ones) the routing features are read from (16).
        feature_ratio: the budget (fraction of the context) the features' missed attention mass is measured at
            (1/8). ``probe``, ``feature_ratio`` and ``sink`` must be the router's training values (the plan records
            them); the SA budget (``topk`` / ``topk_ratio``) is free.
    """

    calibrator: ClassVar[str] = "accel.calibration.flux:calibrate_flux"
    plan_modes: ClassVar[tuple] = ("full", "flux")

    backend: str = "quest"
    full_ratio: float = 1 / 3
    routing: str = "ratio"
    route: str = "router"
    dense_layers: int = 0
    topk: int | None = None
    topk_ratio: float | None = 0.125
    min_topk: int = 64
    page_size: int = 16
    min_pages: int = 3
    summary_dtype: str = "float32"
    chunk: int = 16
    sink: int = 16
    recent: int = 64
    agg: str = "max"
    probe: int = 16
    feature_ratio: float = 0.125

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise AccelError(f"flux: backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.routing not in ROUTINGS:
            raise AccelError(f"flux: routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.route not in ("router", "full", "sparse"):
            raise AccelError(f"flux: route must be 'router', 'full' or 'sparse', got {self.route!r}")
        if not isinstance(self.full_ratio, (int, float)) or not 0 <= float(self.full_ratio) <= 1:
            raise AccelError(f"flux: full_ratio must be a fraction of the layers in [0, 1], got {self.full_ratio!r}")
        if not isinstance(self.dense_layers, int) or isinstance(self.dense_layers, bool) or self.dense_layers < 0:
            raise AccelError(f"flux: dense_layers must be an integer >= 0, got {self.dense_layers!r}")
        check_budget_knobs("flux", self.topk, self.topk_ratio, self.sink, self.recent, self.chunk)
        for knob in ("page_size", "min_pages", "probe"):
            if not isinstance(getattr(self, knob), int) or getattr(self, knob) < 1:
                raise AccelError(f"flux: {knob} must be an integer >= 1, got {getattr(self, knob)!r}")
        if not isinstance(self.min_topk, int) or self.min_topk < 0:
            raise AccelError(f"flux: min_topk must be an integer >= 0, got {self.min_topk!r}")
        if self.agg not in ("max", "mean", "sum", "none"):
            raise AccelError(f"flux: agg must be 'max', 'mean', 'sum' or 'none', got {self.agg!r}")
        if self.agg == "none" and self.backend != "quest":
            raise AccelError(f"flux: agg='none' (every query head its own pages) is quest's selection; the "
                             f"{self.backend!r} backend aggregates a KV head's query heads: use backend='quest' or "
                             "agg='max'")
        if not isinstance(self.summary_dtype, str) or self.summary_dtype not in SUMMARY_DTYPES:
            raise AccelError(f"flux: summary_dtype must be 'bfloat16' or 'float32', got {self.summary_dtype!r}")
        if not isinstance(self.feature_ratio, (int, float)) or not 0 < float(self.feature_ratio) <= 1:
            raise AccelError(f"flux: feature_ratio must be in (0, 1], got {self.feature_ratio!r}")
        if self.topk is None and self.min_topk < self.sink + 1:
            raise AccelError(f"flux: min_topk ({self.min_topk}) must exceed sink ({self.sink})")

    # -- plan -------------------------------------------------------------------------------------------------
    def build_plan(self, info: ModelInfo) -> Plan:
        return require_shipped_plan("flux", info, "a trained layer router")

    def check_plan_params(self, plan: Plan) -> None:
        routers = (plan.params or {}).get("routers") or {}
        if self.route == "router" and self.backend not in routers:
            raise AccelError(f"flux: the plan's router was trained for backend(s) {', '.join(sorted(routers)) or 'none'}, "
                             f"not {self.backend!r}; train one with `accel plan --policy flux --set "
                             f"backends='[\"{self.backend}\"]'` or pick a trained backend")
        if self.route == "router":
            r = routers[self.backend]
            if (plan.params or {}).get("features") != list(FEATURES):
                raise AccelError("flux: the plan's router reads other features than this version computes; retrain it "
                                 "with `accel plan --policy flux`")
            if len(r.get("w1", [])) != len(FEATURES) + plan.num_layers:
                raise AccelError("flux: the plan's router weights do not match the model's layer count; retrain it "
                                 "with `accel plan --policy flux`")
            if self.routing == "threshold" and r.get("threshold") is None:
                raise AccelError("flux: routing='threshold' needs the plan's threshold; retrain with `accel plan`")
            trained = (plan.params or {}).get("full_ratio")
            if (self.routing == "threshold" and self.full_ratio not in (0, 1) and trained is not None
                    and abs(float(trained) - float(self.full_ratio)) > 1e-9):
                raise AccelError(f"flux: routing='threshold' uses the plan's threshold, set for full_ratio={trained:.4g}, "
                                 f"not {self.full_ratio:.4g}; use routing='ratio' for another ratio, or retrain with "
                                 f"`accel plan --policy flux --set full_ratio={self.full_ratio}`")
            if self.routing == "static" and not r.get("static_order"):
                raise AccelError("flux: routing='static' needs the plan's layer order (static_order); retrain with "
                                 "`accel plan --policy flux`")
        args = (plan.params or {}).get("feature_args") or {}
        for knob, v in args.items():
            if self.route == "router" and getattr(self, knob, v) != v:
                raise AccelError(f"flux: the router was trained on features read with {knob}={v!r}, the policy has "
                                 f"{getattr(self, knob)!r}; drop the option or retrain with `accel plan --policy flux "
                                 f"--set {knob}={getattr(self, knob)}`")

    def feature_args(self) -> dict:
        """The options the routing features depend on (the plan records them; training and use must agree)."""
        return {"feature_ratio": self.feature_ratio, "sink": self.sink, "probe": self.probe}

    # -- prefill: dense, and this layer's routing features ----------------------------------------------------
    def prefill(self, ctx: LayerContext, query, key, value, attention_mask, scaling, **kwargs):
        if ctx.plan.mode == "flux" and key.shape[-1] != value.shape[-1]:
            raise AccelError("flux needs keys and values of one width, and this model's differ (latent attention); "
                             "use policy='dense' (or 'tpla' for MLA models)")
        out = hf_sdpa(ctx.module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if ctx.plan.mode == "flux":
            valid = prompt_valid(attention_mask, query.shape[0], key.shape[2])
            with torch.no_grad():
                ctx.state[_STATE] = (self.features(query, key, valid, scaling), _mark(ctx.cache_layer))
        return out

    def prefill_statistics(self, query, keys, valid, scaling) -> dict:
        """The features a shared dense prefill records (the evaluation harness prefills each sample once)."""
        return {self.stats_key: self.features(query, keys, valid, scaling)}

    @cached_property  # options are fixed once the policy is built; read on every decode step
    def stats_key(self) -> str:
        a = self.feature_args()
        return f"{_STATE}@" + ",".join(f"{k}={a[k]}" for k in sorted(a))

    def features(self, query, key, valid, scaling) -> torch.Tensor:
        return layer_features(query, key, valid, scaling, self.probe, self.sink,
                              lambda T: token_budget(T, None, self.feature_ratio))

    # -- decode -----------------------------------------------------------------------------------------------
    def decode(self, ctx: LayerContext, query, key, value, attention_mask, scaling, **kwargs):
        cl = ctx.cache_layer
        if ctx.plan.mode != "flux" or (cl is not None and cl.is_sliding) or key.shape[-1] != value.shape[-1]:
            return dense_decode(ctx, query, key, value, attention_mask, scaling)
        B, T = query.shape[0], key.shape[2]
        full = self.layer_route(ctx, B)  # [B] bool: FA rows
        budget = token_budget(T, self.topk, self.topk_ratio, self.min_topk)
        if bool(full.all()) or budget >= T:
            return dense_decode(ctx, query, key, value, attention_mask, scaling)
        sel = self.sparse_selection(ctx, query, key, attention_mask, budget, scaling)
        if sel is None:  # the backend's selection covers the context: exact
            return dense_decode(ctx, query, key, value, attention_mask, scaling)
        # sel: (idx, counts), or with agg="none" quest's union of a group's pages and the head mask of who chose each
        if bool(full.any()):  # FA rows attend to every position through the same call
            sel = with_full_rows(*sel[:2], full, T, key.shape[1], *sel[2:], G=query.shape[1] // key.shape[1])
        return sparse_attend(ctx, query, key, value, attention_mask, scaling, *sel)

    def stack_problem(self) -> str | None:
        """Why this patch's decode cannot run in the one-call C++ decode stack (None: it can, step by step)."""
        if self.backend != "quest":
            return f"flux's {self.backend!r} backend attends with its own decode"
        return None

    def stack_layer(self, ctx: LayerContext, T: int):
        """This decode step's work in the one-call C++ decode stack (``FusedDecode.run_stack``), which runs Quest's
        selection and the attention over its pages as ``decode`` does, bit for bit: ``StackQuest`` for a layer every
        row runs sparse, None for one every row runs full (or whose pages cover the context), False when the rows of
        the batch take different routes here (the layers then run one by one)."""
        cl = ctx.cache_layer
        if ctx.plan.mode != "flux" or cl is None or cl.is_sliding or cl.k_buf is None:
            return None
        full = self.layer_route(ctx, cl.k_buf.shape[0])
        budget = token_budget(T, self.topk, self.topk_ratio, self.min_topk)
        if bool(full.all()) or budget >= T:
            return None
        if bool(full.any()):
            return False
        return stack_quest(ctx, T, budget, self.page_size, self.min_pages, self.agg, "up",
                           SUMMARY_DTYPES[self.summary_dtype])

    def sparse_selection(self, ctx, query, key, attention_mask, budget: int, scaling):
        B, T = query.shape[0], key.shape[2]
        if self.backend == "quest":
            return quest_selection(ctx, query, key, attention_mask, budget, self.page_size, self.min_pages, self.agg,
                                   "up", "flux", SUMMARY_DTYPES[self.summary_dtype])
        ok, valid = step_valid(ctx, attention_mask, B, T)
        if not ok:
            raise AccelError("flux got a per-head attention mask it cannot apply; use policy='dense' for this model")
        first = first_valid_positions(valid, B)
        if self.backend == "window":
            return window_positions(first, T, budget, self.sink)
        scores, lse, _ = own_scores(query, key, attention_mask, ctx, scaling)
        return select_from_scores(scores, lse, key.shape[1], budget, agg=self.agg, chunk=self.chunk, sink=self.sink,
                                  recent=self.recent, first_valid=first if valid is not None else None, T=T)

    def describe(self, runtime) -> str:
        """One line for ``PatchHandle.summary()``: the options and the latest routes (full layers per row)."""
        from ..cache import sequences

        routed = sum(lp.mode == "flux" for lp in runtime.plan.layers)
        out = (f"flux: backend {self.backend}, routing {self.routing}, full_ratio {float(self.full_ratio):.3g} "
               f"({int(round(float(self.full_ratio) * routed))} of {routed} routed layers full per request"
               + (f", the first {self.dense_layers} always" if self.dense_layers and self.route == "router" else "") + ")")
        cache = runtime.last_cache
        held = sequences.state_of(cache).shared.get(_ROUTE) if cache is not None else None
        if held is not None:
            rows = held["route"]
            out += "; latest routes, full layers per row: " + "; ".join(
                str(torch.nonzero(r).flatten().tolist()) for r in rows[:4]) + (" ..." if rows.shape[0] > 4 else "")
        return out

    # -- routes -----------------------------------------------------------------------------------------------
    def layer_route(self, ctx: LayerContext, B: int) -> torch.Tensor:
        """[B] bool: which of the current batch rows run this layer with full attention. Routes are decided once per
        prompt (at the first decode step after it) and kept while the prompt and the options stay; routes fixed with
        ``set_routes`` win over the options until the next prompt."""
        rt = ctx.runtime
        held = rt.shared.get(_ROUTE)
        mark = _mark(ctx.cache_layer)
        fixed = held is not None and held["key"] == "fixed" and held["mark"] == mark
        if not fixed:
            if self.route != "router" or self.full_ratio == 1 or (self.full_ratio == 0 and not self.dense_layers):
                return torch.full((B,), self.route == "full" or (self.route == "router" and self.full_ratio == 1),
                                  dtype=torch.bool)
            if held is None or held["key"] != self.route_key or held["mark"] != mark:
                held = rt.shared[_ROUTE] = {"route": self.compute_routes(ctx), "key": self.route_key, "mark": mark}
        rows = ctx.cache_layer.rows if ctx.cache_layer is not None and ctx.cache_layer.rows is not None else None
        r = held["route"][:, ctx.layer_idx]
        if rows is not None and rows.numel() == B and int(rows.max()) < r.shape[0]:
            return r[rows]
        if r.shape[0] != B:
            raise AccelError(f"flux: the routes were decided for {r.shape[0]} batch rows and this step has {B}; "
                             "start a new generation (a new cache) for a different batch")
        return r

    @cached_property
    def route_key(self):
        return (self.backend, self.routing, float(self.full_ratio), self.dense_layers, self.stats_key)

    def compute_routes(self, ctx: LayerContext) -> torch.Tensor:
        """[B, num_layers] bool routes (True: full attention) from every routed layer's prefill features."""
        rt = ctx.runtime
        plan = rt.plan
        routed = [i for i, lp in enumerate(plan.layers) if lp.mode == "flux"]
        feats = []
        stats = getattr(rt.cache, "prefill_stats", None) or {}
        for i in routed:
            mark = _mark(rt.cache.layers[i]) if rt.cache is not None and i < len(rt.cache.layers) else None
            own = rt.layer_state.get(i, {}).get(_STATE)  # flux's own prefill of the latest prompt
            rec = stats.get(i, {})  # a shared dense prefill that recorded them (the evaluation harness)
            if own is not None and own[1] == mark:
                f = own[0]
            elif self.stats_key in rec and rec.get("prefill_mark") == mark:
                f = rec[self.stats_key]
            else:
                raise AccelError("flux routes each request from its prompt's prefill, and the latest prompt in this "
                                 "cache was prefilled without flux's features; prefill it with the model patched by "
                                 "policy='flux'")
            feats.append(f)
        F = torch.stack(feats, 1)  # [B, R, n_features]
        B, L = F.shape[0], plan.num_layers
        route = torch.ones(B, L, dtype=torch.bool)
        if not routed:
            return route
        router = Router.from_plan(plan, self.backend)
        forced = [j for j, i in enumerate(routed) if i < self.dense_layers]  # full whatever the router says
        n_full = max(0, int(round(float(self.full_ratio) * len(routed))) - len(forced))
        sub = torch.zeros(B, len(routed), dtype=torch.bool)
        if self.routing == "static":  # check_plan_params made sure the plan has the order
            order = [routed.index(i) for i in router.static_order if i in routed and routed.index(i) not in forced]
            sub[:, order[:n_full]] = True
        else:
            score = router.scores(F, torch.tensor(routed))  # [B, R]
            if self.routing == "threshold":
                sub = score > router.threshold
            elif n_full > 0:
                score[:, forced] = float("-inf")
                sub.scatter_(1, score.topk(n_full, dim=1).indices, True)
        sub[:, forced] = True
        route[:, routed] = sub
        st = rt.stats
        st["flux_routed_layers"] = st.get("flux_routed_layers", 0) + B * len(routed)
        st["flux_full_layers"] = st.get("flux_full_layers", 0) + int(sub.sum())
        return route


def set_routes(cache, route: torch.Tensor) -> None:
    """Fix the routes of a prefilled cache's current rows ([B, num_layers] bool, True = full attention) instead of the
    router's (the calibrator measures each layer's SA alone this way); the rows' identities restart here."""
    from ..cache import sequences

    for layer in cache.layers:
        layer.rows = torch.arange(route.shape[0])
    sequences.state_of(cache).shared[_ROUTE] = {"route": route.to(torch.bool).cpu(), "key": "fixed",
                                                "mark": _mark(cache.layers[0])}


def _mark(cache_layer):
    """Which prompt write of the cache layer the routing state belongs to."""
    return getattr(cache_layer, "prefills", None)


class Router:
    """The layer router: ``score = w2 . relu(W1 x + b1) + b2`` with ``x`` = [standardised features, one-hot layer];
    a higher score means the layer matters more to this request (its estimate of the layer's log-KL when it alone
    runs SA, standardised over the training labels; the plan's threshold is in the same units)."""

    def __init__(self, w1, b1, w2, b2, mu, sd, threshold=None, static_order=()):
        self.w1, self.b1, self.w2, self.b2 = (torch.as_tensor(x, dtype=torch.float32) for x in (w1, b1, w2, b2))
        self.mu, self.sd = torch.as_tensor(mu, dtype=torch.float32), torch.as_tensor(sd, dtype=torch.float32)
        self.threshold = threshold
        self.static_order = list(static_order)

    @classmethod
    def from_plan(cls, plan: Plan, backend: str) -> "Router":
        r = plan.params["routers"][backend]
        return cls(r["w1"], r["b1"], r["w2"], r["b2"], r["mu"], r["sd"], r.get("threshold"), r.get("static_order", ()))

    def inputs(self, feats: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """[..., R, n_features] features of layers ``layers`` [R] -> router inputs [..., R, n_features + L]."""
        L = self.w1.shape[0] - len(FEATURES)
        x = (feats.float() - self.mu) / self.sd
        onehot = torch.nn.functional.one_hot(layers.long(), L).float().expand(*x.shape[:-1], L)
        return torch.cat([x, onehot], -1)

    def scores(self, feats: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        x = self.inputs(feats, layers)
        return torch.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2


def layer_features(query, key, valid, scaling: float, probe: int, sink: int, budget_of) -> torch.Tensor:
    """One layer's routing features per batch row ([B, len(FEATURES)] fp32) from a prefill's last ``probe`` queries
    ``query`` [B, H, Q, D] over the layer's keys ``key`` [B, Hkv, T, D] (``valid`` [B, T]: real tokens, or None):
    the attention mass the sparse budget (``budget_of(n)`` tokens of a row's ``n`` real ones) would miss as sink + recent window and as the
    oracle top-k (log of the mean and of the worst query head), the mean normalised entropy, and log2 of the real
    context length / 16."""
    B, H, Q, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    P = min(probe, Q)
    q = query[:, :, -P:, :].float()
    s = torch.einsum("bkgqd,bktd->bkgqt", q.view(B, Hkv, H // Hkv, P, D), key.float()).reshape(B, H, P, T) * scaling
    pos = torch.arange(T)
    allowed = pos.view(1, T) <= (T - P + torch.arange(P)).view(P, 1)  # causal: query i sits at T - P + i
    allowed = allowed.view(1, 1, P, T)
    if valid is not None:
        allowed = allowed & valid.view(B, 1, 1, T).cpu()
    s = s.masked_fill(~allowed.to(s.device), float("-inf"))
    p = torch.softmax(s, -1)  # [B, H, P, T]
    n_real = (valid.sum(-1).float().cpu() if valid is not None else torch.full((B,), float(T)))
    first = first_valid_positions(valid, B) if valid is not None else torch.zeros(B, dtype=torch.long)
    # each row's budget from its real tokens: a left-padded row reads the features it would alone
    budget = torch.tensor([min(int(budget_of(int(n))), int(n)) for n in n_real.long()])
    recent = (budget - sink).clamp(min=0)
    win = ((pos.view(1, T) >= first.view(B, 1)) & (pos.view(1, T) < (first + sink).view(B, 1))) | \
        (pos.view(1, T) >= (T - recent).view(B, 1))
    # a row with fewer real tokens than ``probe`` averages over its real queries only (padding queries see no key)
    qreal = ((T - P + torch.arange(P)).view(1, P) >= first.view(B, 1)).float().to(p.device)  # [B, P]
    n_q = qreal.sum(-1).clamp(min=1).view(B, 1)
    p = torch.nan_to_num(p) * qreal.view(B, 1, P, 1)

    def qmean(x):  # [B, H, P] -> [B, H], over each row's real queries
        return (x * qreal.view(B, 1, P)).sum(-1) / n_q

    window_miss = qmean((1 - (p * win.view(B, 1, 1, T).to(p.device)).sum(-1)).clamp(min=0))  # [B, H]
    budget = budget.clamp(min=1)
    top = p.topk(int(budget.max()), dim=-1).values.cumsum(-1)  # [B, H, P, max budget]
    kept = top.gather(-1, (budget - 1).view(B, 1, 1, 1).expand(B, H, P, 1).to(top.device)).squeeze(-1)
    topk_miss = qmean((1 - kept).clamp(min=0))
    ent = qmean(-(p * torch.log(p.clamp(min=1e-30))).sum(-1))  # [B, H]
    ent = ent / torch.log(n_real.clamp(min=2)).view(B, 1).to(ent.device)
    f = torch.stack([
        torch.log(window_miss.mean(-1) + _EPS), torch.log(window_miss.amax(-1) + _EPS),
        torch.log(topk_miss.mean(-1) + _EPS), torch.log(topk_miss.amax(-1) + _EPS),
        ent.mean(-1), torch.log2(n_real.to(ent.device)) / 16,
    ], -1)
    return f.float().cpu()


def window_positions(first: torch.Tensor, T: int, budget: int, sink: int):
    """Sink + recent positions per row (the 'window' backend): ``sink`` tokens from each row's first real one and the
    last ``budget - sink`` positions, ascending; (idx [B, 1, n] int32 -1 padded, counts [B, 1])."""
    B = first.shape[0]
    pos = torch.arange(T)
    keep = ((pos.view(1, T) >= first.view(B, 1)) & (pos.view(1, T) < (first + sink).view(B, 1))) | \
        (pos.view(1, T) >= T - max(budget - sink, 0))
    if bool((keep | (pos.view(1, T) < first.view(B, 1))).all()):
        return None  # every real position: the budget covers the context
    counts = keep.sum(-1)
    n = int(counts.max())
    order = torch.where(keep, pos.view(1, T), torch.full_like(pos.view(1, T), T)).sort(-1).values[:, :n]
    idx = torch.where(order < T, order, torch.full_like(order, -1)).to(torch.int32)
    return idx.view(B, 1, n).contiguous(), counts.to(torch.int32).view(B, 1)


def with_full_rows(idx: torch.Tensor, counts: torch.Tensor, full: torch.Tensor, T: int, Hkv: int,
                   head_mask: torch.Tensor | None = None, G: int = 1):
    """The sparse selection (idx [B, Hs, n], counts [B, Hs]) with the rows ``full`` [B] attending every position; with
    a ``head_mask`` [B, Hkv, n] (per-query-head selections of G heads per group) the full rows' every head attends
    every position, returned as a third tensor."""
    B, Hs, n = idx.shape
    if Hs == 1 and Hkv > 1:
        idx, counts = idx.expand(B, Hkv, n), counts.reshape(B, 1).expand(B, Hkv)
    width = max(n, T)
    out = torch.full((B, Hkv, width), -1, dtype=torch.int32, device=idx.device)
    out[:, :, :n] = idx
    out[full, :, :T] = torch.arange(T, dtype=torch.int32, device=idx.device).view(1, 1, T)
    c = counts.clone().to(torch.int32)
    c[full] = T
    if head_mask is None:
        return out.contiguous(), c.contiguous()
    mask = torch.zeros((B, Hkv, width), dtype=torch.int64, device=idx.device)
    mask[:, :, :n] = head_mask
    mask[full, :, :T] = (1 << G) - 1 if G < 64 else -1  # every query head of the group
    return out.contiguous(), c.contiguous(), mask.contiguous()


