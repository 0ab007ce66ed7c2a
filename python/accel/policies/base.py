"""Policy base classes: the plumbing lives here, subclasses write only the method's maths.

Two families compose on one model (house-style "template method", after kvpress' BasePress):

* ``AttentionPolicy`` decides how a layer computes attention: ``prefill`` (many queries) and
  ``decode`` (one query per sequence). The defaults are exact dense attention: prefill through
  transformers' own SDPA function, decode through accel's bandwidth-bound kernel over accel's cache.
* ``KVCachePolicy`` decides what the cache keeps: ``after_prefill`` (compress the prompt's KV) and
  ``after_decode`` (evict as tokens arrive), per KV head, on ``AccelLayer`` storage.

A policy is a ``@dataclass``; its fields are its knobs, validated in ``__post_init__`` with errors
that name the knob and its valid range. ``build_plan`` turns the policy into a per-layer ``Plan``;
policies driven by calibration override it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..errors import AccelError
from ..attention.context import LayerContext
from ..attention.decode import dense_decode
from ..attention.hf import hf_sdpa
from ..models.base import ModelInfo
from ..plan import Plan


def _same_value(a, b) -> bool:
    """Plan values come back from JSON: 0.125 and 1/8, 2 and 2.0 are the same knob value."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)), abs(float(b)))
    return a == b


class Policy:
    """Common base. ``name`` is the registry name; ``kind`` is 'attention' or 'kv'."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    lossy: ClassVar[bool] = True
    #: prefill is exact dense attention (the evaluation harness then shares one prefill per sample)
    dense_prefill: ClassVar[bool] = True

    def __post_init__(self):
        self._check_numbers()
        self.validate()

    _NUMERIC = frozenset({"int", "float", "None"})

    def _check_numbers(self) -> None:
        """A knob declared as a number (``int``, ``float``, optionally ``None``) given anything else -- text from
        ``--set topk_ratio=abc`` or ``"quest@topk_ratio=abc"`` -- is refused in one line naming it."""
        for f in dataclasses.fields(self):
            parts = {p.strip() for p in str(f.type).split("|")}
            if not parts or not parts <= self._NUMERIC or parts == {"None"}:
                continue
            v = getattr(self, f.name)
            if v is None and "None" in parts:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                kind = " or ".join(sorted(parts - {"None"}, reverse=True) + (["None"] if "None" in parts else []))
                raise AccelError(f"{self.name or type(self).__name__}: {f.name} must be a number ({kind}), got {v!r}")

    def validate(self) -> None:
        """Raise ``AccelError`` naming any knob that is out of range."""

    #: layer modes and head kinds this policy's plans use (beyond "full"); ``check_plan`` holds a plan to them
    plan_modes: ClassVar[tuple[str, ...]] = ("full",)
    head_kinds: ClassVar[tuple[str, ...]] = ()
    #: ``"module:function"`` of the policy's calibrator, ``calibrate(model, tokenizer, texts=None, **options) ->
    #: Plan`` (``accel.calibrate``, ``accel plan``); None: the policy's plan needs no calibration
    calibrator: ClassVar[str | None] = None

    def not_supported_reasons(self, info: ModelInfo) -> list[str]:
        return []

    #: every decision of the policy is made per KV head from that head's own query heads, so a tensor-parallel
    #: rank holding a slice of the heads computes on them exactly what one process computes
    #: (``accel.patching.tensor_parallel``); policies that combine heads leave it False or explain below
    per_kv_head: ClassVar[bool] = False

    def tensor_parallel_problem(self, plan: Plan | None = None) -> str | None:
        """Why this policy (with ``plan``) cannot run on one rank's slice of the heads (None: it can)."""
        if self.per_kv_head:
            return None
        return "its decisions have not been shown to be per KV head"

    def check_plan(self, plan: Plan) -> None:
        """Refuse a plan whose layer modes or head kinds this policy does not execute."""
        check_plan_fields(plan, self.name, self.plan_modes, self.head_kinds)
        self.check_plan_params(plan)

    def check_plan_params(self, plan: Plan) -> None:
        """Refuse a plan whose method-specific fields (calibration settings, per-head values) this policy's options
        cannot run exactly (alone or composed with other policies)."""

    def check_plan_knobs(self, plan: Plan) -> None:
        """For a policy that reads its knobs through ``plan_knob`` (the plan's ``params``, then each layer's, override
        the options): refuse, in one line naming where, a value the options themselves would refuse (a mistyped
        value in an edited plan file), instead of an error in the middle of a decode step."""
        from ..errors import PlanValidationError

        names = {f.name for f in dataclasses.fields(self)}
        base = {k: v for k, v in (plan.params or {}).items() if k in names}
        layers = [(f"layers[{i}].params", lp.mode, {**base, **{k: v for k, v in lp.params.items() if k in names}})
                  for i, lp in enumerate(plan.layers) if lp.params]
        where = [("params", base)] + [(at, over) for at, _, over in layers]
        for at, over in where:
            try:
                dataclasses.replace(self, **over)  # validates
            except AccelError as e:
                raise PlanValidationError(f"{at}: {e}") from None
        # an option the user set and a plan that sets it otherwise: which one runs would be a silent choice
        # (a layer the plan runs dense reads none of them)
        explicit = self.explicit_knobs()
        run = [("params", base)] + [(at, over) for at, mode, over in layers if mode != "full"]
        clashes = [(at, k, k, v) for at, over in run for k, v in over.items()
                   if k in explicit and not _same_value(v, getattr(self, k))]
        layer_topk = [(f"layers[{i}]", lp.topk) for i, lp in enumerate(plan.layers)
                      if lp.topk is not None and lp.mode != "full"]
        if "topk" in explicit:
            clashes += [(at, "topk", "topk", v) for at, v in layer_topk if not _same_value(v, getattr(self, "topk"))]
        # a budget ratio the user set is never used where the plan fixes the layer's budget in tokens
        for k in ("topk_ratio", "min_topk"):
            if k in explicit and "topk" in names and getattr(self, "topk") is None:
                clashes += [(at, k, "topk", over["topk"]) for at, over in run if over.get("topk") is not None]
                clashes += [(at, k, "topk", v) for at, v in layer_topk]
        if clashes:
            at, k, theirs, v = clashes[0]
            raise PlanValidationError(
                f"{self.name}: option {k}={getattr(self, k)!r} contradicts the plan's {at} {theirs}={v!r}; drop the "
                f"option to run the plan's value, or edit the plan (or build one without a plan file) to run yours")

    def explicit_knobs(self) -> frozenset:
        """The knobs the user set: those given to ``from_overrides`` (``patch(..., knob=)``, ``"name@knob="``,
        ``--set``), or for a policy object built directly, those that differ from their defaults."""
        given = getattr(self, "_explicit", None)
        if given is not None:
            return given
        out = set()
        for f in dataclasses.fields(self):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                out.add(f.name)
                continue
            if not _same_value(getattr(self, f.name), default):
                out.add(f.name)
        return frozenset(out)

    def build_plan(self, info: ModelInfo) -> Plan:
        return Plan.uniform(
            self.name, info.num_layers,
            attention=self.name if self.kind == "attention" else "dense",
            kv=self.name if self.kind == "kv" else None,
            num_kv_heads=info.num_kv_heads, model_type=info.model_type, **self.knobs(),
        )

    def knobs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}

    @classmethod
    def from_overrides(cls, **overrides):
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        bad = set(overrides) - fields
        if bad:
            import difflib

            close = {b: difflib.get_close_matches(b, sorted(fields), n=1) for b in sorted(bad)}
            hint = "; ".join(f"did you mean {c[0]!r} for {b!r}?" for b, c in close.items() if c)
            raise AccelError(
                f"policy {cls.name!r} has no option(s) {sorted(bad)}; its options are {sorted(fields) or 'none'}"
                + (f" ({hint})" if hint else "")
            )
        obj = cls(**overrides)
        object.__setattr__(obj, "_explicit", frozenset(overrides))
        return obj


class AttentionPolicy(Policy):
    kind: ClassVar[str] = "attention"

    def plan_knob(self, ctx: LayerContext, name: str):
        """A knob as the plan sets it (the layer's ``params``, then the plan's), else the policy's own value: an edited
        plan file takes effect."""
        for params in (ctx.plan.params, ctx.runtime.plan.params):
            if params and name in params:
                return params[name]
        return getattr(self, name)

    def prefill(self, ctx: LayerContext, query, key, value, attention_mask, scaling, **kwargs):
        return hf_sdpa(ctx.module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    def decode(self, ctx: LayerContext, query, key, value, attention_mask, scaling, **kwargs):
        return dense_decode(ctx, query, key, value, attention_mask, scaling)


class KVCachePolicy(Policy):
    kind: ClassVar[str] = "kv"

    def after_prefill(self, ctx: LayerContext, query, attention_mask) -> None:
        """Compress ``ctx.cache_layer`` after the prompt's KV was written."""

    def after_decode(self, ctx: LayerContext, query, attention_mask) -> None:
        """Evict from ``ctx.cache_layer`` after a decode step."""

    def accumulates(self, ctx: LayerContext) -> bool:
        """Whether this step's decode attention should add each kept token's attention to its eviction score."""
        return False

    def prefill_statistics(self, query, keys, valid, scaling) -> dict:
        """What a shared dense prefill records in each full-attention layer for this policy to compress a copy of
        its cache later (``{name: tensor}``; read back through ``PrefillView``). Position-only policies need none."""
        return {}


def check_plan_fields(plan: Plan, name: str, modes, kinds) -> None:
    from ..errors import PlanValidationError

    for i, lp in enumerate(plan.layers):
        if lp.mode not in modes:
            raise PlanValidationError(f"layers[{i}].mode: {lp.mode!r} is not a mode policy {name!r} executes "
                                      f"({', '.join(modes)}); use a plan made for {name!r}")
        for j, hp in enumerate(lp.heads or []):
            if hp.kind != "full" and hp.kind not in kinds:
                raise PlanValidationError(f"layers[{i}].heads[{j}].kind: {hp.kind!r} is not a head kind policy {name!r} "
                                          f"executes ({', '.join(('full',) + tuple(kinds))}); use a plan made for {name!r}")


@dataclass
class ComposedPolicy:
    """One attention policy plus any number of KV-cache policies on the same model."""

    attention: AttentionPolicy
    kv: list[KVCachePolicy]

    @property
    def name(self) -> str:
        return "+".join([self.attention.name] + [p.name for p in self.kv])

    def build_plan(self, info: ModelInfo) -> Plan:
        planned = [p for p in self.kv if getattr(p, "needs_plan", False)]
        if planned:  # a calibrated KV plan (per-head fields) is the base; attention stays per layer
            plan = planned[0].build_plan(info)
            for lp in plan.layers:
                lp.attention = self.attention.name
            plan.policy = self.name
            return plan
        plan = self.attention.build_plan(info)
        plan.policy = self.name
        if self.kv:
            kv_name = "+".join(p.name for p in self.kv)
            for lp in plan.layers:
                lp.kv = kv_name
            for p in self.kv:
                plan.params.update({f"{p.name}.{k}": v for k, v in p.knobs().items()})
        return plan

    def check_plan(self, plan: Plan) -> None:
        parts = [self.attention, *self.kv]
        modes = tuple(dict.fromkeys(m for p in parts for m in p.plan_modes))
        kinds = tuple(dict.fromkeys(k for p in parts for k in p.head_kinds))
        check_plan_fields(plan, self.name, modes, kinds)
        for p in parts:
            p.check_plan_params(plan)
