"""policy="auto": the executor (per-layer rule, per-head budgets), the quality profile, the MILP solver, the patch
entry point and the plan command."""
import itertools
import math

import pytest
import torch

import accel
from accel.calibration.auto import PPL_BUDGETS, SHARES, keep_orders, lost_mass, output_error, ppl_curve
from accel.errors import AccelError
from accel.plan import HeadPlan, LayerPlan, Plan
from accel.policies.auto import AutoPolicy, kept_tokens
from accel.policies.budgeted import PrefillView, keep_top
from accel.scheduler.solve import damage_bound, explain, predicted_ppl_increase, solve_plan

from .conftest import gen, model4, same


def prompt(n=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (1, n), generator=g)


def auto_plan(layers, Hkv=2, L=4, **params):
    """``layers``: {layer: (rule, [share per head])}; a share of 1.0 is a full head; other layers kept whole."""
    out = []
    for i in range(L):
        if i not in layers:
            out.append(LayerPlan(mode="full"))
            continue
        rule, shares = layers[i]
        out.append(LayerPlan(mode="compress", kv="auto", params={"rule": rule},
                             heads=[HeadPlan(kind="full" if s >= 1 else rule, beta=s) for s in shares]))
    return Plan(policy="auto", num_layers=L, num_kv_heads=Hkv, layers=out,
                params={"sink": 4, "window": 8, "kernel": 7, **params})


# -- the executor --------------------------------------------------------------------------------------------------
def test_every_head_full_or_every_layer_whole_is_exactly_dense():
    m = model4("llama")
    ids = prompt()
    ref = gen(m, ids, "dense")
    full = auto_plan({i: ("scored", [1.0, 1.0]) for i in range(4)})
    assert same(ref, gen(m, ids, "auto", plan=full, sink=4, window=8))
    assert same(ref, gen(m, ids, "auto", plan=auto_plan({}), sink=4, window=8))


def test_a_uniform_window_plan_is_streamingllm_and_a_uniform_scored_plan_is_snapkv():
    m = model4("llama")
    ids = prompt()
    win = auto_plan({i: ("window", [0.25, 0.25]) for i in range(4)})
    assert same(gen(m, ids, "streaming", sink=4, budget_ratio=0.25),
                gen(m, ids, "auto", plan=win, sink=4, window=8))
    sc = auto_plan({i: ("scored", [0.25, 0.25]) for i in range(4)})
    assert same(gen(m, ids, "snapkv", window=8, budget_ratio=0.25),
                gen(m, ids, "auto", plan=sc, sink=4, window=8))


def test_each_head_holds_its_own_budget_and_full_heads_keep_every_token():
    m = model4("llama")
    ids = prompt()
    plan = auto_plan({0: ("window", [1.0, 0.1]), 2: ("scored", [0.3, 0.5])})
    out = gen(m, ids, "auto", plan=plan, sink=4, window=8, new=6)
    layers = out.past_key_values.layers
    # 100 prompt tokens + 5 cached decode tokens; compressed heads stay at ceil(share * 100) during decode
    assert [int(x) for x in layers[0].ragged.lengths[0]] == [105, 10]
    assert [int(x) for x in layers[2].ragged.lengths[0]] == [30, 50]
    assert layers[1].ragged is None and layers[3].ragged is None  # kept whole


def test_the_profile_keep_order_is_what_the_runtime_keeps():
    g = torch.Generator().manual_seed(3)
    H, Hkv, c, D = 4, 2, 90, 16
    q = torch.randn(H, 8, D, generator=g)
    k = torch.randn(Hkv, c, D, generator=g)
    pol = AutoPolicy(sink=4, window=8, kernel=5)
    for rule in ("window", "scored"):
        pol._rule = rule
        order = keep_orders(q, k, 0.25, rule, 4, 8, 5)
        for b in (9, 20, 47):
            s = pol.token_scores(PrefillView(query=q.unsqueeze(0)), k.unsqueeze(0), None,
                                 torch.full((1, Hkv), b), 0.25)
            keep, counts = keep_top(s, torch.full((1, Hkv), b))
            for h in range(Hkv):
                assert set(keep[0, h, :b].tolist()) == set(order[h, :b].tolist()), (rule, b, h)


def test_lost_mass_matches_masked_attention_and_falls_with_the_budget():
    g = torch.Generator().manual_seed(4)
    H, Hkv, c, S, D = 4, 2, 60, 5, 8
    q = torch.randn(H, S, D, generator=g)
    k = torch.randn(Hkv, c + S, D, generator=g)
    order = torch.stack([torch.randperm(c, generator=g) for _ in range(Hkv)])
    budgets = [3, 5, 20, 40, 60]
    for evict in (True, False):
        got = lost_mass(q, k, 0.3, c, order, budgets, "max", evict=evict, protected=4)
        for h in range(Hkv):
            for j, b in enumerate(budgets):
                worst = 0.0
                for s in range(S):
                    # decode step s: s generated tokens took the places of the last-kept prompt tokens, never the
                    # first 4 (protected); a budget covering the prompt keeps it all
                    held = b if (b >= c or not evict) else max(b - s, min(4, b))
                    dropped = torch.ones(c, dtype=torch.bool)
                    dropped[order[h, :held]] = False
                    for qh in range(2 * h, 2 * h + 2):
                        logits = (k[h, :c + s + 1] @ q[qh, s]) * 0.3
                        p = torch.softmax(logits.double(), -1)
                        worst = max(worst, float(p[:c][dropped].sum()))
                assert abs(float(got[h, j]) - worst) < 1e-5, (evict, h, b)
        assert (got[:, :-1] >= got[:, 1:] - 1e-7).all() and float(got[:, -1].abs().max()) < 1e-6


def test_output_error_matches_the_masked_attention_output():
    g = torch.Generator().manual_seed(5)
    H, Hkv, c, S, D = 4, 2, 50, 4, 8
    q = torch.randn(H, S, D, generator=g)
    k = torch.randn(Hkv, c + S, D, generator=g)
    v = torch.randn(Hkv, c + S, D, generator=g)
    order = torch.stack([torch.randperm(c, generator=g) for _ in range(Hkv)])
    budgets = [2, 6, 25, 50]
    for evict, reduce in ((True, "max"), (False, "mean")):
        got = output_error(q, k, v, 0.3, c, order, budgets, reduce, evict=evict, protected=3)
        for h in range(Hkv):
            for j, b in enumerate(budgets):
                per_step = []
                for s in range(S):
                    held = b if (b >= c or not evict) else max(b - s, min(3, b))
                    keep = torch.zeros(c + s + 1, dtype=torch.bool)
                    keep[order[h, :held]] = True
                    keep[c:] = True  # the tokens after the prompt stay
                    worst = 0.0
                    for qh in range(2 * h, 2 * h + 2):
                        logits = (k[h, :c + s + 1] @ q[qh, s]).double() * 0.3
                        full = torch.softmax(logits, -1) @ v[h, :c + s + 1].double()
                        part = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v[h, :c + s + 1].double()
                        worst = max(worst, float((part - full).norm() / full.norm()))
                    per_step.append(worst)
                want = max(per_step) if reduce == "max" else sum(per_step) / S
                assert abs(float(got[h, j]) - want) < 1e-4, (evict, h, b)
        assert float(got[:, -1].abs().max()) == 0.0  # the whole prompt kept: exact


def test_the_profile_of_a_real_calibration_has_zero_damage_for_the_whole_cache():
    m = model4("llama")
    texts = [(prompt(160, seed=s), 120) for s in range(2)]
    passages = [prompt(160, seed=7)]
    plan = accel.calibrate(m, None, texts, policy="auto", tokens=160, steps=8, sink=4, window=8, progress=False,
                           ppl_texts=passages)
    prof = plan.params["profile"]
    assert prof["layers"] == [0, 1, 2, 3] and prof["shares"] == list(SHARES)
    for rule in ("window", "scored"):
        for layer in prof["damage"][rule]:
            for row in layer:
                assert row[-1] == 0.0 and all(0 <= x <= 1 for x in row)
                assert all(a >= b - 1e-6 for a, b in zip(row, row[1:]))  # nested kept sets lose less
    assert "target" not in plan.params and all(lp.mode == "full" for lp in plan.layers)  # a profile, not solved yet
    solved = solve_plan(plan, {"kv_budget": 0.25})
    assert solved.params["predicted"]["kv_share"] <= 0.25 + 1e-9
    # the perplexity curve: the solver's plan at each budget the profile can reach, its damage and measured ppl
    curve = prof["ppl"]
    assert curve["budgets"] == [b for b in PPL_BUDGETS if b >= curve["budgets"][0]] and curve["passages"] == 1
    assert curve["damage"] == [solve_plan(plan, {"kv_budget": b}).params["predicted"]["damage"]
                               for b in curve["budgets"]]
    assert all(a >= b for a, b in zip(curve["damage"], curve["damage"][1:]))  # a larger budget, less damage
    assert any(x != 0 for x in curve["ppl_increase"]) and curve["dense_ppl"] > 1
    # a plan keeping everything measures exactly dense's perplexity; a budget the profile cannot reach is left out
    assert ppl_curve(m, plan, passages, 8, budgets=(1.0,))["ppl_increase"] == [0.0]
    assert ppl_curve(m, plan, passages, 8, budgets=(0.001, 0.5))["budgets"] == [0.5]
    with pytest.raises(AccelError, match="need the tokenizer"):
        accel.calibrate(m, None, texts, policy="auto", tokens=160, steps=8, sink=4, window=8, progress=False)
    # the output-error metric: exact for the whole cache
    out = accel.calibrate(m, None, texts, policy="auto", tokens=160, steps=8, sink=4, window=8, progress=False,
                          ppl_texts=0, metric="output")
    assert out.params["profile"]["metric"] == "output" and "ppl" not in out.params["profile"]
    for rule in ("window", "scored"):
        for layer in out.params["profile"]["damage"][rule]:
            for row in layer:
                assert row[-1] == 0.0 and min(row) >= 0
    with pytest.raises(AccelError, match="metric must be one of lost_mass, output"):
        accel.calibrate(m, None, texts, policy="auto", tokens=160, steps=8, progress=False, ppl_texts=0, metric="kl")


# -- the solver ----------------------------------------------------------------------------------------------------
def profile_plan(damage, shares, L=2, Hkv=2, context=1000):
    layers = [LayerPlan(mode="full") for _ in range(L)]
    return Plan(policy="auto", num_layers=L, num_kv_heads=Hkv, layers=layers,
                params={"sink": 4, "window": 8, "kernel": 7,
                        "profile": {"shares": shares, "rules": ["window", "scored"], "layers": list(range(L)),
                                    "damage": damage, "context": context}})


def random_profile(seed, L=2, Hkv=2, shares=(0.1, 0.3, 1.0)):
    g = torch.Generator().manual_seed(seed)
    dmg = {}
    for r in ("window", "scored"):
        x = torch.rand(L, Hkv, len(shares), generator=g).sort(-1, descending=True).values
        x[..., -1] = 0
        dmg[r] = [[[round(float(v), 4) for v in row] for row in layer] for layer in x]
    return profile_plan(dmg, list(shares), L, Hkv)


def brute_force(plan, budget):
    """The least damage of any assignment (one rule per compressed layer) within ``budget``, by enumeration."""
    return min((d for d, b in assignments(plan) if b <= budget * plan.num_layers * plan.num_kv_heads + 1e-9),
               default=math.inf)


def assignments(plan):
    """(damage, kept shares summed over heads) of every assignment (one rule per compressed layer)."""
    prof = plan.params["profile"]
    shares, L, Hkv = prof["shares"], plan.num_layers, plan.num_kv_heads
    out = []
    for rules in itertools.product(("dense", "window", "scored"), repeat=L):
        per_layer = []
        for l, r in enumerate(rules):
            if r == "dense":
                per_layer.append([(0.0, 1.0 * Hkv)])
                continue
            opts = []
            for combo in itertools.product(range(len(shares)), repeat=Hkv):
                if all(shares[c] >= 1 for c in combo):
                    continue  # a compressed layer compresses at least one head
                d = sum(prof["damage"][r][l][h][c] for h, c in enumerate(combo))
                b = sum(kept_tokens(shares[c], 1000, r, 4, 8) / 1000 for c in combo)
                opts.append((d, b))
            per_layer.append(opts)
        for pick in itertools.product(*per_layer):
            out.append((sum(d for d, _ in pick), sum(b for _, b in pick)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [0.2, 0.45, 0.7])
def test_the_solver_finds_the_least_damage_within_the_budget(seed, budget):
    prof = random_profile(seed)
    plan = solve_plan(prof, {"kv_budget": budget})
    assert plan.params["predicted"]["kv_share"] <= budget + 1e-9
    assert abs(plan.params["predicted"]["damage"] - brute_force(prof, budget)) < 1e-5
    got = 0.0
    for l, lp in enumerate(plan.layers):  # the plan's heads carry the damage the objective counted
        assert lp.mode != "compress" or any(hp.kind != "full" for hp in lp.heads)
        for h, hp in enumerate(lp.heads or []):
            got += hp.score
            rule = lp.params["rule"]
            assert hp.kind in ("full", rule) and hp.beta in prof.params["profile"]["shares"]
    assert abs(got - plan.params["predicted"]["damage"]) < 1e-5


def test_a_budget_covering_everything_keeps_every_layer_whole_and_too_small_a_budget_is_refused():
    prof = random_profile(0)
    plan = solve_plan(prof, {"kv_budget": 1.0})
    assert all(lp.mode == "full" for lp in plan.layers) and plan.params["predicted"]["damage"] == 0
    with pytest.raises(AccelError, match="below what the profile's smallest share keeps"):
        solve_plan(prof, {"kv_budget": 0.05})
    with pytest.raises(AccelError, match="no calibration profile"):
        solve_plan(Plan(policy="auto", num_layers=2, num_kv_heads=2, layers=[LayerPlan(), LayerPlan()]),
                   {"kv_budget": 0.5})


def with_curve(plan, damage, increase, budgets=None):
    plan.params["profile"]["ppl"] = {"budgets": budgets or [0.1 * (i + 1) for i in range(len(damage))],
                                     "damage": damage, "ppl_increase": increase, "dense_ppl": 10.0,
                                     "passages": 1, "steps": 8}
    return plan


def test_the_perplexity_curve_is_read_conservatively():
    prof = with_curve(random_profile(0), [0.9, 0.5, 0.2, 0.1], [0.08, 0.01, 0.02, -0.01])
    p = prof.params["profile"]
    # points from (0, 0) by damage, increases made non-decreasing: 0.1 -> 0, 0.2 -> 0.02, 0.5 -> 0.02, 0.9 -> 0.08
    assert damage_bound(p, 0.0) == 0.0  # no increase at all: the whole cache, whatever a dip below dense suggests
    assert damage_bound(p, 1e-4) == 0.1 and damage_bound(p, 0.019) == 0.1
    assert damage_bound(p, 0.02) == 0.5 and damage_bound(p, 0.05) == 0.5 and damage_bound(p, 1.0) == 0.9
    assert predicted_ppl_increase(p, 0.15) == pytest.approx(0.01)
    assert predicted_ppl_increase(p, 0.7) == pytest.approx(0.05)
    assert predicted_ppl_increase(p, 0.95) is None  # beyond the most damaged plan measured
    del p["ppl"]
    with pytest.raises(AccelError, match="no measured perplexity curve"):
        solve_plan(prof, {"max_ppl_increase": 0.02})


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_ppl", [0.005, 0.03, 0.2])
def test_a_perplexity_target_alone_keeps_the_fewest_tokens_within_its_damage_bound(seed, max_ppl):
    prof = random_profile(seed)
    ds = [d for d, _ in assignments(prof)]
    top = max(ds)
    curve_d = [top, top * 0.6, top * 0.3, top * 0.1]
    with_curve(prof, curve_d, [0.1, 0.04, 0.01, 0.004])
    bound = damage_bound(prof.params["profile"], max_ppl)
    plan = solve_plan(prof, {"max_ppl_increase": max_ppl})
    pr = plan.params["predicted"]
    fewest = min(b for d, b in assignments(prof) if d <= bound + 1e-9) / (prof.num_layers * prof.num_kv_heads)
    assert pr["damage"] <= bound + 1e-6 and pr["kv_share"] == pytest.approx(fewest, abs=1e-4)
    # at that size, the least damage
    least = min(d for d, b in assignments(prof) if d <= bound + 1e-9
                and b / (prof.num_layers * prof.num_kv_heads) <= fewest + 1e-4)
    assert pr["damage"] == pytest.approx(least, abs=1e-5)
    assert pr["ppl_increase"] == pytest.approx(predicted_ppl_increase(prof.params["profile"], pr["damage"]), abs=1e-5)
    assert pr["ppl_increase"] <= max_ppl + 1e-9


def test_targets_combine_as_constraints_and_a_bound_no_plan_meets_is_refused():
    prof = random_profile(1)
    top = max(d for d, _ in assignments(prof))
    with_curve(prof, [top, top * 0.5, top * 0.1], [0.3, 0.05, 0.01])
    alone = solve_plan(prof, {"kv_budget": 0.45})
    both = solve_plan(prof, {"kv_budget": 0.45, "max_ppl_increase": 0.3})  # the bound does not bind
    assert both.layers == alone.layers and both.params["target"] == {"kv_budget": 0.45, "max_ppl_increase": 0.3}
    with pytest.raises(AccelError, match="no plan meets kv_budget 0.2; max_ppl_increase 0.01"):
        solve_plan(prof, {"kv_budget": 0.2, "max_ppl_increase": 0.01})
    # no increase at all: every layer whole, which no bytes target below dense allows
    whole = solve_plan(prof, {"max_ppl_increase": 0.0})
    assert all(lp.mode == "full" for lp in whole.layers)
    with pytest.raises(AccelError, match="keeps every head whole"):
        solve_plan(prof, {"kv_budget": 0.5, "max_ppl_increase": 0.0})
    # a measured dip below dense does not let max_ppl_increase=0 compress anything
    dip = with_curve(random_profile(2), [top, top * 0.5, top * 0.1], [0.3, 0.05, -0.01])
    assert all(lp.mode == "full" for lp in solve_plan(dip, {"max_ppl_increase": 0.0}).layers)
    # speed and a perplexity bound together: the speed plan, refused when its least damage is above the bound
    cost0 = fake_cost()
    fast = solve_plan(prof, {"speed": 1.3, "context": 1000, "batch": 1}, cost=cost0)
    bound_ok = predicted_ppl_increase(prof.params["profile"], fast.params["predicted"]["damage"])
    if bound_ok is not None:
        same = solve_plan(prof, {"speed": 1.3, "context": 1000, "batch": 1, "max_ppl_increase": 0.3}, cost=cost0)
        assert same.layers == fast.layers
    with pytest.raises(AccelError, match="max_ppl_increase 0.001 is below what every measured compressed plan"):
        solve_plan(prof, {"speed": 1.3, "context": 1000, "batch": 1, "max_ppl_increase": 0.001}, cost=cost0)
    with pytest.raises(AccelError, match="no plan meets speed 1.3 at context 1000, batch 1; max_ppl_increase 0.02"):
        solve_plan(with_curve(random_profile(1), [top, top * 0.5, top * 1e-3], [0.3, 0.05, 0.01]),
                   {"speed": 1.3, "context": 1000, "batch": 1, "max_ppl_increase": 0.02}, cost=cost0)
    # bytes and speed together: both met, least damage among the plans meeting both
    cost = fake_cost()
    sp = solve_plan(prof, {"kv_budget": 0.6, "speed": 1.3, "context": 1000, "batch": 1}, cost=cost)
    assert sp.params["predicted"]["kv_share"] <= 0.6 + 1e-9 and sp.params["predicted"]["speedup"] >= 1.3 - 1e-6
    only_speed = solve_plan(prof, {"speed": 1.3, "context": 1000, "batch": 1}, cost=cost)
    assert sp.params["predicted"]["damage"] >= only_speed.params["predicted"]["damage"] - 1e-9
    with pytest.raises(AccelError, match="no plan meets both kv_budget 0.5 and a 5.0x speed-up"):
        solve_plan(prof, {"kv_budget": 0.5, "speed": 5.0, "context": 1000, "batch": 1}, cost=cost)


def fake_cost(L=2, Hkv=2):
    from accel.scheduler.cost import TERMS, CostModel

    coef = {t: 0.0 for t in TERMS}
    coef.update(base_ms=2.0, full_slope=1000.0, kv_plain_slope=1000.0, kv_scored_slope=1500.0,
                kv_plain_fixed=0.1, kv_scored_fixed=0.2)
    return CostModel(model="tiny", model_type="llama", fingerprint="fp", num_layers=L, num_kv_heads=Hkv, head_dim=16,
                     dtype="float32", machine={"device": "cpu", "cpu": "x", "threads": 1}, per_batch={"1": coef})


def test_a_speed_target_is_met_by_the_cost_model_and_an_unreachable_one_is_refused():
    prof = random_profile(1)
    cost = fake_cost()
    plan = solve_plan(prof, {"speed": 1.5, "context": 1000, "batch": 1}, cost=cost)
    assert plan.params["predicted"]["speedup"] >= 1.5 - 1e-6
    # a per-key cost the calibration left at about zero would make a rule look free: a speed target leaves it out
    cheap = fake_cost()
    cheap.per_batch["1"]["kv_plain_slope"] = 1e-9
    plan = solve_plan(prof, {"speed": 1.5, "context": 1000, "batch": 1}, cost=cheap)
    assert plan.params["predicted"]["rules_left_out"] == ["window"]
    assert all((lp.params or {}).get("rule") != "window" for lp in plan.layers)
    with pytest.raises(AccelError, match="no plan reaches a 5.0x decode speed-up"):
        solve_plan(prof, {"speed": 5.0, "context": 1000, "batch": 1}, cost=cost)
    with pytest.raises(AccelError, match="needs this machine's cost model"):
        solve_plan(prof, {"speed": 1.5, "context": 1000, "batch": 1})


def test_explain_names_every_layer_and_the_alternative_it_passed_over():
    plan = solve_plan(random_profile(2), {"kv_budget": 0.45})
    lines = explain(plan)
    assert lines[0].startswith("target {'kv_budget': 0.45}")
    assert len(lines) == 1 + plan.num_layers
    for line, lp in zip(lines[1:], plan.layers):
        assert ("kept whole" in line) == (lp.mode != "compress")
        if lp.mode == "compress":
            assert "under " + ("window" if lp.params["rule"] == "scored" else "scored") in line


# -- the entry point -----------------------------------------------------------------------------------------------
def tiny_profile(m):
    from accel.models.registry import get_adapter

    info = get_adapter(m).info()
    plan = accel.calibrate(m, None, [(prompt(160, seed=s), 120) for s in range(2)], policy="auto", tokens=160,
                           steps=8, sink=4, window=8, progress=False, ppl_texts=[prompt(160, seed=7)])
    return plan, info


def test_patch_refusals_are_one_line_and_remove_restores_the_model():
    m = model4("llama")
    with pytest.raises(AccelError, match="accel ships none for this model.*accel plan --model PATH --policy auto"):
        accel.patch(m, "auto")
    profile, _ = tiny_profile(m)
    for spec, kw, msg in [("auto+snapkv", {}, "runs alone"), ("hylra+auto", {}, "runs alone"),
                          ("auto", {"max_ppl_increase": -0.1}, "max_ppl_increase must be a relative perplexity"),
                          ("auto", {"max_ppl_increase": "2%"}, "max_ppl_increase must be a number"),
                          ("auto", {"budget_ratio": 0.2}, "instead of budget"),
                          ("auto", {"kv_budget": 1.5}, r"kv_budget must be a share of the prompt in \(0, 1\]"),
                          ("auto", {"speed": 0.5}, "speed must be a decode speed-up >= 1")]:
        with pytest.raises(AccelError, match=msg):
            accel.patch(m, spec, plan=profile, **kw)
        assert accel.get_handle(m) is None
    duo = Plan(policy="duo", num_layers=4, num_kv_heads=2, layers=[LayerPlan() for _ in range(4)])
    with pytest.raises(AccelError, match="this is a 'duo' plan"):
        accel.patch(m, "auto", plan=duo)
    bad = auto_plan({1: ("scored", [0.3, 0.2])})
    bad.layers[1].heads[0].kind = "window"
    with pytest.raises(AccelError, match="a head of a 'scored' layer is 'full' or 'scored'"):
        accel.patch(m, "auto", plan=bad)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = prompt()
    ref = m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    h = accel.patch(m, "auto", plan=profile, kv_budget=0.3)
    m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    h.remove()
    assert torch.equal(ref, m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_a_profile_is_solved_for_the_target_a_solved_plan_runs_as_written():
    m = model4("llama")
    profile, _ = tiny_profile(m)
    with accel.patch(m, "auto", plan=profile) as h:  # never solved: solved for the default 25%
        assert h.runtime.plan.params["target"] == {"kv_budget": 0.25}
        solved = h.runtime.plan
    assert solved.to_dict() == solve_plan(profile, {"kv_budget": 0.25}).to_dict()
    with accel.patch(m, "auto", plan=solved) as h:
        assert h.runtime.plan.to_dict() == solved.to_dict()
    with accel.patch(m, "auto", plan=solved, kv_budget=0.1) as h:  # a target with it: solved again from its profile
        assert h.runtime.plan.params["target"] == {"kv_budget": 0.1}
        assert h.runtime.plan.params["predicted"]["kv_share"] <= 0.1 + 1e-9
        # the summary says what the plan gives the heads, as the plan holds it
        plan = h.runtime.plan
        line = h.summary()
        compressed = [lp for lp in plan.layers if lp.mode == "compress"]
        assert f"auto: target {{'kv_budget': 0.1}}, {len(compressed)} of {plan.num_layers} layers compressed" in line
        assert f"mean share of the prompt kept {plan.params['predicted']['kv_share']:.1%}" in line
        counts = {}
        for hp in (hp for lp in compressed for hp in lp.heads):
            k = "full" if hp.kind == "full" else f"{hp.kind} at {hp.beta:.4g} of the prompt"
            counts[k] = counts.get(k, 0) + 1
        assert all(f"{v} {k}" in line for k, v in counts.items()) and "\n" not in line
    hand = auto_plan({1: ("window", [0.5, 1.0])})
    with pytest.raises(AccelError, match="carries no calibration profile to solve again"):
        accel.patch(m, "auto", plan=hand, kv_budget=0.1)
    with pytest.raises(AccelError, match="solved for the model and machine when patching"):
        AutoPolicy().build_plan(None)


def test_step_work_describes_each_layer_by_its_rule():
    from accel.scheduler.measure import step_work

    m = model4("llama")
    plan = auto_plan({0: ("window", [0.1, 0.2]), 2: ("scored", [1.0, 0.5])})
    with accel.patch(m, "auto", plan=plan, sink=4, window=8) as h:
        w = step_work(h, m, 200)
    kinds = [lw.kind for lw in w.layers]
    assert kinds == ["kv_plain", "full", "kv_scored", "full"]
    assert w.layers[0].attend == pytest.approx((20 + 40) / 2 + 1)
    assert w.layers[2].attend == pytest.approx((200 + 100) / 2 + 1)


def test_plan_command_flags_are_checked_before_the_model_loads(capsys):
    from accel.cli.main import main

    for argv, msg in [(["--policy", "duo", "--kv-budget", "0.2"], "--kv-budget applies to --policy auto only"),
                      (["--policy", "auto", "--max-ppl-increase", "-1"], "max_ppl_increase must be a relative"),
                      (["--policy", "auto", "--max-ppl-increase", "0.02", "--ppl-texts", "0"], "drop --ppl-texts 0"),
                      (["--policy", "auto", "--from", "shipped", "--n-texts", "3"], "calibration options (--n-texts)"),
                      (["--policy", "auto", "--data", "essays"], "--data essays does not apply to auto"),
                      (["--policy", "auto", "--metric", "far_mass"], "--metric far_mass does not apply to auto"),
                      (["--policy", "auto", "--context", "8192"], "add --speed"),
                      (["--policy", "auto", "--kv-budget", "2"], "kv_budget must be a share"),
                      (["--policy", "auto", "--from", "no-such.json"], "--from no-such.json: no such plan file")]:
        assert main(["plan", "--model", "no-such-model-folder", *argv, "--out", "x.json"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_shipped_profiles_solve_to_the_plans_shipped_with_them(name):
    """The shipped auto plan is its profile solved for its recorded target (the solver is deterministic); its
    profile covers every full-attention layer of the model it names."""
    from importlib import resources

    text = (resources.files("accel.plan") / "shipped_plans" / f"{name}.auto.json").read_text()
    plan = Plan.from_json(text)
    again = solve_plan(plan, plan.params["target"])
    assert again.layers == plan.layers
    assert plan.params["predicted"]["kv_share"] <= plan.params["target"]["kv_budget"] + 1e-9
    assert plan.provenance["command"].startswith("accel plan") and plan.provenance["fingerprint"]
    full = {"smollm2-135m": list(range(30)), "gemma3-270m": [5, 11, 17]}[name]  # the models' full-attention layers
    assert plan.params["profile"]["layers"] == full


def test_the_predicted_step_of_a_speed_plan_is_the_cost_model_on_the_step_the_patched_model_runs():
    """The solver's own step prediction equals the cost model's prediction of what the patched model does (the
    executor's budgets, floors and per-layer kinds), so a solver/executor mismatch shows here."""
    from accel.models.registry import get_adapter
    from accel.scheduler.measure import step_work

    m = model4("llama")
    profile, info = tiny_profile(m)
    cost = fake_cost(L=4)
    cost.fingerprint = info.fingerprint
    for speed in (1.2, 1.6):
        plan = solve_plan(profile, {"speed": speed, "context": 400, "batch": 1}, cost=cost, info=info)
        assert any(lp.mode == "compress" for lp in plan.layers)
        with accel.patch(m, "auto", plan=plan) as h:
            got = cost.predict(step_work(h, m, 400), 1)
        assert got == pytest.approx(plan.params["predicted"]["step_ms"], abs=1e-3), speed
        assert plan.params["predicted"]["speedup"] >= speed - 1e-6


def test_a_zero_damage_share_is_taken_below_the_budget_but_a_whole_budget_is_exactly_dense():
    dmg = {r: [[[0.5, 0.0, 0.0] for _ in range(2)] for _ in range(2)] for r in ("window", "scored")}
    prof = profile_plan(dmg, [0.1, 0.3, 1.0])
    plan = solve_plan(prof, {"kv_budget": 0.9})  # no damage either way: the fewest tokens at zero damage
    assert plan.params["predicted"]["damage"] == 0 and plan.params["predicted"]["kv_share"] == pytest.approx(0.3)
    whole = solve_plan(prof, {"kv_budget": 1.0})
    assert all(lp.mode == "full" for lp in whole.layers)
    m = model4("llama")
    ids = prompt()
    assert same(gen(m, ids, "dense"), gen(m, ids, "auto", plan=auto_plan({}), sink=4, window=8))


def test_options_that_would_be_ignored_and_plans_for_another_model_are_refused():
    m = model4("llama")
    profile, _ = tiny_profile(m)
    for kw, msg in [({"context": 8192}, "add speed"), ({"batch": 4, "kv_budget": 0.2}, "add speed"),
                    ({"min_budget": 0}, "drop min_budget"), ({"kv_budget": True}, "kv_budget must be"),
                    ({"speed": 1.2, "decode": "grow"}, "decode='fixed' with speed")]:
        with pytest.raises(AccelError, match=msg):
            accel.patch(m, "auto", plan=profile, **kw)
    q = model4("qwen3")
    with pytest.raises(AccelError, match="made for another model"):
        accel.patch(q, "auto", plan=profile)
    g = model4("gemma3_text")
    with pytest.raises(AccelError, match="made for another model"):
        accel.patch(g, "auto", plan=profile)
    with pytest.raises(AccelError, match=r"plan layers \[0\] are sliding-window layers"):
        accel.patch(g, "auto", plan=auto_plan({0: ("scored", [0.3, 0.3])}))
    bad = auto_plan({1: ("scored", [0.3, 0.3])}, window=0)
    with pytest.raises(AccelError, match="window must be a positive integer"):
        accel.patch(m, "auto", plan=bad)
    for mm in (m, q, g):
        assert accel.get_handle(mm) is None


def test_gemma_profiles_cover_only_its_full_layers_and_the_plan_compresses_only_them():
    g = model4("gemma3_text")
    plan = accel.calibrate(g, None, [(prompt(160, seed=s), 120) for s in range(2)], policy="auto", tokens=160,
                           steps=8, sink=4, window=8, progress=False, ppl_texts=[prompt(160, seed=7)])
    assert plan.params["profile"]["layers"] == [1, 3] and plan.params["profile"]["ppl"]["budgets"]
    ids = prompt()
    with accel.patch(g, "auto", plan=plan, kv_budget=0.3) as h:
        solved = h.runtime.plan
        out = g.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert [lp.mode for lp in solved.layers][0::2] == ["full", "full"]
    assert any(solved.layers[i].mode == "compress" for i in (1, 3))
    layers = out.past_key_values.layers
    for i in (1, 3):
        lp = solved.layers[i]
        if lp.mode == "compress":
            want = [103 if hp.kind == "full" else kept_tokens(hp.beta, 100, lp.params["rule"], 4, 8)
                    for hp in lp.heads]
            assert [int(x) for x in layers[i].ragged.lengths[0]] == want


def test_plan_command_solves_the_shipped_profile_and_prints_its_prediction(tmp_path, capsys):
    from accel.cli.main import main

    out = tmp_path / "a.json"
    assert main(["plan", "--policy", "auto", "--from", "shipped", "--kv-budget", "0.1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "target {'kv_budget': 0.1}: mean share kept 0.1" in printed
    plan = Plan.load(out)
    assert plan.params["target"] == {"kv_budget": 0.1} and (tmp_path / "a.png").stat().st_size > 1000


def test_a_plan_that_is_not_a_plan_is_refused_in_one_line():
    m = model4("llama")
    with pytest.raises(AccelError, match="pass policy options as keywords"):
        accel.patch(m, "auto", 0.2)
    assert accel.get_handle(m) is None


def test_retrieval_calibration_texts_are_the_mixed_sequence_without_its_essays():
    from transformers import AutoTokenizer

    from accel.calibration.auto import auto_texts
    from accel.models.loader import converted_path

    tok = AutoTokenizer.from_pretrained(str(converted_path("smollm2-135m")))
    mixed = auto_texts(tok, 6, 600, steps=32, data="mixed")
    retrieval = auto_texts(tok, 4, 600, steps=32, data="retrieval")
    assert [split for _, split in mixed[2::3]] == [600 - 32, 600 - 32]  # every third text is essay, split by steps
    kept = [t for i, t in enumerate(mixed) if i % 3 < 2]
    assert len(retrieval) == 4 and all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(retrieval, kept))
    with pytest.raises(AccelError, match="data must be one of retrieval, mixed"):
        auto_texts(tok, 2, 600, data="essays")


def test_a_refusal_says_how_far_to_relax_each_target_and_each_advice_is_met():
    import re

    prof = random_profile(1)
    top = max(d for d, _ in assignments(prof))
    with_curve(prof, [top, top * 0.5, top * 0.1], [0.3, 0.05, 0.01])
    number = lambda msg, what: float(re.search(rf"{what} ([0-9.]+) or (more|less)", msg).group(1))  # noqa: E731
    with pytest.raises(AccelError) as e:
        solve_plan(prof, {"kv_budget": 0.2, "max_ppl_increase": 0.01})
    kb, mp = number(str(e.value), "kv_budget"), number(str(e.value), "max_ppl_increase")
    assert str(e.value).count("\n") == 0 and 0.2 < kb <= 1 and 0.01 < mp
    solve_plan(prof, {"kv_budget": kb, "max_ppl_increase": 0.01})  # each advice alone meets the targets
    solve_plan(prof, {"kv_budget": 0.2, "max_ppl_increase": mp})
    with pytest.raises(AccelError, match="no plan meets"):  # and is the least change that does
        solve_plan(prof, {"kv_budget": kb - 2e-4, "max_ppl_increase": 0.01})
    # bytes and speed together
    cost = fake_cost()
    with pytest.raises(AccelError) as e:
        solve_plan(prof, {"kv_budget": 0.5, "speed": 5.0, "context": 1000, "batch": 1}, cost=cost)
    # compressing lowers both bytes and step time, so only a speed out of reach alone makes the pair infeasible
    assert "no kv_budget meets the other targets" in str(e.value)
    sp = number(str(e.value), "speed")
    assert 1 <= sp < 5.0
    met = solve_plan(prof, {"kv_budget": 0.5, "speed": sp, "context": 1000, "batch": 1}, cost=cost)
    assert met.params["predicted"]["speedup"] >= sp - 1e-9
    # speed and a perplexity bound
    tight = with_curve(random_profile(1), [top, top * 0.5, top * 1e-3], [0.3, 0.05, 0.01])
    with pytest.raises(AccelError) as e:
        solve_plan(tight, {"speed": 1.3, "context": 1000, "batch": 1, "max_ppl_increase": 0.02}, cost=cost)
    sp, mp = number(str(e.value), "speed"), number(str(e.value), "max_ppl_increase")
    solve_plan(tight, {"speed": sp, "context": 1000, "batch": 1, "max_ppl_increase": 0.02}, cost=cost)
    solve_plan(tight, {"speed": 1.3, "context": 1000, "batch": 1, "max_ppl_increase": mp}, cost=cost)
    # a bytes target below the profile's smallest share names the least it can be
    with pytest.raises(AccelError) as e:
        solve_plan(prof, {"kv_budget": 1e-4})
    solve_plan(prof, {"kv_budget": number(str(e.value), "kv_budget")})


def test_a_speed_target_takes_a_cost_model_file_measured_here_and_refuses_one_from_another_cpu(tmp_path):
    from accel.perf import machine_facts

    m = model4("llama")
    profile, info = tiny_profile(m)
    cost = fake_cost(L=4)
    cost.fingerprint = info.fingerprint
    cost.machine = {**machine_facts(), "device": "cpu"}
    path = tmp_path / "cost.json"
    cost.save(path)
    with accel.patch(m, "auto", plan=profile, speed=1.2, context=400, cost=str(path)) as h:
        pr = h.runtime.plan.params["predicted"]
        assert pr["speedup"] >= 1.2 - 1e-6
        assert h.runtime.plan.to_dict() == solve_plan(profile, {"speed": 1.2, "context": 400, "batch": 1},
                                                      cost=cost, info=info).to_dict()
    other = fake_cost(L=4)
    other.fingerprint = info.fingerprint
    other.machine = {**machine_facts(), "device": "cpu", "cpu": "Some Other CPU"}
    other.save(tmp_path / "other.json")
    with pytest.raises(AccelError, match=r"measured with cpu='Some Other CPU'.*accel calibrate-cost --threads N") as e:
        accel.patch(m, "auto", plan=profile, speed=1.2, context=400, cost=str(tmp_path / "other.json"))
    assert "\n" not in str(e.value) and "same thread count" not in str(e.value)
    with pytest.raises(AccelError, match="give it with speed"):
        accel.patch(m, "auto", plan=profile, kv_budget=0.3, cost=str(path))
