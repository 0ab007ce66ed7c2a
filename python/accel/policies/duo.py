"""DuoAttention-style head types (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM
Inference with Retrieval and Streaming Heads", arXiv 2410.10819; methods.md 7.6).

Every KV head is a *retrieval* head (full cache: keeps every prompt token and every generated token)
or a *streaming* head (``sink`` + ``recent`` tokens, 64 + 256 by default: a constant cache that evicts
its oldest non-sink token as tokens arrive). The heads are ranked offline by ``accel.calibrate(...,
policy="duo")`` / ``accel plan --policy duo`` (``accel.scheduler.heads``: the output error a head
suffers when it only sees its sink and recent tokens, measured on synthetic retrieval prompts; no
gradient training). The plan stores every head's score, and each request turns the best-ranked heads
(over all layers) into retrieval heads:

* ``sparsity`` (DuoAttention's deployment knob): that fraction of heads streams; or
* ``budget`` / ``budget_ratio`` (default 0.25, like accel's other KV policies): as many retrieval
  heads as the average per-head budget allows for this prompt,
  ``n_ret = floor(N * (f * n - S) / (n - S))`` with ``S = sink + recent``.

Every head retrieval (``budget_ratio=1`` or ``sparsity=0``) is exactly dense; every head streaming is
accel's ``streaming`` policy with ``sink`` and ``budget = sink + recent``. Prefill stays dense
([INFER]: DuoAttention also streams the streaming heads' prefill; that saves prefill time, not cache).
Without a plan for the model, patching refuses and names the command that makes one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import AccelError
from ..scheduler.plan import Plan
from .base import ModelInfo
from .kvcompress import BudgetedKVPolicy, sinks_then_newest
from .registry import register_policy


@register_policy("duo")
@dataclass
class DuoAttentionPolicy(BudgetedKVPolicy):
    sink: int = 64
    recent: int = 256
    sparsity: float | None = None

    evict_by: ClassVar[str] = "age"
    accumulate: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        if self.sink < 0 or self.recent < 1:
            raise AccelError(f"duo: sink must be >= 0 and recent >= 1, got {self.sink}, {self.recent}")
        if self.sparsity is not None and not 0 <= float(self.sparsity) <= 1:
            raise AccelError(f"duo: sparsity (fraction of streaming heads) must be in [0, 1], got {self.sparsity!r}")

    # -- plan --------------------------------------------------------------------------------------------
    needs_plan: ClassVar[bool] = True

    def build_plan(self, info: ModelInfo) -> Plan:
        from ..scheduler.shipped import shipped_plan

        plan = shipped_plan("duo", info)
        if plan is None:
            raise AccelError(
                f"duo needs per-head scores for this model ({info.model_type}, {info.num_layers} layers) and none "
                "ships with accel. Make a plan (a few minutes on CPU): `accel plan --model PATH --policy duo --out "
                "duo.json` or `accel.calibrate(model, tokenizer, policy='duo')`, then `accel.patch(model, 'duo', "
                "plan='duo.json')`"
            )
        return plan

    def _ranks(self) -> dict[tuple[int, int], int]:
        plan = getattr(self, "_plan", None)
        if plan is None:
            raise AccelError("duo: no plan attached (patch the model with a duo plan)")
        key = id(plan)
        cached = getattr(self, "_rank_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        items = []
        for li, lp in enumerate(plan.layers):
            if lp.heads is None:
                continue
            for h, hp in enumerate(lp.heads):
                if hp.score is None:
                    raise AccelError(f"duo: plan layers[{li}].heads[{h}] has no score; make the plan with "
                                     "`accel plan --policy duo`")
                items.append((-float(hp.score), li, h))
        if not items:
            raise AccelError("duo: the plan has no per-head scores; make it with `accel plan --policy duo`")
        ranks = {(li, h): r for r, (_, li, h) in enumerate(sorted(items))}
        self._rank_cache = (key, ranks)
        return ranks

    def _n_retrieval(self, n: torch.Tensor, N: int) -> torch.Tensor:
        if self.sparsity is not None:
            return torch.full_like(n, round((1 - float(self.sparsity)) * N))
        S = self.sink + self.recent
        f = self.base_budget(n).double() / n.double().clamp(min=1)  # average kept fraction per head
        nret = torch.floor(N * (f * n.double() - S) / (n.double() - S).clamp(min=1)).long()
        nret = torch.where(n <= S, torch.full_like(n, N), nret)  # short prompts: streaming keeps all anyway
        return nret.clamp(0, N)

    def _is_retrieval(self, layer_idx: int, n: torch.Tensor, Hkv: int) -> torch.Tensor:
        ranks = self._ranks()
        N = len(ranks)
        nret = self._n_retrieval(n, N)  # [B]
        r = torch.tensor([ranks.get((layer_idx, h), -1) for h in range(Hkv)])
        return (r.view(1, Hkv) < nret.view(-1, 1)) | (r.view(1, Hkv) < 0)

    # -- budgets / scores ------------------------------------------------------------------------------
    def head_budgets(self, layer_idx, num_layers, n, Hkv, view, keys, valid, scaling):
        ret = self._is_retrieval(layer_idx, n, Hkv)
        stream = torch.minimum(n, torch.full_like(n, self.sink + self.recent)).view(-1, 1).expand(-1, Hkv)
        self._ret = ret
        return torch.where(ret, n.view(-1, 1).expand(-1, Hkv), stream).clone()

    def growing_heads(self, budgets, n):
        return self._ret.clone()

    def protect(self, budgets):
        return torch.full_like(budgets, self.sink), torch.zeros_like(budgets)

    def token_scores(self, view, keys, valid, budgets, scaling):
        return sinks_then_newest(keys, valid, self.sink)
