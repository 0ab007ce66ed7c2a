"""The scheduler's solver: from a calibration profile (``accel.calibration.auto``) to an ``auto`` plan under a target.

Every full-attention layer is kept whole or compressed under one eviction rule (``window`` / ``scored``), and every
KV head of a compressed layer keeps a share of the prompt from the profile's grid (1.0: the whole cache, a
retrieval head). The choice is a mixed-integer program (HiGHS through ``scipy.optimize.milp``):

    minimise    sum over heads of damage(l, h, rule_l, share_h)     (the profile's predicted lost attention)
    subject to  one rule per layer, one share per head (a head's rule is its layer's),
                kv_budget:  mean kept share over full-attention KV heads <= kv_budget, or
                speed:      predicted decode step <= dense step / speed at ``context`` and ``batch``, from this
                            machine's measured cost model (``accel.scheduler.cost``): per layer a fixed cost plus a
                            per-key slope for its kind (``full`` / ``kv_plain`` / ``kv_scored``), so the step is
                            linear in the choices.

Ties go to fewer kept tokens, then to layers kept whole. Shares count each rule's floor (a ``window`` head never
keeps fewer than sink + 1 tokens, a ``scored`` one fewer than its observation window) at the profile's context for a
bytes target and at ``context`` for a speed target. The plan records its target and its predictions; ``explain``
says which layer and head got what and why.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import sys

import numpy as np

from ..errors import AccelError
from ..plan import HeadPlan, LayerPlan, Plan
from .cost import CostModel

logger = logging.getLogger("accel")

#: layer options: kept whole, or compressed under one rule
LAYER_OPTIONS = ("dense", "window", "scored")
_KIND = {"dense": "full", "window": "kv_plain", "scored": "kv_scored"}


def profile_of(plan: Plan) -> dict:
    """The calibration profile an ``auto`` plan carries, checked; one line naming what is wrong otherwise."""
    prof = (plan.params or {}).get("profile")
    if not isinstance(prof, dict):
        raise AccelError("auto: the plan carries no calibration profile (params.profile); make one with `accel plan "
                         "--policy auto`")
    need = ("shares", "rules", "layers", "damage", "context")
    missing = [k for k in need if k not in prof]
    if missing:
        raise AccelError(f"auto: the plan's profile lacks {missing}; make it again with `accel plan --policy auto`")
    shares, layers = prof["shares"], prof["layers"]
    if not shares or sorted(shares) != list(shares) or shares[-1] != 1.0 or shares[0] <= 0:
        raise AccelError("auto: profile.shares must be increasing shares in (0, 1] ending with 1.0")
    if set(prof["rules"]) != {"window", "scored"} or set(prof["damage"]) != {"window", "scored"}:
        raise AccelError("auto: profile.rules and profile.damage must cover the rules 'window' and 'scored'")
    for r in ("window", "scored"):
        d = prof["damage"][r]
        if len(d) != len(layers) or any(len(row) != plan.num_kv_heads or any(len(x) != len(shares) for x in row)
                                        for row in d):
            raise AccelError(f"auto: profile.damage[{r!r}] must hold layers x KV heads x shares values")
    bad = [li for li in layers if not (isinstance(li, int) and 0 <= li < plan.num_layers)]
    if bad:
        raise AccelError(f"auto: profile.layers names layers {bad} the plan does not have")
    return prof


def _fit_cost(cost: CostModel, plan: Plan, info, batch: int) -> dict:
    """The cost model's coefficients at ``batch``, after checking it was measured for this model."""
    cost.check_fits(fingerprint=None if info is None else info.fingerprint, num_layers=plan.num_layers,
                    num_kv_heads=plan.num_kv_heads)
    return cost.coefficients(batch)


@contextlib.contextmanager
def _native_stdout_silenced():
    """HiGHS's C++ code writes solver notes straight to file descriptor 1; a library must not print, so the solve runs
    with that descriptor pointed at /dev/null (Python-level output is flushed first and restored after)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real descriptor (a notebook's stream): nothing to redirect
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def plan_for_patch(policy, model, info, plan) -> Plan:
    """The plan ``accel.patch(model, "auto", ...)`` runs (``AutoPolicy.planner``): ``plan`` as written when it was
    solved already and no target is given with it; solved from its profile for the policy's target when a target is
    given or it is a calibration profile never solved; without ``plan``, solved from the profile accel ships for the
    model. A speed target reads this machine's cost model (``cost_model_for``, one line when there is none)."""
    from ..plan.shipped import require_shipped_plan
    from .cost import cost_model_for

    explicit = policy.explicit_knobs() & {"kv_budget", "speed", "context", "batch"}
    cost = cost_model_for(model) if policy.speed is not None else None
    if plan is None:
        profile = require_shipped_plan("auto", info, "a calibration profile (each head's damage under each rule and "
                                       "budget)")
        return solve_plan(profile, policy.target(), cost=cost, info=info)
    given = Plan.coerce(plan)
    if given.policy != "auto":
        raise AccelError(f"auto: this is a {given.policy!r} plan; auto runs plans from `accel plan --policy auto` or "
                         "accel.calibrate(..., policy='auto')")
    params = given.params or {}
    if "profile" in params and (explicit or "target" not in params):
        return solve_plan(given, policy.target(), cost=cost, info=info)
    if explicit:
        raise AccelError("auto: this plan carries no calibration profile to solve again for "
                         f"{sorted(explicit)}; drop the target to run it as written, or make a plan with `accel plan "
                         "--policy auto`")
    return given


#: solved plans by (profile, target, cost model, sliding windows): patching the same target again (an evaluation
#: patches once per sample) reuses the solution instead of solving the same program again
_SOLVED: dict[str, dict] = {}


def solve_plan(profile_plan: Plan, target: dict, cost: CostModel | None = None, info=None) -> Plan:
    """An ``auto`` plan for ``target`` (``{"kv_budget": x}`` or ``{"speed": s, "context": n, "batch": b}``) from the
    profile ``profile_plan`` carries; ``cost`` (this machine's cost model) is required for a speed target and, when
    given, adds the predicted step to the plan. ``info``: the model's ``ModelInfo`` (sliding-window layers)."""
    prof = profile_of(profile_plan)
    key = hashlib.sha256(json.dumps([profile_plan.params, profile_plan.num_layers, profile_plan.num_kv_heads,
                                     profile_plan.model_type, profile_plan.provenance, target,
                                     None if cost is None else cost.to_dict(),
                                     None if info is None else list(info.sliding_windows)],
                                    sort_keys=True, default=str).encode()).hexdigest()
    if key not in _SOLVED:
        _SOLVED[key] = _solve(profile_plan, prof, target, cost, info).to_dict()
    return Plan.from_dict(copy.deepcopy(_SOLVED[key]))


def _solve(profile_plan: Plan, prof: dict, target: dict, cost: CostModel | None, info) -> Plan:
    from scipy.optimize import Bounds, LinearConstraint, milp

    from ..policies.auto import kept_tokens

    shares, layers = [float(s) for s in prof["shares"]], list(prof["layers"])
    Hkv, L = int(profile_plan.num_kv_heads), int(profile_plan.num_layers)
    sink = int(profile_plan.params.get("sink", 16))
    window = int(profile_plan.params.get("window", 32))
    if "speed" in target:
        if cost is None:
            raise AccelError("auto: a speed target needs this machine's cost model; run `accel calibrate-cost` (or "
                             "give kv_budget instead)")
        context, batch = int(target["context"]), int(target["batch"])
    else:
        kv_budget = float(target["kv_budget"])
        context, batch = int(target.get("context", prof["context"])), int(target.get("batch", 1))
    coef = _fit_cost(cost, profile_plan, info, batch) if cost is not None else None
    windows = list(info.sliding_windows) if info is not None else [None] * L

    # variables: per layer its option y (3), per layer x head x (option, share) its choice x
    choices = [("dense", 1.0)] + [(r, s) for r in ("window", "scored") for s in shares]
    C = len(choices)
    nl = len(layers)
    ny = nl * 3
    nx = nl * Hkv * C
    N = ny + nx

    def yi(l, o):
        return l * 3 + LAYER_OPTIONS.index(o)

    def xi(l, h, c):
        return ny + (l * Hkv + h) * C + c

    n_bytes = int(prof["context"]) if "speed" not in target else context
    eff = np.array([kept_tokens(s, n_bytes, "window" if r == "dense" else r, sink, window) / n_bytes
                    for r, s in choices])
    dmg = np.zeros(N)
    obj = np.zeros(N)
    T = context + 1
    m = batch / 1e6  # ms coefficients are per million row x head x token keys
    step = np.zeros(N)  # predicted ms per variable (speed target / prediction)
    const_ms = 0.0
    if coef is not None:
        const_ms = coef["base_ms"]
        for i, w in enumerate(windows):
            if i not in layers:
                const_ms += coef["full_slope"] * m * Hkv * (min(T, w) if w else T)
    for l, li in enumerate(layers):
        for o in ("window", "scored"):
            obj[yi(l, o)] = 1e-7  # ties: keep a layer whole rather than compress it with every head full
            if coef is not None:
                step[yi(l, o)] = coef[f"{_KIND[o]}_fixed"]
        for h in range(Hkv):
            for c, (r, s) in enumerate(choices):
                d = 0.0 if r == "dense" else float(prof["damage"][r][l][h][shares.index(s)])
                dmg[xi(l, h, c)] = d
                obj[xi(l, h, c)] = d + 1e-5 * eff[c]
                if coef is not None:
                    held = T if r == "dense" else kept_tokens(s, context, r, sink, window) + 1
                    step[xi(l, h, c)] = coef[f"{_KIND[r]}_slope"] * m * held
    rows, lo, hi = [], [], []

    def add(coeffs: dict, a: float, b: float):
        row = np.zeros(N)
        for k, v in coeffs.items():
            row[k] = v
        rows.append(row)
        lo.append(a)
        hi.append(b)

    # a rule whose per-key decode cost the cost model did not determine (fitted to about zero: under a tenth of dense
    # attention's, which reads keys with the same kernels) would look free: a speed target leaves it out rather than
    # trust that
    excluded = [o for o in ("window", "scored") if coef is not None and "speed" in target
                and coef[f"{_KIND[o]}_slope"] < 0.1 * coef["full_slope"]]
    if excluded:
        logger.warning("auto: the cost model's per-key cost of %s layers at batch %d is %s; the speed target is "
                       "solved without the %s rule", _KIND[excluded[0]], batch, coef[f"{_KIND[excluded[0]]}_slope"],
                       "/".join(excluded))
    for l in range(nl):
        add({yi(l, o): 1.0 for o in LAYER_OPTIONS}, 1, 1)  # one option per layer
        for o in excluded:
            add({yi(l, o): 1.0}, 0, 0)
        for o in ("window", "scored"):  # a compressed layer compresses at least one head (else it stays whole)
            sel = {xi(l, h, choices.index((o, 1.0))): 1.0 for h in range(Hkv)}
            sel[yi(l, o)] = 1.0
            add(sel, -np.inf, Hkv)
        for h in range(Hkv):
            add({xi(l, h, c): 1.0 for c in range(C)}, 1, 1)  # one choice per head
            for o in LAYER_OPTIONS:  # a head's choice follows its layer's option
                sel = {xi(l, h, c): 1.0 for c, (r, _) in enumerate(choices) if r == o}
                sel[yi(l, o)] = -1.0
                add(sel, -np.inf, 0)
    dense_ms = None
    if coef is not None:
        dense_ms = const_ms + sum(coef["full_slope"] * m * Hkv * T for _ in layers)
    if "speed" in target:
        limit = dense_ms / float(target["speed"]) - const_ms
        add({k: step[k] for k in range(N) if step[k] != 0}, -np.inf, limit)
    else:
        add({xi(l, h, c): eff[c] for l in range(nl) for h in range(Hkv) for c in range(C)}, -np.inf,
            kv_budget * nl * Hkv)
    with _native_stdout_silenced():
        res = milp(obj, constraints=[LinearConstraint(np.array(rows), lo, hi)], integrality=np.ones(N),
                   bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        if "speed" in target:
            fastest = min(eff)  # every head at the smallest share, the cheaper rule per layer
            best = const_ms + sum(min(coef[f"{_KIND[r]}_fixed"] + Hkv * coef[f"{_KIND[r]}_slope"] * m *
                                      (kept_tokens(shares[0], context, r, sink, window) + 1)
                                      for r in ("window", "scored") if r not in excluded)
                                  for _ in layers)
            raise AccelError(f"auto: no plan reaches a {target['speed']}x decode speed-up at context {context}, batch "
                             f"{batch} on this machine: the cost model predicts at most {dense_ms / best:.2f}x (every "
                             f"head at {fastest:.1%} of the prompt); ask for less, a longer context or a larger batch")
        raise AccelError(f"auto: kv_budget {kv_budget} is below what the profile's smallest share keeps "
                         f"({min(eff):.1%} of a {n_bytes}-token prompt per head); give a larger kv_budget")
    x = np.round(res.x).astype(int)
    out_layers = [LayerPlan(mode="full") for _ in range(L)]
    share_sum, heads_n = 0.0, 0
    for l, li in enumerate(layers):
        opt = next(o for o in LAYER_OPTIONS if x[yi(l, o)])
        picks = [next(c for c in range(C) if x[xi(l, h, c)]) for h in range(Hkv)]
        share_sum += sum(eff[c] for c in picks)
        heads_n += Hkv
        if opt == "dense":
            continue
        heads = []
        for h, c in enumerate(picks):
            r, s = choices[c]
            heads.append(HeadPlan(kind="full" if s >= 1 else r, beta=s, score=round(float(dmg[xi(l, h, c)]), 6)))
        out_layers[li] = LayerPlan(mode="compress", kv="auto", params={"rule": opt}, heads=heads)
    predicted = {"kv_share": round(float(share_sum / heads_n), 4), "damage": round(float(dmg @ x), 6),
                 "context": context if "speed" in target else n_bytes, "batch": batch}
    if excluded:
        predicted["rules_left_out"] = excluded
    if coef is not None:
        predicted["step_ms"] = round(float(const_ms + step @ x), 3)
        predicted["dense_step_ms"] = round(float(dense_ms), 3)
        predicted["speedup"] = round(float(dense_ms / (const_ms + step @ x)), 3)
    params = copy.deepcopy(profile_plan.params)
    params["target"] = dict(target)
    params["predicted"] = predicted
    prov = copy.deepcopy(profile_plan.provenance)
    prov["solver"] = "scipy.optimize.milp (HiGHS)"
    plan = Plan(policy="auto", num_layers=L, num_kv_heads=Hkv, model_type=profile_plan.model_type, params=params,
                layers=out_layers, provenance=prov)
    plan.validate()
    logger.info("auto plan for %s: %.1f%% of the prompt kept per head on average, predicted damage %.3f",
                target, 100 * predicted["kv_share"], predicted["damage"])
    return plan


def explain(plan: Plan) -> list[str]:
    """Lines saying which layer and head got what and why (the profile's damage of the choice against the
    alternatives), with the plan's target and predictions."""
    prof = profile_of(plan)
    shares, layers = prof["shares"], prof["layers"]
    p = plan.params.get("predicted", {})
    out = [f"target {plan.params.get('target')}: mean share kept {p.get('kv_share')}, predicted damage "
           f"{p.get('damage')} (attention mass lost, summed over heads)"]
    if "step_ms" in p:
        out.append(f"predicted decode step {p['step_ms']} ms vs dense {p['dense_step_ms']} ms ({p['speedup']}x) at "
                   f"context {p['context']}, batch {p['batch']}")
    for l, li in enumerate(layers):
        lp = plan.layers[li]
        if lp.mode != "compress":
            worst = max(prof["damage"]["scored"][l][h][0] for h in range(plan.num_kv_heads))
            out.append(f"layer {li:2d}: kept whole (every head; compressing its heads to {shares[0]:.0%} would lose "
                       f"up to {worst:.3f} of their attention)")
            continue
        rule = lp.params["rule"]
        other = "window" if rule == "scored" else "scored"
        parts = []
        for h, hp in enumerate(lp.heads):
            share = 1.0 if hp.kind == "full" else float(hp.beta)
            why = ""
            if share in shares:  # a hand-edited share off the profile's grid has no profiled alternative
                k = shares.index(share)
                why = (f" (loses {prof['damage'][rule][l][h][k]:.3f}; under {other} "
                       f"{prof['damage'][other][l][h][k]:.3f})")
            parts.append(f"h{h} {'full' if hp.kind == 'full' else f'{share:.1%}'}{why}")
        out.append(f"layer {li:2d}: {rule:6s} " + ", ".join(parts))
    return out
