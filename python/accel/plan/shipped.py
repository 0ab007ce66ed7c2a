"""Plans shipped inside the package (``accel/plan/shipped_plans/*.json``), matched to a model by its fingerprint
(architecture, layer/head counts, widths, vocabulary). Each was produced by ``accel plan`` with the arguments
recorded in its ``provenance`` and can be reproduced with them."""
from __future__ import annotations

from importlib import resources

from ..errors import AccelError
from .schema import Plan


def shipped_plans() -> list[Plan]:
    out = []
    root = resources.files("accel.plan") / "shipped_plans"
    if not root.is_dir():
        return out
    for f in sorted(root.iterdir(), key=lambda p: p.name):
        if f.name.endswith(".json"):
            out.append(Plan.from_json(f.read_text()))
    return out


def shipped_plan(policy: str, info) -> Plan | None:
    for p in shipped_plans():
        if p.policy == policy and p.provenance.get("fingerprint") == info.fingerprint:
            return p
    return None


def require_shipped_plan(policy: str, info, needs: str) -> Plan:
    """The plan shipped for ``policy`` on this model, or one line saying what the policy ``needs`` and the two ways
    to make it (a plan-driven policy's ``build_plan`` without ``plan=``)."""
    plan = shipped_plan(policy, info)
    if plan is None:
        raise AccelError(
            f"policy {policy!r} needs {needs}, and accel ships none for this model ({info.model_type}, "
            f"{info.num_layers} layers; {info.fingerprint}). Make a plan from calibration text (minutes on CPU): "
            f"`accel plan --model PATH --policy {policy} --out {policy}.json`, or in Python "
            f"`plan = accel.calibrate(model, tokenizer, policy={policy!r})`; then "
            f"`accel.patch(model, {policy!r}, plan=plan)`."
        )
    return plan
