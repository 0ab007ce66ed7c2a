"""The decode cost model: its fit, its interpolation and refusals, its file format, and the per-layer work it reads
from a patched model."""
from __future__ import annotations

import json
import random

import pytest
import torch

import accel
from accel.errors import AccelError
from accel.scheduler.cost import (COST_SCHEMA_VERSION, KV_SLOPES, TERMS, CostModel, LayerWork, StepWork, cost_model_for,
                                  features, fit, shipped_cost_models)
from accel.scheduler.measure import calibration_design, layer_plan, patch_run, step_work, time_steps

from .conftest import model4


def _truth(b: int) -> dict:
    """Known coefficients, all slopes positive (the fit bounds them at 0), fixed terms of both signs, the compressed
    layers' per-key costs above a full layer's (as ``fit`` holds them by default)."""
    rng = random.Random(b)
    out = {t: (rng.uniform(-2, 2) if t.endswith("_fixed") else rng.uniform(5, 60)) * (1 + 0.1 * b) for t in TERMS}
    for t in KV_SLOPES:
        out[t] += out["full_slope"]
    return out


def _step(layers, stacked=True) -> StepWork:
    return StepWork(list(layers), stacked)


def _design_runs(L=30, Hkv=3, batches=(1, 4)) -> list[dict]:
    """The calibration design's runs with the work the runtime would report, and steps made from known
    coefficients (no noise)."""
    runs = []
    for b in batches:
        for r in calibration_design(L, (512, 2048, 4096)):
            T = r["context"]
            if r["policy"] == "dense":
                work = _step([LayerWork("full", attend=T)] * L)
            elif r["policy"] in ("snapkv", "streaming"):
                h = r["overrides"]["budget_ratio"] * T
                work = _step([LayerWork("kv_scored" if r["policy"] == "snapkv" else "kv_plain", attend=h)] * L)
            else:
                k = r["overrides"]["topk_ratio"] * T
                donors = {i for i, m in enumerate(r["modes"]) if m != "reuse" and "reuse" in r["modes"]}
                layers = []
                for i, m in enumerate(r["modes"]):
                    if m == "select":
                        layers.append(LayerWork("select", scan=T, attend=k))
                    elif m == "reuse":
                        layers.append(LayerWork("reuse", attend=k))
                    else:
                        layers.append(LayerWork("donor", scan=T, attend=T) if i in donors else LayerWork("full", attend=T))
                work = _step(layers, stacked=False)
            f = features(work, b, Hkv)
            runs.append({"batch": b, "work": work, "step_ms": sum(_truth(b)[t] * f[t] for t in TERMS)})
    return runs


def _model(per_batch, L=30, Hkv=3, **kw) -> CostModel:
    kw.setdefault("machine", {"cpu": "x", "threads": 2, "device": "cpu"})
    return CostModel(model="m", model_type="llama", fingerprint="fp", num_layers=L, num_kv_heads=Hkv, head_dim=64,
                     dtype="float32", per_batch=per_batch, **kw)


def test_fit_recovers_known_coefficients_from_the_calibration_design():
    runs = _design_runs()
    per_batch, paths = fit(runs, 3)
    assert paths == [True, False]
    for b in (1, 4):
        for t in TERMS:
            assert per_batch[str(b)][t] == pytest.approx(_truth(b)[t], rel=1e-6, abs=1e-6), (b, t)
    cm = _model(per_batch)
    for r in runs:
        assert cm.predict(r["work"], r["batch"]) == pytest.approx(r["step_ms"], rel=1e-6)


def test_fit_holds_compressed_per_key_costs_at_least_at_a_full_layers():
    """Steps whose compressed layers cost less per key than full ones: the default fit holds those slopes at the full
    slope (and stays within the runs' few percent), the free fit recovers them."""
    truth = _truth(1)
    truth["kv_scored_slope"] = 0.2 * truth["full_slope"]
    runs = []
    for r in _design_runs(batches=(1,)):
        runs.append({**r, "step_ms": sum(truth[t] * features(r["work"], 1, 3)[t] for t in TERMS)})
    free, _ = fit(runs, 3, kv_floor=False)
    assert free["1"]["kv_scored_slope"] == pytest.approx(truth["kv_scored_slope"], rel=1e-6)
    held, _ = fit(runs, 3)
    assert held["1"]["kv_scored_slope"] >= held["1"]["full_slope"] > 0
    assert held["1"]["kv_plain_slope"] >= held["1"]["full_slope"]
    cm = _model(held)
    errs = [abs(cm.predict(r["work"], 1) / r["step_ms"] - 1) for r in runs]
    assert max(errs) < 0.5 and max(errs) > 1e-3  # the constraint binds: no longer an exact fit


def test_fit_refuses_a_design_that_leaves_a_kind_unmeasured():
    runs = [r for r in _design_runs(batches=(1,)) if all(w.kind != "donor" for w in r["work"].layers)]
    with pytest.raises(AccelError, match="never exercise.*donor"):
        fit(runs, 3)
    # select layers measured at one context and budget only: their fixed and per-key costs cannot be told apart
    flat = [r for r in _design_runs(batches=(1,)) if not any(w.kind == "select" for w in r["work"].layers)]
    flat += [{"batch": 1, "work": _step([LayerWork("select", scan=2000, attend=250)] * 30, stacked=False),
              "step_ms": 100.0 + i} for i in range(3)]
    with pytest.raises(AccelError, match="determine only"):
        fit(flat, 3)


def test_fit_under_noise_predicts_within_the_noise():
    """With every calibration step off by up to 3%, the fitted model predicts unseen mixed steps within 5% of the
    noise-free truth (a wrong design matrix or weighting would not)."""
    rng = random.Random(0)
    runs = [{**r, "step_ms": r["step_ms"] * (1 + rng.uniform(-0.03, 0.03))} for r in _design_runs(batches=(1,))]
    per_batch, _ = fit(runs, 3)
    cm = _model(per_batch)
    truth = _truth(1)
    for T, k in ((3000, 400), (6000, 1500)):
        mixed = _step([LayerWork("full", attend=T)] * 4 + [LayerWork("donor", scan=T, attend=T)] * 6
                      + [LayerWork("reuse", attend=k)] * 20, stacked=False)
        f = features(mixed, 1, 3)
        assert cm.predict(mixed, 1) == pytest.approx(sum(truth[t] * f[t] for t in TERMS), rel=0.05)


def test_batch_interpolation_and_refusals():
    a = {t: 1.0 for t in TERMS}
    c = {t: 3.0 for t in TERMS}
    cm = _model({"1": a, "5": c})
    assert cm.coefficients(3) == {t: 2.0 for t in TERMS}
    work = _step([LayerWork("full", attend=1000)] * 30)
    assert cm.predict(work, 3) == pytest.approx(2.0 + 2.0 * 3 * 3 * 1000 * 30 / 1e6)
    assert cm.predict(_step(work.layers, stacked=False), 3) == pytest.approx(cm.predict(work, 3) + 2.0)
    only_stacked = _model({"1": a}, stacked_paths=[True])
    with pytest.raises(AccelError, match="never measured layer-by-layer decode"):
        only_stacked.predict(_step(work.layers, stacked=False), 1)
    with pytest.raises(AccelError, match="outside the cost model's measured batch sizes"):
        cm.predict(work, 8)
    with pytest.raises(AccelError, match="names 29 layers"):
        cm.predict(_step(work.layers[:29]), 1)
    with pytest.raises(AccelError, match="not one of"):
        LayerWork("sparse", attend=3)
    ph = _model({}, measured=False, machine={"device": "NVIDIA H100"})
    with pytest.raises(AccelError, match="placeholder.*calibrate-cost"):
        ph.predict(work, 1)
    with pytest.raises(AccelError, match="measured on m .*not on this model"):
        cm.check_fits("other", 30, 3)
    with pytest.raises(AccelError, match="30 layers"):
        cm.check_fits("fp", 24, 3)
    with pytest.raises(AccelError, match="measured in float32"):
        cm.check_fits(dtype="bfloat16")
    with pytest.raises(AccelError, match="threads=2"):
        cm.check_fits(machine={"cpu": "x", "threads": 1, "device": "cpu"})


def test_file_round_trip_and_validation(tmp_path):
    cm = _model({"1": _truth(1), "8": _truth(8)}, runs=[{"batch": 1, "step_ms": 3.0}])
    p = tmp_path / "c.json"
    cm.save(p)
    back = CostModel.load(p)
    assert back == cm
    d = json.loads(p.read_text())
    assert d["schema_version"] == COST_SCHEMA_VERSION
    for bad, msg in (({**d, "schema_version": 99}, "schema_version 99"),
                     ({**d, "extra": 1}, "unknown field"),
                     ({**d, "per_batch": {"1": {"base_ms": 1.0}}}, r"per_batch\['1'\]"),
                     ({**d, "per_batch": {}}, "no measured batch"),
                     ({**d, "per_batch": {"1": {**_truth(1), "base_ms": "fast"}}}, r"per_batch\['1'\]"),
                     ({**d, "per_batch": {"1": {**_truth(1), "base_ms": float("nan")}}}, "finite number"),
                     ({**d, "per_batch": {"1": {**_truth(1), "full_slope": -1.0}}}, "negative"),
                     ({**d, "per_batch": {"01": _truth(1)}}, "batch size such as"),
                     ({k: v for k, v in d.items() if k != "fingerprint"}, r"\['fingerprint'\] missing"),
                     ({**d, "measured": "false"}, "measured must be true or false"),
                     ({**d, "machine": "cpu"}, "machine must be an object"),
                     ({**d, "num_layers": 0}, "num_layers must be a positive integer"),
                     ({**d, "stacked_paths": []}, "stacked_paths")):
        p.write_text(json.dumps(bad))
        with pytest.raises(AccelError, match=msg):
            CostModel.load(p)
    p.write_text("{not json")
    with pytest.raises(AccelError, match="not valid JSON"):
        CostModel.load(p)
    with pytest.raises(AccelError, match="does not exist"):
        CostModel.load(tmp_path / "missing.json")


def test_step_work_reads_the_patched_runtime():
    m = model4("llama")
    T = 200  # cached before the step: the step attends to T + 1
    with accel.patch(m, "dense") as h:
        w = step_work(h, m, T)
        assert [x.kind for x in w.layers] == ["full"] * 4 and w.layers[0].attend == T + 1 and w.stacked
    plan = layer_plan(m, ["full", "reuse", "select", "reuse"])
    with accel.patch(m, "hylra", plan=plan, topk=40, sink=4, recent=8) as h:
        w = step_work(h, m, T)
        assert [x.kind for x in w.layers] == ["donor", "reuse", "select", "reuse"] and not w.stacked
        assert (w.layers[2].scan, w.layers[2].attend, w.layers[1].attend) == (T + 1, 40, 40)
    with accel.patch(m, "hylra", plan=plan, topk=T + 1) as h:  # the budget covers the context: every layer exact
        assert [x.kind for x in step_work(h, m, T).layers] == ["full"] * 4
    # a reuse layer attends to its anchor's selection (the anchor's size), and runs dense when its anchor is not sparse
    per_layer = layer_plan(m, ["select", "reuse", "select", "reuse"])
    per_layer.layers[0].topk, per_layer.layers[1].topk = 48, 24
    per_layer.layers[2].topk = 400
    with accel.patch(m, "hylra", plan=per_layer, sink=4, recent=8, topk_ratio=0.25) as h:
        w = step_work(h, m, T)
        assert [(x.kind, x.attend) for x in w.layers] == [("select", 48), ("reuse", 48), ("full", T + 1),
                                                           ("full", T + 1)]
    with accel.patch(m, "snapkv", budget=48) as h:
        w = step_work(h, m, T)
        assert [(x.kind, x.attend) for x in w.layers] == [("kv_scored", 49)] * 4
    with accel.patch(m, "streaming", budget=32) as h:
        assert [(x.kind, x.attend) for x in step_work(h, m, T).layers] == [("kv_plain", 33)] * 4
    with accel.patch(m, "snapkv", budget=T + 10) as h:  # nothing to compress: the layers stay dense
        assert [x.kind for x in step_work(h, m, T).layers] == ["full"] * 4


@pytest.mark.parametrize("spec,msg", [
    ("quest", "'quest' is not one of them"),
    ("hylra+snapkv", "'hylra\\+snapkv' is not one of them"),
    ("snapkv@decode=grow", "grows its cache"),
])
def test_step_work_refuses_what_it_cannot_describe(spec, msg):
    from accel.policies.registry import split_spec

    m = model4("llama")
    name, opts = split_spec(spec)
    plan = layer_plan(m, ["full", "reuse", "select", "reuse"]) if name.startswith("hylra") else None
    with accel.patch(m, name, plan=plan, **opts) as h:
        with pytest.raises(AccelError, match=msg):
            step_work(h, m, 100)


def test_step_work_on_sliding_window_layers():
    """Gemma-3's sliding layers attend to their window whatever the plan says; a reuse layer whose anchor slides runs
    dense; a KV policy leaves them alone."""
    m = model4("gemma3_text")  # layers 0 and 2 slide (window 16)
    T = 100
    with accel.patch(m, "dense") as h:
        assert [x.attend for x in step_work(h, m, T).layers] == [16, T + 1, 16, T + 1]
    plan = layer_plan(m, ["select", "reuse", "select", "reuse"])
    with accel.patch(m, "hylra", plan=plan, topk=32, sink=4, recent=8) as h:
        w = step_work(h, m, T)
        assert [(x.kind, x.attend) for x in w.layers] == [("full", 16), ("full", T + 1), ("full", 16), ("full", T + 1)]
    with accel.patch(m, "snapkv", budget=48) as h:
        assert [(x.kind, x.attend) for x in step_work(h, m, T).layers] == [("full", 16), ("kv_scored", 49),
                                                                           ("full", 16), ("kv_scored", 49)]


def test_layer_plan_refuses_reuse_without_anchor():
    m = model4("llama")
    with pytest.raises(AccelError, match="earlier full or select"):
        layer_plan(m, ["reuse", "full", "full", "full"])


def test_a_timed_calibration_run_on_a_tiny_model():
    """Every design run patches, describes and times; ``calibrate_cost`` on a tiny model fits and predicts its own
    runs (numbers are this machine's; only the plumbing and the signs are checked)."""
    from accel.scheduler.measure import calibrate_cost

    m = model4("llama")
    cm = calibrate_cost(m, "tiny", batches=(1, 2), contexts={1: (200, 320, 480), 2: (200, 320, 480)}, new_tokens=4,
                        passes=1)
    assert cm.batches() == [1, 2] and len(cm.runs) == 2 * len(calibration_design(4, (200, 320, 480)))
    assert all(r["step_ms"] > 0 and r["fitted_ms"] > 0 for r in cm.runs)
    assert {r["policy"] for r in cm.runs} == {"dense", "hylra", "snapkv", "streaming"}
    assert all(cm.per_batch[b][t] >= 0 for b in cm.per_batch for t in TERMS if not t.endswith("_fixed"))
    assert cm.stacked_paths == [True, False]  # dense and the KV policies stack, hylra decodes layer by layer
    with patch_run(m, {"policy": "hylra", "modes": ["select", "reuse", "select", "reuse"],
                       "overrides": {"topk_ratio": 0.25}, "context": 100}) as h:
        assert time_steps(m, h, 2, 100, 4) > 0


def test_calibrate_cost_cli_refuses_bad_contexts(capsys):
    from accel.cli.main import main

    for argv, msg in ((["--contexts", "1:4096,1024,8000", "--out", "x.json"], "three increasing contexts"),
                      (["--contexts", "2:100,200,300", "--batches", "1", "--out", "x.json"], "not among --batches"),
                      (["--out", "x.csv"], "give a .json path"),
                      (["--passes", "0", "--out", "x.json"], "--passes 0"),
                      (["--threads", "0", "--out", "x.json"], "--threads 0: give a positive number"),
                      (["--threads", "-1", "--out", "x.json"], "--threads -1: give a positive number")):
        assert main(["calibrate-cost", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err


def test_cost_model_for_a_model(tmp_path):
    """A file measured for this model and this process is served; another model, device, thread count or a missing
    shipped one is refused in one line naming calibrate-cost; the shipped placeholders refuse to predict."""
    from accel.models.registry import get_adapter
    from accel.perf import machine_facts

    m = model4("llama")
    info = get_adapter(m).info()
    here = {**machine_facts(), "device": "cpu"}
    cm = CostModel(model="tiny", model_type=info.model_type, fingerprint=info.fingerprint, num_layers=4,
                   num_kv_heads=2, head_dim=16, dtype="float32", machine=here, per_batch={"1": _truth(1)})
    p = tmp_path / "c.json"
    cm.save(p)
    assert cost_model_for(m, p) == cm
    for change, msg in (({"machine": {**here, "threads": here["threads"] + 1}}, "threads="),
                        ({"machine": {**here, "device": "cuda:NVIDIA H100"}}, "measured on cuda"),
                        ({"fingerprint": "other"}, "not on this model"),
                        ({"machine": {**here, "isa": "other"}}, "isa="),
                        ({"dtype": "bfloat16"}, "measured in bfloat16, not float32")):
        bad = CostModel(**{**cm.to_dict(), **change})
        bad.save(p)
        with pytest.raises(AccelError, match=msg):
            cost_model_for(m, p)
    with pytest.raises(AccelError, match="ships no cost model.*calibrate-cost"):
        cost_model_for(m)
    cm.save(p)
    with pytest.raises(AccelError, match="measured in float32, not bfloat16"):  # the model's own dtype is checked
        cost_model_for(m.to(torch.bfloat16), p)
    shipped = shipped_cost_models()
    assert any(c.measured and c.machine.get("device") == "cpu" for c in shipped)
    for c in shipped:
        if not c.measured:
            assert c.machine["device"].startswith("cuda")
            with pytest.raises(AccelError, match="placeholder"):
                c.predict(_step([LayerWork("full", attend=10)] * c.num_layers), 1)
        else:
            assert c.batches() and all(c.per_batch[b][t] >= 0 for b in c.per_batch for t in TERMS
                                       if not t.endswith("_fixed"))


def test_of_several_shipped_cost_models_the_one_of_this_cpu_serves(monkeypatch):
    """accel ships a cost model per measured CPU: the one whose CPU, instruction set and thread count match this
    process serves, and one of another CPU is never taken silently (it is refused in one line)."""
    import accel.scheduler.cost as costmod
    from accel.models.registry import get_adapter
    from accel.perf import machine_facts

    m = model4("llama")
    info = get_adapter(m).info()
    here = {**machine_facts(), "device": "cpu"}

    def made(cpu):
        return CostModel(model="tiny", model_type=info.model_type, fingerprint=info.fingerprint, num_layers=4,
                         num_kv_heads=2, head_dim=16, dtype="float32", machine={**here, "cpu": cpu},
                         per_batch={"1": _truth(1)})

    other, mine = made("Some Other CPU"), made(here["cpu"])
    monkeypatch.setattr(costmod, "shipped_cost_models", lambda: [other, mine])
    assert cost_model_for(m) == mine
    monkeypatch.setattr(costmod, "shipped_cost_models", lambda: [other])
    with pytest.raises(AccelError, match="measured with cpu='Some Other CPU'"):
        cost_model_for(m)
