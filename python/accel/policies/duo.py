"""DuoAttention-style head types (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM
Inference with Retrieval and Streaming Heads", arXiv 2410.10819; methods.md 7.6).

Every KV head is a *retrieval* head (full cache: keeps every prompt token and every generated token)
or a *streaming* head (a constant cache of ``sink`` + ``recent`` tokens, 16 + 64 by default, plus scored
middle tokens, see below; published DuoAttention streams 64 + 256 and evicts the oldest non-sink token). The heads are ranked offline by ``accel.calibrate(...,
policy="duo")`` / ``accel plan --policy duo`` (``accel.calibration.duo``: by default the attention mass a
head puts outside its sink and recent tokens at the worst step of synthetic retrieval prompts with the
answer appended, ``metric="far_mass"``; no gradient training). The plan stores every head's score, and
each request turns the best-ranked heads (over all layers) into retrieval heads:

* ``sparsity`` (DuoAttention's deployment knob): that fraction of heads streams; or
* ``budget`` / ``budget_ratio`` (default 0.25, like accel's other KV policies): as many retrieval
  heads as the average per-head budget allows for this prompt,
  ``n_ret = floor(N * (f * n - S) / (n - S))`` with ``S`` a streaming head's size.

Streaming heads with scored middle tokens, an accel extension and the default ([INFER]): each streaming head
also keeps prompt tokens chosen by SnapKV's score (attention of the last ``window`` prompt queries,
average-pooled over ``kernel`` tokens, mean over the GQA group; Li et al., 2024), so a streaming head of a
request whose question points at a needle can still see it. Its size is ``stream_share`` (default 0.5) of
the average per-head budget -- sinks, recent tokens, and the rest middle tokens -- or ``middle`` tokens
on top of the sinks and recent tokens when given. Those heads evict by that score during decode,
protecting the sinks and recent tokens (new tokens score 0, so they leave in age order once out of the
recent window), and the retrieval-head count above uses ``S = sink + recent + middle``.
DuoAttention as published: ``middle=0`` (``stream_share`` is then unused), with ``sink=64, recent=256``.
Measured on SmolLM2-135M (docs/results.md): at 25% / 4K, published form NIAH 9/20 and passkey 12/20,
16 + 64 + 432 middle tokens (what the default gives there, within 2 tokens) 11/20 and 15/20, dense 12/20 and
16/20; at 25% / 8K (12 samples) the default equals dense (6/12, 8/12), the published form 2/12 and 8/12.

Every head retrieval (``budget_ratio=1`` or ``sparsity=0``) is exactly dense; with ``middle=0`` every head
streaming is accel's ``streaming`` policy with ``sink`` and ``budget = sink + recent``. Prefill stays dense
([INFER]: DuoAttention also streams the streaming heads' prefill; that saves prefill time, not cache).
Without a plan for the model, patching refuses and names the command that makes one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import AccelError
from ..models.base import ModelInfo
from ..plan import Plan
from ..plan.shipped import require_shipped_plan
from .budgeted import BudgetedKVPolicy, force_sinks_and_recent, sinks_then_newest
from .snapkv import snapkv_scores
from .registry import register_policy


@register_policy("duo")
@dataclass
class DuoAttentionPolicy(BudgetedKVPolicy):
    sink: int = 16
    recent: int = 64
    sparsity: float | None = None
    middle: int | None = None
    stream_share: float = 0.5
    window: int = 32
    kernel: int = 7

    accumulate: ClassVar[bool] = False

    def budget_floor(self) -> int:
        """No head keeps fewer than its sink + recent tokens (the observation window only scores the middle)."""
        return int(self.min_budget) if self.min_budget is not None else int(self.sink) + int(self.recent)

    def validate(self) -> None:
        super().validate()
        if self.sink < 0 or self.recent < 1:
            raise AccelError(f"duo: sink must be >= 0 and recent >= 1, got {self.sink}, {self.recent}")
        if self.sparsity is not None and not 0 <= float(self.sparsity) <= 1:
            raise AccelError(f"duo: sparsity (fraction of streaming heads) must be in [0, 1], got {self.sparsity!r}")
        if self.middle is not None and (not isinstance(self.middle, int) or self.middle < 0):
            raise AccelError(f"duo: middle must be a number of tokens >= 0 (or None: from stream_share), got {self.middle!r}")
        if not 0 <= float(self.stream_share) < 1:
            raise AccelError(f"duo: stream_share (a streaming head's share of the average budget) must be in [0, 1), "
                             f"got {self.stream_share!r}")
        if self.window < 1 or self.kernel < 1:
            raise AccelError(f"duo: window and kernel must be >= 1, got {self.window}, {self.kernel}")

    @property
    def evict_by(self) -> str:
        """Streaming heads with scored middle tokens evict by that score, sink+recent-only ones by age."""
        return "score" if self.scored else "age"

    @property
    def scored(self) -> bool:
        """Whether streaming heads keep SnapKV-scored middle tokens (accel's extension)."""
        return bool(self.middle) if self.middle is not None else float(self.stream_share) > 0

    def stream_size(self, n: torch.Tensor) -> torch.Tensor:
        """[B] tokens a streaming head keeps for prompts of ``n`` real tokens: sinks + recent + middle."""
        S = self.sink + self.recent
        if self.middle is not None:
            return torch.full_like(n, S + self.middle)
        share = torch.floor(self.base_budget(n).double() * float(self.stream_share)).long()
        return share.clamp(min=S)

    def prefill_statistics(self, query, keys, valid, scaling) -> dict:
        return {"q_window": query[:, :, -self.window:].detach().clone()} if self.scored else {}

    # -- plan --------------------------------------------------------------------------------------------
    needs_plan: ClassVar[bool] = True
    #: heads are ranked over the whole model (the plan); each KV head's budget follows from its own rank
    per_kv_head: ClassVar[bool] = True
    calibrator: ClassVar[str] = "accel.calibration.duo:calibrate_duo"
    plan_modes: ClassVar[tuple] = ("full", "compress")
    head_kinds: ClassVar[tuple] = ("retrieval", "streaming")

    def build_plan(self, info: ModelInfo) -> Plan:
        return require_shipped_plan("duo", info, "per-head scores (which heads retrieve and which stream)")

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
        S = self.stream_size(n).double()
        f = self.base_budget(n).double() / n.double().clamp(min=1)  # average kept fraction per head
        nret = torch.floor(N * (f * n.double() - S) / (n.double() - S).clamp(min=1)).long()
        nret = torch.where(n.double() <= S, torch.full_like(n, N), nret)  # short prompts: streaming keeps all anyway
        return nret.clamp(0, N)

    def _is_retrieval(self, layer_idx: int, n: torch.Tensor, Hkv: int) -> torch.Tensor:
        ranks = self._ranks()
        N = len(ranks)
        nret = self._n_retrieval(n, N)  # [B]
        off = getattr(self, "_kv_offset", 0)  # a tensor-parallel rank's heads: ranked among all the model's heads
        r = torch.tensor([ranks.get((layer_idx, off + h), -1) for h in range(Hkv)])
        return (r.view(1, Hkv) < nret.view(-1, 1)) | (r.view(1, Hkv) < 0)

    # -- budgets / scores ------------------------------------------------------------------------------
    def head_budgets(self, layer_idx, num_layers, n, Hkv, view, keys, valid, scaling):
        ret = self._is_retrieval(layer_idx, n, Hkv)
        stream = torch.minimum(n, self.stream_size(n)).view(-1, 1).expand(-1, Hkv)
        self._ret = ret
        return torch.where(ret, n.view(-1, 1).expand(-1, Hkv), stream).clone()

    def growing_heads(self, budgets, n):
        return self._ret.clone()

    def protect(self, budgets):
        # score eviction must protect the recent window, or each new token (score 0) would go first
        recent = torch.full_like(budgets, self.recent) if self.scored else torch.zeros_like(budgets)
        return torch.full_like(budgets, self.sink), recent

    def token_scores(self, view, keys, valid, budgets, scaling):
        if not self.scored:
            return sinks_then_newest(keys, valid, self.sink)
        s = snapkv_scores(view, keys, valid, scaling, self.window, self.kernel)
        self._raw = s.clone()  # the decode-eviction seed of the middle tokens
        return force_sinks_and_recent(s, valid, self.sink, self.recent)
