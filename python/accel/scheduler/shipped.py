"""Plans shipped inside the package (``accel/plans/*.json``), matched to a model by its fingerprint
(architecture, layer/head counts, widths, vocabulary). Each was produced by ``accel plan`` with the
arguments recorded in its ``provenance`` and can be reproduced with them."""
from __future__ import annotations

from importlib import resources

from .plan import Plan


def shipped_plans() -> list[Plan]:
    out = []
    root = resources.files("accel") / "plans"
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
