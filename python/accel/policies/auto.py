"""``policy="auto"``: every KV head's eviction rule and budget chosen by accel's scheduler under the user's target.

The executor of the scheduler's KV plans (``accel.scheduler.solve``). Each full-attention layer of the plan is either
kept whole (``mode="full"``) or compressed (``mode="compress"``) under one eviction rule (``params["rule"]``):

* ``window``: the first ``sink`` real tokens and the newest ones (StreamingLLM, Xiao et al. 2023; DuoAttention's
  streaming heads), evicting the oldest non-sink token during decode;
* ``scored``: SnapKV's score (attention of the last ``window`` prompt queries, average-pooled over ``kernel``
  tokens, mean over the GQA group; Li et al. 2024) with the observation window kept, evicting by that score plus
  the attention each kept token receives during decode (H2O's accumulation, as accel's SnapKV does).

Each KV head of a compressed layer has its own kind (``full``: keeps every prompt and generated token, a
DuoAttention retrieval head; or the layer's rule) and its own share of the prompt (``beta``: it keeps
``ceil(beta * n)`` of a prompt of ``n`` tokens, never fewer than the rule's ``sink`` + 1 or ``window`` tokens),
so budgets differ per head as in MoA and DuoAttention and the ragged cache holds exactly that. The rule is per layer
because decode-time eviction is one kernel call per layer.

``accel.patch(model, "auto", kv_budget=0.25)`` solves the plan from the shipped calibration profile of the model
(``accel plan --policy auto`` makes one for another model) for that target; ``speed=1.3`` (with ``context`` and
``batch``) asks for a predicted decode speed-up over dense attention on this machine, from its measured cost
model (``accel calibrate-cost``); ``max_ppl_increase=0.02`` for the fewest kept tokens whose perplexity the profile's
measured curve predicts within +2%. Targets given together are all met. A plan file solved by
``accel plan --policy auto ...`` runs exactly as written. Every head ``full`` is exactly dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import AccelError
from ..models.base import ModelInfo
from ..plan import Plan
from .budgeted import BudgetedKVPolicy, sinks_then_newest
from .registry import register_policy
from .snapkv import force_window, snapkv_scores

RULES = ("window", "scored")
#: the options that state a target (and what a speed target is for): given with a solved plan, it is solved again
TARGET_KNOBS = ("kv_budget", "speed", "context", "batch", "max_ppl_increase")


@register_policy("auto")
@dataclass
class AutoPolicy(BudgetedKVPolicy):
    budget_ratio: float | None = None  # the plan's per-head shares are the budget
    #: the average share of the prompt a full-attention KV head keeps (the bytes target, like budget_ratio)
    kv_budget: float | None = None
    #: the predicted decode speed-up over dense attention (needs this machine's cost model)
    speed: float | None = None
    #: the largest perplexity increase allowed (0.02: +2% over dense), predicted from the profile's measured curve
    max_ppl_increase: float | None = None
    #: the context and batch size a speed target is for (4096 and 1 when not given)
    context: int | None = None
    batch: int | None = None
    #: a speed target's cost model file (from `accel calibrate-cost --out cost.json`); None: the one accel ships
    cost: str | None = None
    sink: int = 16
    window: int = 32
    kernel: int = 7

    needs_plan: ClassVar[bool] = True
    per_kv_head: ClassVar[bool] = True
    #: alone on the model: its plan decides every head of every layer
    alone: ClassVar[bool] = True
    calibrator: ClassVar[str] = "accel.calibration.auto:calibrate_auto"
    plan_modes: ClassVar[tuple] = ("full", "compress")
    head_kinds: ClassVar[tuple] = RULES

    def validate(self) -> None:
        if self.budget is not None or self.budget_ratio is not None:
            raise AccelError("auto: the plan sets every head's budget; give kv_budget=<share of the prompt kept>, "
                             "speed=<decode speed-up> or max_ppl_increase=<relative increase> instead of budget / "
                             "budget_ratio")
        if self.min_budget is not None:
            raise AccelError("auto: the plan sets every head's floor (sink + 1 tokens for the window rule, the "
                             "observation window for the scored rule); drop min_budget")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if self.kv_budget is not None and not (number(self.kv_budget) and 0 < self.kv_budget <= 1):
            raise AccelError(f"auto: kv_budget must be a share of the prompt in (0, 1], got {self.kv_budget!r}")
        if self.max_ppl_increase is not None and not (number(self.max_ppl_increase) and self.max_ppl_increase >= 0
                                                          and math.isfinite(self.max_ppl_increase)):
            raise AccelError("auto: max_ppl_increase must be a relative perplexity increase >= 0 (0.02: +2%), got "
                             f"{self.max_ppl_increase!r}")
        if self.speed is not None and not (number(self.speed) and self.speed >= 1):
            raise AccelError(f"auto: speed must be a decode speed-up >= 1 over dense attention, got {self.speed!r}")
        if self.cost is not None and (self.speed is None or not isinstance(self.cost, str) or not self.cost):
            raise AccelError("auto: cost is the cost model file of a speed target (`accel calibrate-cost --out "
                             f"cost.json`); give it with speed=..., got cost={self.cost!r}"
                             + ("" if self.speed is not None else " without speed"))
        if (self.context is not None or self.batch is not None) and self.speed is None:
            raise AccelError("auto: context and batch set what a speed target is for; add speed=..., or drop them "
                             "(a kv_budget is a share of any prompt)")
        if self.speed is not None and self.decode != "fixed":
            raise AccelError("auto: a speed target is predicted for heads that stay at their budget; use "
                             "decode='fixed' with speed")
        for name in ("context", "batch", "window", "kernel"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise AccelError(f"auto: {name} must be a positive integer, got {v!r}")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise AccelError(f"auto: sink must be an integer >= 0, got {self.sink!r}")
        if self.decode not in ("fixed", "grow"):
            raise AccelError(f"auto: decode must be 'fixed' (stay at the budget) or 'grow', got {self.decode!r}")

    def target(self) -> dict:
        """The solver's targets, any of ``kv_budget``, ``speed`` (with ``context`` and ``batch``) and
        ``max_ppl_increase``, each a constraint on the plan (``kv_budget`` 0.25 when none is given)."""
        out = {}
        if self.kv_budget is not None:
            out["kv_budget"] = float(self.kv_budget)
        if self.speed is not None:
            out.update(speed=float(self.speed), context=int(self.context or 4096), batch=int(self.batch or 1))
        if self.max_ppl_increase is not None:
            out["max_ppl_increase"] = float(self.max_ppl_increase)
        return out or {"kv_budget": 0.25}

    # -- plan --------------------------------------------------------------------------------------------
    #: solves the plan at patch time for this model and machine (``accel.scheduler.solve.plan_for_patch``)
    planner: ClassVar[str] = "accel.scheduler.solve:plan_for_patch"

    def build_plan(self, info: ModelInfo) -> Plan:
        raise AccelError("auto: its plan is solved for the model and machine when patching; use accel.patch(model, "
                         "'auto', kv_budget=...) or `accel plan --policy auto --kv-budget ...`")

    def check_plan_params(self, plan: Plan) -> None:
        # the plan's damage was profiled with its sink / window / kernel: run those, and refuse others set by hand
        explicit = self.explicit_knobs()
        for knob in ("sink", "window", "kernel"):
            if knob in (plan.params or {}):
                theirs = plan.params[knob]
                if knob in explicit and getattr(self, knob) != theirs:
                    raise AccelError(f"auto: option {knob}={getattr(self, knob)!r} contradicts the plan's {knob}="
                                     f"{theirs!r} (its profile was measured with it); drop the option, or calibrate "
                                     f"a plan with `accel plan --policy auto --set {knob}=...`")
                object.__setattr__(self, knob, theirs)
        self.validate()  # the plan's own values, held to the same rules
        for i, lp in enumerate(plan.layers):
            if lp.mode != "compress":
                if lp.heads and any(h.kind != "full" for h in lp.heads):
                    raise AccelError(f"auto: plan layers[{i}] is not compressed (mode {lp.mode!r}) but names "
                                     "compressed heads; set mode 'compress' or make every head 'full'")
                continue
            rule = (lp.params or {}).get("rule")
            if rule not in RULES:
                raise AccelError(f"auto: plan layers[{i}].params.rule must be one of {RULES}, got {rule!r}")
            if not lp.heads:
                raise AccelError(f"auto: plan layers[{i}] is compressed but has no per-head plan")
            for j, hp in enumerate(lp.heads):
                if hp.kind not in ("full", rule):
                    raise AccelError(f"auto: plan layers[{i}].heads[{j}].kind {hp.kind!r}: a head of a {rule!r} layer "
                                     f"is 'full' or {rule!r}")
                if hp.kind != "full" and not (isinstance(hp.beta, (int, float)) and 0 < hp.beta <= 1):
                    raise AccelError(f"auto: plan layers[{i}].heads[{j}].beta (the share of the prompt it keeps) must "
                                     f"be in (0, 1], got {hp.beta!r}")

    def describe(self, runtime) -> str:
        """One line for ``PatchHandle.summary()``: the target, and what the plan gives each layer and KV head."""
        plan = runtime.plan
        p = plan.params.get("predicted", {})
        layers = [lp for lp in plan.layers if lp.mode == "compress"]
        kinds: dict[str, int] = {}
        for lp in layers:
            for hp in lp.heads:
                k = "full" if hp.kind == "full" else f"{hp.kind} at {hp.beta:.4g} of the prompt"
                kinds[k] = kinds.get(k, 0) + 1
        heads = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
        target = plan.params.get("target")
        return ("auto: " + (f"target {target}, " if target else "a plan as written, ")
                + f"{len(layers)} of {plan.num_layers} layers compressed"
                + (f" (KV heads: {heads})" if heads else "")
                + (f", mean share of the prompt kept {p['kv_share']:.1%}" if "kv_share" in p else "")
                + (f", predicted perplexity {p['ppl_increase']:+.2%}" if "ppl_increase" in p else
                   ", perplexity beyond the most damaged plan the profile's curve measured (no prediction)"
                   if layers and isinstance((plan.params.get("profile") or {}).get("ppl"), dict) else "")
                + (f", predicted {p['speedup']}x dense's decode step" if "speedup" in p else ""))

    # -- per layer -----------------------------------------------------------------------------------------
    def _layer(self, layer_idx: int):
        plan = getattr(self, "_plan", None)
        if plan is None:
            raise AccelError("auto: no plan attached (patch the model with an auto plan)")
        return plan.layers[layer_idx]

    def scored_layer(self, layer_idx: int, plan: Plan) -> bool:
        lp = plan.layers[layer_idx]
        return lp.mode == "compress" and lp.params.get("rule") == "scored"

    def compress(self, cl, layer_idx, num_layers, view, valid, scaling, state, reserve=0, plan=None, kv_offset=0):
        self._plan = plan
        lp = self._layer(layer_idx)
        if lp.mode != "compress":
            return  # kept whole: exact, every token kept
        self._rule = lp.params["rule"]
        super().compress(cl, layer_idx, num_layers, view, valid, scaling, state, reserve=reserve, plan=plan,
                         kv_offset=kv_offset)

    @property
    def evict_by(self) -> str:
        return "score" if getattr(self, "_rule", "scored") == "scored" else "age"

    @property
    def accumulate(self) -> bool:
        return getattr(self, "_rule", "scored") == "scored"

    def budget_floor(self) -> int:
        return int(self.sink) + 1 if getattr(self, "_rule", "scored") == "window" else int(self.window)

    def head_budgets(self, layer_idx, num_layers, n, Hkv, view, keys, valid, scaling):
        lp = self._layer(layer_idx)
        off = getattr(self, "_kv_offset", 0)
        heads = lp.heads[off:off + Hkv]
        full = torch.tensor([h.kind == "full" for h in heads]).view(1, Hkv).expand(n.shape[0], Hkv)
        share = torch.tensor([head_share(h.kind, h.beta) for h in heads], dtype=torch.float64)
        budgets = torch.ceil(n.double().view(-1, 1) * share.view(1, Hkv)).long()
        self._full = full.clone()
        return torch.where(full, n.view(-1, 1).expand(-1, Hkv), budgets).clone()

    def growing_heads(self, budgets, n):
        if self.decode == "grow":
            return torch.ones_like(budgets, dtype=torch.bool)
        return self._full.clone()

    def protect(self, budgets):
        if self._rule == "window":
            return torch.full_like(budgets, self.sink), torch.zeros_like(budgets)
        return torch.zeros_like(budgets), torch.full_like(budgets, self.window).minimum(budgets)

    def prefill_statistics(self, query, keys, valid, scaling) -> dict:
        # recorded before a plan is attached (the evaluation's shared prefill): enough queries for the plan's window
        return {"q_window": query[:, :, -max(self.window, 64):].detach().clone()}

    def token_scores(self, view, keys, valid, budgets, scaling):
        if self._rule == "window":
            return sinks_then_newest(keys, valid, self.sink)
        s = snapkv_scores(view, keys, valid, scaling, self.window, self.kernel)
        self._raw = s.clone()
        return force_window(s, self.window)


def head_share(kind: str, beta: float | None) -> float:
    """The share of the prompt a planned head keeps."""
    return 1.0 if kind == "full" else float(beta)


def kept_tokens(share: float, n: int, rule: str, sink: int, window: int) -> int:
    """Tokens a head of ``rule`` with ``share`` keeps of a prompt of ``n`` tokens (its floor included)."""
    if share >= 1:
        return n
    floor = sink + 1 if rule == "window" else window
    return min(n, max(floor, math.ceil(share * n)))
