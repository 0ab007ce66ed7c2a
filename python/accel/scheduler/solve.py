"""The scheduler's solver: from a calibration profile (``accel.calibration.auto``) to an ``auto`` plan under a target.

Every full-attention layer is kept whole or compressed under one eviction rule (``window`` / ``scored``), and every
KV head of a compressed layer keeps a share of the prompt from the profile's grid (1.0: the whole cache, a
retrieval head). The choice is a mixed-integer program (HiGHS through ``scipy.optimize.milp``):

    minimise    sum over heads of damage(l, h, rule_l, share_h)     (the profile's predicted lost attention)
    subject to  one rule per layer, one share per head (a head's rule is its layer's), and each target given:
                kv_budget:  mean kept share over full-attention KV heads <= kv_budget;
                speed:      predicted decode step <= dense step / speed at ``context`` and ``batch``, from this
                            machine's measured cost model (``accel.scheduler.cost``): per layer a fixed cost plus a
                            per-key slope for its kind (``full`` / ``kv_plain`` / ``kv_scored``), so the step is
                            linear in the choices;
                max_ppl_increase: summed damage <= the bound the profile's measured perplexity curve gives
                            (``damage_bound``); given alone, the objective is the fewest kept tokens instead.

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
import math
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


def check_for_model(plan: Plan, info) -> Plan:
    """``plan`` if it is an auto plan (or profile) for this model (its recorded fingerprint, where it has one), else one
    line saying what it is."""
    if plan.policy != "auto":
        raise AccelError(f"auto: this is a {plan.policy!r} plan; auto runs plans from `accel plan --policy auto` or "
                         "accel.calibrate(..., policy='auto')")
    theirs = (plan.provenance or {}).get("fingerprint")
    if theirs is not None and theirs != info.fingerprint:
        raise AccelError(f"auto: this plan was made for another model ({theirs}), not this one ({info.fingerprint}); "
                         "make one with `accel plan --model PATH --policy auto`")
    return plan


def plan_for_patch(policy, model, info, plan) -> Plan:
    """The plan ``accel.patch(model, "auto", ...)`` runs (``AutoPolicy.planner``): ``plan`` as written when it was
    solved already and no target is given with it; solved from its profile for the policy's target when a target is
    given or it is a calibration profile never solved; without ``plan``, solved from the profile accel ships for the
    model. A speed target reads this machine's cost model (``cost_model_for``, one line when there is none)."""
    from ..policies.auto import TARGET_KNOBS
    from ..plan.shipped import require_shipped_plan
    from .cost import cost_model_for

    from ..patching.tensor_parallel import tensor_parallel_size

    explicit = policy.explicit_knobs() & set(TARGET_KNOBS)
    if policy.speed is not None and tensor_parallel_size(model) != 1:
        raise AccelError("auto: a speed target is predicted by a one-process cost model; under tensor parallelism "
                         "give kv_budget instead")
    cost = cost_model_for(model, policy.cost) if policy.speed is not None else None
    if plan is None:
        profile = require_shipped_plan("auto", info, "a calibration profile (each head's damage under each rule and "
                                       "budget)")
        return solve_plan(profile, policy.target(), cost=cost, info=info)
    given = check_for_model(Plan.coerce(plan), info)
    sliding = [i for i, (lp, w) in enumerate(zip(given.layers, info.sliding_windows)) if w and lp.mode == "compress"]
    if sliding:
        raise AccelError(f"auto: plan layers {sliding} are sliding-window layers of this model (bounded already, "
                         "never compressed); keep them whole (mode 'full')")
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


def _slope_floor(cost: CostModel, batch: int, term: str) -> float:
    """The smallest value ``term`` has at the measured batch sizes ``batch`` is interpolated between (or at ``batch``)."""
    bs = cost.batches()
    near = [b for b in bs if b == batch] or [max(b for b in bs if b < batch), min(b for b in bs if b > batch)]
    return min(cost.per_batch[str(b)][term] for b in near)


def _up(x: float, nd: int = 4) -> float:
    """``x`` rounded up to ``nd`` decimals (advice that is met), a value already on that grid kept."""
    return math.ceil(round(x * 10 ** nd, 6)) / 10 ** nd


def _down(x: float, nd: int = 3) -> float:
    """``x`` rounded down to ``nd`` decimals, a value already on that grid kept."""
    return math.floor(round(x * 10 ** nd, 6)) / 10 ** nd


def _named(target: dict) -> str:
    parts = []
    for k, v in target.items():
        if k == "speed":
            parts.append(f"speed {v} at context {target['context']}, batch {target['batch']}")
        elif k not in ("context", "batch"):
            parts.append(f"{k} {v}")
    return "; ".join(parts)


def _whole_plan(profile_plan: Plan, target: dict, predicted: dict) -> Plan:
    params = copy.deepcopy(profile_plan.params)
    params["target"], params["predicted"] = dict(target), predicted
    prov = copy.deepcopy(profile_plan.provenance)
    return Plan(policy="auto", num_layers=profile_plan.num_layers, num_kv_heads=profile_plan.num_kv_heads,
                model_type=profile_plan.model_type, params=params,
                layers=[LayerPlan(mode="full") for _ in range(profile_plan.num_layers)], provenance=prov)


def ppl_points(prof: dict) -> tuple[np.ndarray, np.ndarray]:
    """The profile's measured perplexity curve as (damage, increase) points from (0, 0) in increasing damage, the
    increase made non-decreasing (a plan with more damage is never predicted better than one with less: a measured
    dip below dense is noise); one line when the profile has no curve."""
    c = prof.get("ppl")
    if not isinstance(c, dict) or not c.get("budgets"):
        raise AccelError("auto: this profile has no measured perplexity curve, so max_ppl_increase cannot be "
                         "predicted; make a profile with `accel plan --policy auto` (ppl_texts > 0)")
    d, p = c.get("damage"), c.get("ppl_increase")
    if not (isinstance(d, list) and isinstance(p, list) and len(d) == len(p) == len(c["budgets"])
            and all(isinstance(x, (int, float)) and math.isfinite(x) for x in d + p) and min(d) >= 0):
        raise AccelError("auto: profile.ppl must hold one finite damage >= 0 and perplexity increase per budget")
    order = sorted(range(len(d)), key=lambda i: (d[i], p[i]))
    dam = np.array([0.0] + [float(d[i]) for i in order])
    inc = np.maximum.accumulate(np.array([0.0] + [float(p[i]) for i in order]))
    return dam, inc


def predicted_ppl_increase(prof: dict, damage: float) -> float | None:
    """The perplexity increase the profile's measured curve predicts at ``damage`` (linear between measured plans),
    None beyond the most damaged plan measured or without a curve."""
    if not isinstance(prof.get("ppl"), dict):
        return None
    dam, inc = ppl_points(prof)
    if damage > dam[-1] * (1 + 1e-9) + 1e-12:
        return None
    return float(np.interp(damage, dam, inc))


def damage_bound(prof: dict, max_increase: float) -> float:
    """The most damage a plan may have for ``max_increase``: that of the most damaged measured plan whose perplexity
    (and every less damaged one's) rose by at most ``max_increase`` on the calibration text, 0 when none did
    (conservative: no extrapolation beyond a measured plan). ``max_increase`` 0 allows no damage (every head whole).
    The bound holds on the calibration text; held-out text can differ (docs/results.md measures it)."""
    dam, inc = ppl_points(prof)
    if max_increase <= 0:
        return 0.0  # no increase at all: only the whole cache, whatever a noisy measurement below dense suggests
    ok = inc <= max_increase + 1e-12
    return float(dam[np.flatnonzero(ok).max()]) if ok.any() else 0.0


def _solve(profile_plan: Plan, prof: dict, target: dict, cost: CostModel | None, info) -> Plan:
    from scipy.optimize import Bounds, LinearConstraint, milp

    from ..policies.auto import kept_tokens

    shares, layers = [float(s) for s in prof["shares"]], list(prof["layers"])
    Hkv, L = int(profile_plan.num_kv_heads), int(profile_plan.num_layers)
    sink = int(profile_plan.params.get("sink", 16))
    window = int(profile_plan.params.get("window", 32))
    if info is not None:
        full_layers = [i for i, w in enumerate(info.sliding_windows) if w is None]
        if layers != full_layers:
            raise AccelError(f"auto: the profile covers layers {layers} but the model's full-attention layers are "
                             f"{full_layers}; make a profile for this model with `accel plan --policy auto`")
    kv_budget = float(target["kv_budget"]) if "kv_budget" in target else None
    max_ppl = float(target["max_ppl_increase"]) if "max_ppl_increase" in target else None
    if "speed" in target:
        if cost is None:
            raise AccelError("auto: a speed target needs this machine's cost model; run `accel calibrate-cost` (or "
                             "give kv_budget instead)")
        context, batch = int(target["context"]), int(target["batch"])
    else:
        context, batch = int(target.get("context", prof["context"])), int(target.get("batch", 1))
    bound = damage_bound(prof, float(max_ppl)) if max_ppl is not None else None
    #: least damage under the bytes / speed targets; with only a perplexity bound, the fewest kept tokens under it
    least_damage = kv_budget is not None or "speed" in target
    coef = _fit_cost(cost, profile_plan, info, batch) if cost is not None else None
    windows = list(info.sliding_windows) if info is not None else [None] * L
    n_bytes = int(prof["context"]) if "speed" not in target else context
    T = context + 1
    m = batch / 1e6  # ms coefficients are per million row x head x token keys
    const_ms = dense_ms = None
    if coef is not None:
        const_ms = coef["base_ms"] + sum(coef["full_slope"] * m * Hkv * (min(T, w) if w else T)
                                         for i, w in enumerate(windows) if i not in layers)
        dense_ms = const_ms + sum(coef["full_slope"] * m * Hkv * T for _ in layers)
    whole = {"kv_share": 1.0, "damage": 0.0, "context": n_bytes, "batch": batch}
    if max_ppl is not None:
        whole["ppl_increase"] = 0.0
    if coef is not None:
        whole.update(step_ms=round(dense_ms, 3), dense_step_ms=round(dense_ms, 3), speedup=1.0)
    needs_compression = (kv_budget is not None and kv_budget < 1) or target.get("speed", 1) > 1
    if not needs_compression and (least_damage or bound == 0):
        return _whole_plan(profile_plan, target, whole)  # the targets allow every token: exactly dense
    if bound == 0:
        least = float(ppl_points(prof)[1][1])
        raise AccelError(f"auto: max_ppl_increase {max_ppl} is below what every measured compressed plan costs on "
                         f"the calibration text (the least: +{least:.2%}), so it keeps every head whole, which "
                         f"meets no kv_budget or speed below dense; give max_ppl_increase {_up(least)} or more, or "
                         "drop the other target")

    # variables: per layer its option y (3), per layer x head x (option, share) its choice x
    choices = [("dense", 1.0)] + [(r, s) for r in ("window", "scored") for s in shares]
    C, nl = len(choices), len(layers)
    ny = nl * 3
    N = ny + nl * Hkv * C

    def yi(l, o):
        return l * 3 + LAYER_OPTIONS.index(o)

    def xi(l, h, c):
        return ny + (l * Hkv + h) * C + c

    eff = np.array([kept_tokens(s, n_bytes, "window" if r == "dense" else r, sink, window) / n_bytes
                    for r, s in choices])
    dmg, size, step, compressed = np.zeros(N), np.zeros(N), np.zeros(N), np.zeros(N)
    for l in range(nl):
        for o in ("window", "scored"):
            compressed[yi(l, o)] = 1.0
            if coef is not None:
                step[yi(l, o)] = coef[f"{_KIND[o]}_fixed"]
        for h in range(Hkv):
            for c, (r, s) in enumerate(choices):
                dmg[xi(l, h, c)] = 0.0 if r == "dense" else float(prof["damage"][r][l][h][shares.index(s)])
                size[xi(l, h, c)] = eff[c]
                if coef is not None:
                    held = T if r == "dense" else kept_tokens(s, context, r, sink, window) + 1
                    step[xi(l, h, c)] = coef[f"{_KIND[r]}_slope"] * m * held
    rows, lo, hi = [], [], []

    def add(vec, a: float, b: float):
        rows.append(vec)
        lo.append(a)
        hi.append(b)

    def row(coeffs: dict):
        v = np.zeros(N)
        for k, x in coeffs.items():
            v[k] = x
        return v

    # a rule whose per-key decode cost the cost model did not determine (fitted to about zero: under a tenth of dense
    # attention's, which reads keys with the same kernels, at a measured batch size this one is interpolated from)
    # would look free: a speed target leaves it out rather than trust that
    excluded = [o for o in ("window", "scored") if coef is not None and "speed" in target
                and _slope_floor(cost, batch, f"{_KIND[o]}_slope") < 0.1 * coef["full_slope"]]
    if len(excluded) == 2:
        raise AccelError(f"auto: the cost model's per-key costs of KV-compressed layers near batch {batch} are "
                         "undetermined (fitted to about zero); re-run `accel calibrate-cost` before a speed target")
    if excluded:
        logger.warning("auto: the cost model's per-key cost of %s layers near batch %d is undetermined (about zero); "
                       "the speed target is solved without the %s rule", _KIND[excluded[0]], batch, excluded[0])
    for l in range(nl):
        add(row({yi(l, o): 1.0 for o in LAYER_OPTIONS}), 1, 1)  # one option per layer
        for o in excluded:
            add(row({yi(l, o): 1.0}), 0, 0)
        for o in ("window", "scored"):  # a compressed layer compresses at least one head (else it stays whole)
            sel = {xi(l, h, choices.index((o, 1.0))): 1.0 for h in range(Hkv)}
            sel[yi(l, o)] = 1.0
            add(row(sel), -np.inf, Hkv)
        for h in range(Hkv):
            add(row({xi(l, h, c): 1.0 for c in range(C)}), 1, 1)  # one choice per head
            for o in LAYER_OPTIONS:  # a head's choice follows its layer's option
                sel = {xi(l, h, c): 1.0 for c, (r, _) in enumerate(choices) if r == o}
                sel[yi(l, o)] = -1.0
                add(row(sel), -np.inf, 0)
    n_struct = len(rows)  # the rows every plan obeys; the targets' rows follow
    speed_row = (step, -np.inf, dense_ms / float(target["speed"]) - const_ms) if "speed" in target else None
    budget_row = (size, -np.inf, kv_budget * nl * Hkv) if kv_budget is not None else None
    bound_row = (dmg, -np.inf, bound * (1 + 1e-7) + 1e-9) if bound is not None else None
    for r in (speed_row, budget_row):
        if r is not None:
            add(*r)

    def run(objective, only=None):
        """Solve with every row so far, or (``only``: target rows) with the structural rows and those alone."""
        keep = (rows, lo, hi) if only is None else (
            rows[:n_struct] + [r[0] for r in only], lo[:n_struct] + [r[1] for r in only],
            hi[:n_struct] + [r[2] for r in only])
        with _native_stdout_silenced():
            return milp(objective, constraints=[LinearConstraint(np.array(keep[0]), keep[1], keep[2])],
                        integrality=np.ones(N), bounds=Bounds(0, 1))

    def solved(r):
        return r.status == 0 and r.x is not None

    def least_budget(others) -> str:
        """The smallest kv_budget the other targets (``others``: their rows) allow, as advice."""
        r = run(size, [o for o in others if o is not None])
        if not solved(r):
            return "no kv_budget meets the other targets"
        need = float(size @ r.x) / (nl * Hkv)
        return f"kv_budget {_up(need)} or more"

    def most_speed(others) -> str:
        """The largest speed-up the cost model predicts under the other targets (``others``: their rows)."""
        r = run(step, [o for o in others if o is not None])
        if not solved(r):
            return "no speed-up meets the other targets"
        most = dense_ms / (const_ms + float(step @ r.x))
        if _down(most, 3) < 1:  # a speed target is a speed-up >= 1: none is left to give
            return f"no speed-up meets the other targets (at most {most:.3f}x at context {context}); drop speed"
        return f"speed {_down(most, 3)} or less"

    if least_damage:
        res = run(dmg)  # least damage first
        if solved(res) and bound is not None and float(dmg @ res.x) > bound * (1 + 1e-7) + 1e-9:
            at = predicted_ppl_increase(prof, float(dmg @ res.x))
            dam, inc = ppl_points(prof)
            # the bound admits a damage up to a measured plan's: the first measured plan at least this damaged
            over = np.flatnonzero(dam >= float(dmg @ res.x) * (1 - 1e-9) - 1e-12)
            advice = ([least_budget([speed_row, bound_row])] if kv_budget is not None else []) + (
                [most_speed([budget_row, bound_row])] if "speed" in target else []) + (
                [f"max_ppl_increase {_up(float(inc[over[0]]))} or more"] if len(over) else
                ["no max_ppl_increase: the curve measured no plan this damaged"])
            raise AccelError(f"auto: no plan meets {_named(target)}: the least damage that target allows is "
                             f"{float(dmg @ res.x):.3f}, above the {bound:.3f} of the most damaged measured plan "
                             f"within +{max_ppl:.2%} (the curve predicts "
                             f"{'more than the most damaged plan measured' if at is None else f'+{at:.2%}'}); "
                             f"relax one: {'; '.join(advice)}")
        if solved(res):
            # then, among plans of (numerically) that damage, the fewest kept tokens, and layers kept whole
            add(dmg, -np.inf, float(dmg @ res.x) * (1 + 1e-7) + 1e-9)
            res2 = run(size + 1e-6 * compressed)
            res = res2 if solved(res2) else res
    else:
        add(*bound_row)  # the perplexity bound, as the damage it allows
        res = run(size)  # the fewest kept tokens first
        if solved(res):
            add(size, -np.inf, float(size @ res.x) * (1 + 1e-9) + 1e-9)
            res2 = run(dmg + 1e-6 * compressed)  # then the least damage at that size (and layers kept whole)
            res = res2 if solved(res2) else res
    if not solved(res):
        if res.status != 2:  # not "infeasible": the solver itself failed (a limit, numerics)
            raise AccelError(f"auto: the MILP solver stopped without a plan ({res.message}); try another target")
        if "speed" in target and kv_budget is not None:
            raise AccelError(f"auto: no plan meets both kv_budget {kv_budget} and a {target['speed']}x speed-up at "
                             f"context {context}, batch {batch}; relax one: {least_budget([speed_row, bound_row])}; "
                             f"{most_speed([budget_row, bound_row])}")
        if "speed" in target:
            allowed = [r for r in ("window", "scored") if r not in excluded]
            best = const_ms + sum(min([coef["full_slope"] * m * Hkv * T]
                                      + [coef[f"{_KIND[r]}_fixed"] + Hkv * coef[f"{_KIND[r]}_slope"] * m
                                         * (kept_tokens(shares[0], context, r, sink, window) + 1) for r in allowed])
                                  for _ in layers)
            raise AccelError(f"auto: no plan reaches a {target['speed']}x decode speed-up at context {context}, batch "
                             f"{batch} on this machine: the cost model predicts at most {dense_ms / best:.2f}x (every "
                             f"head at {shares[0]:.0%} of the prompt); ask for less, a longer context or a larger "
                             "batch")
        raise AccelError(f"auto: kv_budget {kv_budget} is below what the profile's smallest share keeps "
                         f"({min(eff):.1%} of a {n_bytes}-token prompt per head); give kv_budget "
                         f"{_up(min(eff))} or more (the least the profile allows"
                         + (", with the other targets still to meet)" if len(target) > 1 else ")"))
    x = np.round(res.x).astype(int)
    out_layers = [LayerPlan(mode="full") for _ in range(L)]
    for l, li in enumerate(layers):
        opt = next(o for o in LAYER_OPTIONS if x[yi(l, o)])
        if opt == "dense":
            continue
        heads = []
        for h in range(Hkv):
            c = next(c for c in range(C) if x[xi(l, h, c)])
            r, s = choices[c]
            heads.append(HeadPlan(kind="full" if s >= 1 else r, beta=s, score=round(float(dmg[xi(l, h, c)]), 6)))
        out_layers[li] = LayerPlan(mode="compress", kv="auto", params={"rule": opt}, heads=heads)
    predicted = {"kv_share": round(float(size @ x) / (nl * Hkv), 4), "damage": round(float(dmg @ x), 6),
                 "context": n_bytes, "batch": batch}
    if isinstance(prof.get("ppl"), dict):
        at = predicted_ppl_increase(prof, float(dmg @ x))
        if at is not None:  # beyond the most damaged plan measured: no prediction rather than an extrapolation
            predicted["ppl_increase"] = round(at, 5)
    if excluded:
        predicted["rules_left_out"] = excluded
    if coef is not None:
        predicted["step_ms"] = round(float(const_ms + step @ x), 3)
        predicted["dense_step_ms"] = round(float(dense_ms), 3)
        predicted["speedup"] = round(float(dense_ms / (const_ms + step @ x)), 3)
    plan = _whole_plan(profile_plan, target, predicted)
    plan.layers = out_layers
    plan.provenance["solver"] = ("scipy.optimize.milp (HiGHS): " + ("least damage, then fewest kept tokens"
                                                                       if least_damage else
                                                                       "fewest kept tokens, then least damage"))
    plan.validate()
    logger.info("auto plan for %s: %.1f%% of the prompt kept per head on average, predicted damage %.3f",
                target, 100 * predicted["kv_share"], predicted["damage"])
    return plan


def explain(plan: Plan) -> list[str]:
    """Lines saying which layer and head got what and why (the profile's damage of the choice against the
    alternatives), with the plan's target and predictions."""
    from ..policies.auto import head_share

    prof = profile_of(plan)
    shares, layers = prof["shares"], prof["layers"]
    p = plan.params.get("predicted", {})
    what = {"output": "relative change of each head's output"}.get(prof.get("metric"), "attention mass lost")
    out = [f"target {plan.params.get('target')}: mean share kept {p.get('kv_share')}, predicted damage "
           f"{p.get('damage')} ({what}, summed over heads)"
           + (f", perplexity {p['ppl_increase']:+.2%} over dense (the profile's measured curve)"
              if "ppl_increase" in p else "")]
    if "step_ms" in p:
        out.append(f"predicted decode step {p['step_ms']} ms vs dense {p['dense_step_ms']} ms ({p['speedup']}x) at "
                   f"context {p['context']}, batch {p['batch']}")
    for l, li in enumerate(layers):
        lp = plan.layers[li]
        if lp.mode != "compress":
            worst = max(prof["damage"]["scored"][l][h][0] for h in range(plan.num_kv_heads))
            out.append(f"layer {li:2d}: kept whole (every head; compressing its heads to {shares[0]:.0%} would cost "
                       f"up to {worst:.3f} damage)")
            continue
        rule = lp.params["rule"]
        other = "window" if rule == "scored" else "scored"
        parts = []
        for h, hp in enumerate(lp.heads):
            share = head_share(hp.kind, hp.beta)
            why = ""
            if share in shares:  # a hand-edited share off the profile's grid has no profiled alternative
                k = shares.index(share)
                why = (f" (loses {prof['damage'][rule][l][h][k]:.3f}; under {other} "
                       f"{prof['damage'][other][l][h][k]:.3f})")
            parts.append(f"h{h} {'full' if hp.kind == 'full' else f'{share:.1%}'}{why}")
        out.append(f"layer {li:2d}: {rule:6s} " + ", ".join(parts))
    return out
