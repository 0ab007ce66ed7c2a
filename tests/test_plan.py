import json

import pytest

from accel.errors import PlanValidationError
from accel.plan import SCHEMA_VERSION, HeadPlan, LayerPlan, Plan


def _plan():
    layers = [LayerPlan(mode="full"), LayerPlan(mode="reuse", reuse_src=0, topk=64, sink=4, recent=16),
              LayerPlan(mode="select", topk=64, heads=[HeadPlan(kind="retrieval"), HeadPlan(kind="streaming", budget=32)])]
    return Plan(policy="hylra", num_layers=3, num_kv_heads=2, model_type="llama", layers=layers,
                provenance={"command": "accel plan ..."})


def test_roundtrip(tmp_path):
    p = _plan()
    p.save(tmp_path / "p.json")
    q = Plan.load(tmp_path / "p.json")
    assert q == p
    assert json.loads((tmp_path / "p.json").read_text())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.update(schema_version=99), r"schema_version"),
    (lambda d: d["layers"][1].update(reuse_src=2), r"layers\[1\]\.reuse_src"),
    (lambda d: d["layers"][1].update(reuse_src=None), r"layers\[1\]\.reuse_src"),
    (lambda d: d["layers"][0].update(mode="not a mode"), r"layers\[0\]\.mode: must be a mode name"),
    (lambda d: d["layers"][2].update(topk=-1), r"layers\[2\]\.topk"),
    (lambda d: d["layers"][2]["heads"][1].update(kind=3), r"layers\[2\]\.heads\[1\]\.kind"),
    (lambda d: d["layers"][2].update(bogus=1), r"layers\[2\]: unknown field"),
    (lambda d: d.update(num_layers=4), r"plan.layers: has 3 entries"),
    (lambda d: d.pop("policy"), r"plan.policy: required"),
    (lambda d: d["layers"][2].update(heads=[{"kind": "full"}]), r"layers\[2\]\.heads: has 1 entries"),
    (lambda d: d["layers"][2]["heads"][0].update(beta=1.5), r"layers\[2\]\.heads\[0\]\.beta"),
    (lambda d: d["layers"][2]["heads"][1].update(score="high"), r"layers\[2\]\.heads\[1\]\.score"),
    (lambda d: d["layers"][2]["heads"][1].update(alpha=float("nan")), r"layers\[2\]\.heads\[1\]\.alpha"),
])
def test_validation_names_the_field(mutate, msg):
    d = _plan().to_dict()
    mutate(d)
    with pytest.raises(PlanValidationError, match=msg):
        Plan.from_dict(d)


def test_plan_must_fit_model():
    with pytest.raises(PlanValidationError, match="model has 30"):
        _plan().validate(num_layers=30)


def test_a_policy_refuses_plan_modes_and_head_kinds_it_does_not_execute():
    """The schema checks structure; the policy owns its modes and head kinds (``Policy.check_plan``)."""
    import accel
    from accel.policies.registry import make_policy

    p = _plan()
    with pytest.raises(PlanValidationError, match=r"layers\[2\]\.heads\[0\]\.kind: 'retrieval' is not a head kind policy 'hylra'"):
        make_policy("hylra").check_plan(p)
    p.layers[2].heads = None
    make_policy("hylra").check_plan(p)  # full / reuse / select: hylra's own modes
    p.layers[0].mode = "fast"
    with pytest.raises(PlanValidationError, match=r"layers\[0\]\.mode: 'fast' is not a mode policy 'hylra' executes"):
        make_policy("hylra").check_plan(p)
    with pytest.raises(PlanValidationError, match=r"'reuse' is not a mode policy 'dense\+snapkv'"):
        make_policy("snapkv").check_plan(_plan())
    assert accel.get_policy_class("duo").head_kinds == ("retrieval", "streaming")
