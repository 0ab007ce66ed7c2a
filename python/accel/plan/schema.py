"""The scheduler's output: a versioned, JSON-serialisable plan of per-layer and per-head policies.

A ``Plan`` says, for every decoder layer, which attention mode runs (``LayerPlan.mode``), which
policy implements it, the layer's budgets and, optionally, one ``HeadPlan`` per KV head (head type,
budget, MoA's alpha/beta...). Planners (``accel.calibrate``) produce plans; ``accel.patch(model,
plan=...)`` consumes them. Files carry ``schema_version``; loading validates every field and reports
errors as ``layers[3].reuse_src: ...`` so a hand-edited plan fails with the exact location.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PlanValidationError

SCHEMA_VERSION = 1
#: layer modes every policy may use: exact attention, a layer that scores and selects its own tokens, a layer that
#: attends to an earlier anchor's selection (``reuse_src``). A policy names the further modes and the head kinds its
#: plans use (``Policy.plan_modes`` / ``Policy.head_kinds``) and checks them when it is patched
#: (``Policy.check_plan``); the schema checks the structure: names, indices, numbers.
LAYER_MODES = ("full", "select", "reuse")


@dataclass
class HeadPlan:
    kind: str = "full"
    budget: int | None = None
    alpha: float | None = None
    beta: float | None = None
    #: profiler statistic of the head (DuoAttention: output error of streaming attention; higher =
    #: more retrieval-like), so the runtime can rank heads for any budget
    score: float | None = None


@dataclass
class LayerPlan:
    mode: str = "full"
    attention: str = "dense"  # attention policy name for this layer
    kv: str | None = None  # KV-cache (compression) policy name, None = keep everything
    reuse_src: int | None = None
    topk: int | None = None
    sink: int | None = None
    recent: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    heads: list[HeadPlan] | None = None


@dataclass
class Plan:
    policy: str
    num_layers: int
    num_kv_heads: int | None = None
    model_type: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # method-wide knobs
    layers: list[LayerPlan] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # how it was produced (command, data)
    schema_version: int = SCHEMA_VERSION

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def uniform(cls, policy: str, num_layers: int, attention: str | None = None, kv: str | None = None,
                num_kv_heads: int | None = None, model_type: str | None = None, **params) -> "Plan":
        layers = [LayerPlan(mode="full", attention=attention or policy, kv=kv) for _ in range(num_layers)]
        return cls(policy=policy, num_layers=num_layers, num_kv_heads=num_kv_heads, model_type=model_type,
                   params=dict(params), layers=layers)

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        self.validate()
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: Any) -> "Plan":
        if not isinstance(d, dict):
            raise PlanValidationError(f"plan: expected a JSON object, got {type(d).__name__}")
        known = {"policy", "num_layers", "num_kv_heads", "model_type", "params", "layers", "provenance", "schema_version"}
        unknown = set(d) - known
        if unknown:
            raise PlanValidationError(f"plan: unknown field(s) {sorted(unknown)}; valid fields are {sorted(known)}")
        ver = d.get("schema_version")
        if ver != SCHEMA_VERSION:
            raise PlanValidationError(
                f"plan.schema_version: this accel reads schema version {SCHEMA_VERSION}, the file has {ver!r}; "
                "re-create the plan with `accel plan` from this accel version"
            )
        for req in ("policy", "num_layers", "layers"):
            if req not in d:
                raise PlanValidationError(f"plan.{req}: required field is missing")
        if not isinstance(d["layers"], list):
            raise PlanValidationError("plan.layers: must be a list with one object per decoder layer")
        layers = []
        lknown = set(LayerPlan.__dataclass_fields__)
        hknown = set(HeadPlan.__dataclass_fields__)
        for i, ld in enumerate(d["layers"]):
            if not isinstance(ld, dict):
                raise PlanValidationError(f"layers[{i}]: must be an object, got {type(ld).__name__}")
            bad = set(ld) - lknown
            if bad:
                raise PlanValidationError(f"layers[{i}]: unknown field(s) {sorted(bad)}; valid: {sorted(lknown)}")
            heads = ld.get("heads")
            if heads is not None:
                if not isinstance(heads, list):
                    raise PlanValidationError(f"layers[{i}].heads: must be a list or null")
                hs = []
                for j, hd in enumerate(heads):
                    if not isinstance(hd, dict) or set(hd) - hknown:
                        raise PlanValidationError(f"layers[{i}].heads[{j}]: must be an object with fields {sorted(hknown)}")
                    hs.append(HeadPlan(**hd))
                heads = hs
            layers.append(LayerPlan(**{**ld, "heads": heads}))
        plan = cls(**{**d, "layers": layers})
        plan.validate()
        return plan

    @classmethod
    def coerce(cls, plan) -> "Plan":
        """A ``Plan`` from a ``Plan``, a dict of one, or a path to a JSON file."""
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, dict):
            return cls.from_dict(plan)
        if not isinstance(plan, (str, Path)):
            raise PlanValidationError(
                f"plan must be a Plan, a dict of one or a path to a JSON file, got {type(plan).__name__} ({plan!r}); "
                "pass policy options as keywords, e.g. accel.patch(model, 'auto', kv_budget=0.2)")
        return cls.load(plan)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanValidationError(f"plan: not valid JSON ({exc})") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if not p.exists():
            raise PlanValidationError(f"plan file {str(p)!r} does not exist")
        return cls.from_json(p.read_text())

    # -- validation -------------------------------------------------------------------------------
    def validate(self, num_layers: int | None = None, num_kv_heads: int | None = None) -> None:
        """Check every field; with ``num_layers``/``num_kv_heads`` also check it fits a model."""
        if not isinstance(self.policy, str) or not self.policy:
            raise PlanValidationError("plan.policy: must be a non-empty string")
        if not isinstance(self.num_layers, int) or self.num_layers <= 0:
            raise PlanValidationError(f"plan.num_layers: must be a positive integer, got {self.num_layers!r}")
        if len(self.layers) != self.num_layers:
            raise PlanValidationError(
                f"plan.layers: has {len(self.layers)} entries but plan.num_layers is {self.num_layers}"
            )
        if num_layers is not None and num_layers != self.num_layers:
            raise PlanValidationError(
                f"plan.num_layers: the plan is for {self.num_layers} layers but the model has {num_layers}; "
                "use a plan made for this model (`accel plan --model ...`)"
            )
        hkv = num_kv_heads if num_kv_heads is not None else self.num_kv_heads
        if num_kv_heads is not None and self.num_kv_heads is not None and num_kv_heads != self.num_kv_heads:
            raise PlanValidationError(
                f"plan.num_kv_heads: the plan is for {self.num_kv_heads} KV heads but the model has {num_kv_heads}"
            )
        for i, lp in enumerate(self.layers):
            where = f"layers[{i}]"
            if not isinstance(lp.mode, str) or not lp.mode.isidentifier():
                raise PlanValidationError(f"{where}.mode: must be a mode name such as {LAYER_MODES}, got {lp.mode!r}")
            if not isinstance(lp.attention, str):
                raise PlanValidationError(f"{where}.attention: must be a policy name string")
            if lp.mode == "reuse":
                if not isinstance(lp.reuse_src, int) or not (0 <= lp.reuse_src < i):
                    raise PlanValidationError(
                        f"{where}.reuse_src: a reuse layer needs the index of an earlier layer (0..{i - 1}), got {lp.reuse_src!r}"
                    )
                if self.layers[lp.reuse_src].mode == "reuse":
                    raise PlanValidationError(
                        f"{where}.reuse_src: layer {lp.reuse_src} is itself a reuse layer; reuse must point at an anchor"
                    )
            elif lp.reuse_src is not None:
                raise PlanValidationError(f"{where}.reuse_src: only reuse layers may set it (mode is {lp.mode!r})")
            for fld in ("topk", "sink", "recent"):
                val = getattr(lp, fld)
                if val is not None and (not isinstance(val, int) or val < 0):
                    raise PlanValidationError(f"{where}.{fld}: must be a non-negative integer or null, got {val!r}")
            if lp.heads is not None:
                if hkv is not None and len(lp.heads) != hkv:
                    raise PlanValidationError(f"{where}.heads: has {len(lp.heads)} entries, the model has {hkv} KV heads")
                for j, hp in enumerate(lp.heads):
                    if not isinstance(hp.kind, str) or not hp.kind.isidentifier():
                        raise PlanValidationError(f"{where}.heads[{j}].kind: must be a head-kind name, got {hp.kind!r}")
                    if hp.budget is not None and (not isinstance(hp.budget, int) or hp.budget < 0):
                        raise PlanValidationError(f"{where}.heads[{j}].budget: must be a non-negative integer")
                    for fld in ("alpha", "beta", "score"):
                        val = getattr(hp, fld)
                        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float))
                                                or not math.isfinite(val)):
                            raise PlanValidationError(f"{where}.heads[{j}].{fld}: must be a finite number or null, got {val!r}")
                    if hp.beta is not None and not 0 <= hp.beta <= 1:
                        raise PlanValidationError(f"{where}.heads[{j}].beta: must be in [0, 1], got {hp.beta!r}")
