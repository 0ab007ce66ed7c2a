"""Task-KV (He, Liu, Chen, arXiv 2501.15113): task-aware KV budgets from a semantic separator.

Per request, at the end of the prefill (methods.md section 5):

* every query head's *representation* is its attention output for the last ``window`` prompt queries,
  averaged over those positions and mapped into the hidden space through the head's slice of the
  output projection W_O; a KV head's representation is the mean over its GQA group [INFER];
* a layer's *semantic center* is the mean representation of its KV heads, a head's *distance* is
  ``||r_h - c|| / ||c||`` (relative L2; ``metric="cosine"`` uses 1 - cos) [INFER];
* the heads farthest from their layer's center are *heterogeneous*: they keep the full cache (and
  every generated token). accel ranks the relative distances over all layers of the model and takes
  the top ``het_fraction`` of all KV heads ([INFER]: the abstract's per-layer separation, ranked
  globally so the split is not limited to whole heads of a 3-head layer; ``scope="layer"`` ranks
  within each layer instead);
* the other heads keep ``sink`` attention sinks, ``recent`` tokens and ``middle`` "middle activations":
  the tokens with the highest SnapKV-style window attention (pooled), aggregated over the layer's
  non-heterogeneous heads and shared by them. During decode they stay at that size, evicting by
  accumulated attention outside the sinks and recent tokens.

Budget: ``budget`` / ``budget_ratio`` (average per KV head, like the other policies). The default
``het_fraction`` is half the budget ratio ([INFER]); the middle size then fills the rest of the average:
``middle = (f n N - n_het n) / (N - n_het) - sink - recent`` (fewer heterogeneous heads if that would be
negative). An explicit ``het_fraction`` is honoured even past the budget (the others then keep sinks
and recent tokens only). A budget covering the prompt, or ``het_fraction=1``, is exactly dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import AccelError
from .base import LayerContext
from ..attention.masks import prompt_valid
from .budgeted import FORCED, BudgetedKVPolicy, PrefillView, force_sinks_and_recent
from .snapkv import pool1d
from .registry import register_policy

_NEG = float("-inf")


@register_policy("taskkv")
@dataclass
class TaskKVPolicy(BudgetedKVPolicy):
    sink: int = 16
    recent: int = 64
    window: int = 32
    kernel: int = 7
    het_fraction: float | None = None
    metric: str = "l2"
    scope: str = "model"

    evict_by: ClassVar[str] = "score"
    accumulate: ClassVar[bool] = True

    def budget_floor(self) -> int:
        """No head keeps fewer than its sink + recent tokens (the observation window only scores the middle)."""
        return int(self.min_budget) if self.min_budget is not None else int(self.sink) + int(self.recent)

    def tensor_parallel_problem(self, plan=None) -> str | None:
        return ("it ranks each KV head by its distance from the layer's centre, the mean over all of the layer's "
                "KV heads, which a rank holding a slice of the heads does not see")

    def validate(self) -> None:
        super().validate()
        if self.sink < 0 or self.recent < 0 or self.window < 1:
            raise AccelError(f"taskkv: sink/recent must be >= 0 and window >= 1, got {self.sink}, {self.recent}, {self.window}")
        if self.het_fraction is not None and not 0 <= float(self.het_fraction) <= 1:
            raise AccelError(f"taskkv: het_fraction must be in [0, 1], got {self.het_fraction!r}")
        if self.metric not in ("l2", "cosine"):
            raise AccelError(f"taskkv: metric must be 'l2' or 'cosine', got {self.metric!r}")
        if self.scope not in ("model", "layer"):
            raise AccelError(f"taskkv: scope must be 'model' or 'layer', got {self.scope!r}")

    def prefill_statistics(self, query, keys, valid, scaling) -> dict:
        return {"q_window": query[:, :, -self.window:].detach().clone()}

    # -- per-layer statistics --------------------------------------------------------------------------
    def _layer_stats(self, cl, layer_idx: int, view: PrefillView, valid, scaling: float, w_o) -> dict:
        keys, values = cl.keys, cl.values
        B, Hkv, T, D = keys.shape
        w = min(self.window, T)
        qw = view.window_queries(w).float()  # [B, H, w, D]
        H = qw.shape[1]
        G = H // Hkv
        kk = keys.float().repeat_interleave(G, 1)
        vv = values.float().repeat_interleave(G, 1)
        logits = torch.matmul(qw, kk.transpose(-1, -2)) * scaling
        mask = torch.arange(T).view(1, 1, 1, T) <= torch.arange(T - w, T).view(1, 1, w, 1)
        if valid is not None:
            mask = mask & valid.view(B, 1, 1, T)
        p = torch.softmax(logits.masked_fill(~mask, _NEG), -1).nan_to_num(0.0)  # [B, H, w, T]
        o = torch.matmul(p, vv).mean(2)  # [B, H, D]: each head's output over the window
        if w_o is not None:  # into the hidden space through the head's slice of W_O
            Wh = w_o.float().view(w_o.shape[0], H, D)  # [hidden, H, D]
            r = torch.einsum("bhd,ehd->bhe", o, Wh)
        else:
            r = o
        r = r.view(B, Hkv, G, -1).mean(2)  # [B, Hkv, E]
        c = r.mean(1, keepdim=True)
        if self.metric == "l2":
            dist = (r - c).norm(dim=-1) / c.norm(dim=-1).clamp_min(1e-12)
        else:
            dist = 1 - torch.nn.functional.cosine_similarity(r, c.expand_as(r), dim=-1)
        mid = pool1d(p.sum(2).view(B, Hkv, G, T).mean(2), self.kernel, "avg", valid)  # [B, Hkv, T]
        return {"dist": dist, "mid": mid}

    # -- the decision over all layers -----------------------------------------------------------------
    def _plan_budgets(self, n: torch.Tensor, dists: dict[int, torch.Tensor]):
        """-> ({layer: [B, Hkv] heterogeneous}, [B] non-heterogeneous budget)."""
        layers = sorted(dists)
        B, Hkv = dists[layers[0]].shape
        N = len(layers) * Hkv
        base = self.base_budget(n).double()
        f = base / n.double().clamp(min=1)
        het_frac = float(self.het_fraction) if self.het_fraction is not None else None
        S = self.sink + self.recent
        het = {li: torch.zeros(B, Hkv, dtype=torch.bool) for li in layers}
        nonhet_budget = torch.zeros(B, dtype=torch.long)
        for b in range(B):
            nb = float(n[b])
            fr = het_frac if het_frac is not None else float(f[b]) / 2
            n_het = min(N, round(fr * N))
            while het_frac is None and n_het > 0 and (float(f[b]) * nb * N - n_het * nb) / max(1, N - n_het) < S:
                n_het -= 1  # the default fraction shrinks to fit the budget; an explicit one is honoured
            rest = (float(f[b]) * nb * N - n_het * nb) / max(1, N - n_het)
            nonhet_budget[b] = max(1, S, math.floor(rest))
            if self.scope == "model":
                items = sorted(((-float(dists[li][b, h]), li, h) for li in layers for h in range(Hkv)))
                for _, li, h in items[:n_het]:
                    het[li][b, h] = True
            else:
                per = n_het / len(layers)
                acc = 0.0
                for li in layers:
                    acc += per
                    k = int(round(acc)) - int(round(acc - per))
                    order = sorted(range(Hkv), key=lambda h: (-float(dists[li][b, h]), h))
                    for h in order[:k]:
                        het[li][b, h] = True
        return het, nonhet_budget

    def _finish(self, layers: list, stats: dict, n: torch.Tensor, valid, reserve: int, layer_state: dict) -> None:
        het, nb = self._plan_budgets(n, {li: st["dist"] for li, st in stats.items()})
        for li, cl in layers:
            st = stats[li]
            keys = cl.keys
            B, Hkv, T, _ = keys.shape
            h_mask = het[li]
            budgets = torch.where(h_mask, n.view(B, 1), torch.minimum(nb, n).view(B, 1)).expand(B, Hkv).clone()
            if valid is None and bool((budgets >= T).all()):
                continue
            # middle activations: window attention aggregated over the layer's non-heterogeneous heads
            w = (~h_mask).float().unsqueeze(-1)
            shared = (st["mid"] * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
            t = torch.arange(T).view(1, 1, T)
            score = force_sinks_and_recent(shared.expand(B, Hkv, T), valid, self.sink, self.recent)
            score = torch.where(h_mask.view(B, Hkv, 1), FORCED + t.double(), score)  # heterogeneous: keep all
            if valid is not None:
                score = score.masked_fill(~valid.view(B, 1, T), _NEG)
            grow = h_mask | (budgets >= n.view(B, 1))  # covering the prompt = no compression, as the dense no-op
            self._store(cl, layer_state.setdefault(li, {}), score, budgets, grow, valid, reserve, shared.expand(B, Hkv, T).contiguous(),
                        torch.full((B, Hkv), self.sink), torch.full((B, Hkv), self.recent))

    # -- entry points ------------------------------------------------------------------------------------
    def after_prefill(self, ctx: LayerContext, query, attention_mask) -> None:
        cl = ctx.cache_layer
        if cl is None:
            return super().after_prefill(ctx, query, attention_mask)  # the same clear error
        if cl.is_sliding:
            return
        if cl.ragged is not None:  # more prompt tokens on a compressed cache: as a decode step
            self.after_decode(ctx, query, attention_mask)
            return
        T = cl.end - cl.start
        if query.shape[2] != T:
            raise AccelError("taskkv compresses the prompt right after the prefill (chunked prefill is not supported)")
        rt = ctx.runtime
        valid = prompt_valid(attention_mask, query.shape[0], T)
        scaling = getattr(ctx.module, "scaling", None) or query.shape[-1] ** -0.5
        w_o = rt.adapter.output_projection(ctx.layer_idx)
        pend = rt.shared.setdefault("taskkv", {"layers": [], "stats": {}})
        pend["layers"].append((ctx.layer_idx, cl))
        pend["stats"][ctx.layer_idx] = self._layer_stats(cl, ctx.layer_idx, PrefillView(query=query), valid, scaling, w_o)
        full = [i for i, w in enumerate(rt.info.sliding_windows) if w is None]
        if ctx.layer_idx == full[-1]:  # the last full-attention layer: decide for the whole model
            rt.shared.pop("taskkv")
            n = valid.sum(1) if valid is not None else torch.full((query.shape[0],), T, dtype=torch.long)
            self._finish(pend["layers"], pend["stats"], n, valid, int(rt.reserve or 0), rt.layer_state)

    @torch.no_grad()  # statistics and eviction are bookkeeping: never build an autograd graph
    def compress_recorded(self, cache, runtime, attention_mask=None) -> None:
        stats_all = getattr(cache, "prefill_stats", None)
        if stats_all is None:
            raise AccelError("taskkv: this cache has no recorded prefill statistics")
        seq = runtime.sequence(cache)
        modules = list(runtime.adapter.attention_modules())
        layers, stats = [], {}
        valid = n = None
        for i, cl in enumerate(cache.layers):
            if cl.is_sliding or cl.ragged is not None or cl.keys is None:
                continue
            T = cl.end - cl.start
            B = cl.keys.shape[0]
            valid = prompt_valid(attention_mask, B, T) if attention_mask is not None else None
            n = valid.sum(1) if valid is not None else torch.full((B,), T, dtype=torch.long)
            scaling = getattr(modules[i], "scaling", None) or cl.keys.shape[-1] ** -0.5
            view = PrefillView(recorded=stats_all.get(i, {}))
            stats[i] = self._layer_stats(cl, i, view, valid, scaling, runtime.adapter.output_projection(i))
            layers.append((i, cl))
        if layers:
            self._finish(layers, stats, n, valid, int(runtime.reserve or 0), seq.layer_state)
