"""Policy registry: name -> class, with lazy imports and helpful unknown-name errors."""
from __future__ import annotations

import difflib
import importlib

from ..errors import AccelError, UnknownPolicyError

_REGISTRY: dict[str, type] = {}
# name -> "module:Class" for policies whose module is imported only when first asked for
_LAZY: dict[str, str] = {
    "dense": "accel.policies.dense:DensePolicy",
    "hylra": "accel.policies.hylra:HyLRAPolicy",
    "delta": "accel.policies.delta:DeltaPolicy",
    "recycled": "accel.policies.recycled:RecycledPolicy",
    "streaming": "accel.policies.streaming:StreamingLLMPolicy",
    "snapkv": "accel.policies.snapkv:SnapKVPolicy",
    "pyramidkv": "accel.policies.pyramidkv:PyramidKVPolicy",
    "h2o": "accel.policies.h2o:H2OPolicy",
    "duo": "accel.policies.duo:DuoAttentionPolicy",
    "taskkv": "accel.policies.taskkv:TaskKVPolicy",
    "moa": "accel.policies.moa:MoAPolicy",
    "auto": "accel.policies.auto:AutoPolicy",
    "quest": "accel.policies.quest:QuestPolicy",
    "hip": "accel.policies.hip:HiPPolicy",
    "tca": "accel.policies.tca:TCAPolicy",
    "flux": "accel.policies.flux:FluxPolicy",
    # visual-token pruning (VLMs): act before the language model, compose with the policies above
    "fastervlm": "accel.policies.fastervlm:FasterVLMPolicy",
    "flowcut": "accel.policies.flowcut:FlowCutPolicy",
    "fastv": "accel.policies.fastv:FastVPolicy",
    "randomprune": "accel.policies.randomprune:RandomPrunePolicy",
    "sgl": "accel.policies.sgl:SGLPolicy",
    # tensor-parallel latent attention for MLA models (DeepSeek-V2/V3): swaps the attention modules
    "tpla": "accel.tpla.policy:TPLAPolicy",
}


def register_policy(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_policies() -> list[str]:
    return sorted(set(_LAZY) | set(_REGISTRY))


def get_policy_class(name: str) -> type:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _LAZY:
        mod, cls = _LAZY[name].split(":")
        importlib.import_module(mod)
        return _REGISTRY[name]
    hint = difflib.get_close_matches(name, list_policies(), n=1)
    extra = f" Did you mean {hint[0]!r}?" if hint else ""
    raise UnknownPolicyError(f"unknown policy {name!r}. Registered policies: {', '.join(list_policies())}.{extra}")


def list_calibratable() -> list[str]:
    """Policies whose plan comes from calibration (``accel.calibrate`` / ``accel plan``)."""
    return [n for n in list_policies() if getattr(get_policy_class(n), "calibrator", None)]


def get_planner(policy):
    """The function that makes ``policy``'s plan when patching (``planner = "module:function"`` on its class, resolved
    on use like calibrators: ``fn(policy, model, info, plan) -> Plan``), None for a policy without one."""
    ref = getattr(policy, "planner", None)
    if not ref:
        return None
    mod, fn_name = ref.split(":")
    return getattr(importlib.import_module(mod), fn_name)


def get_calibrator(name: str):
    """The calibrator of policy ``name``: ``fn(model, tokenizer, texts=None, **options) -> Plan``, checking the
    options against its signature (one line naming the unknown option and the valid ones)."""
    import inspect

    cls = get_policy_class(name)
    ref = getattr(cls, "calibrator", None)
    if not ref:
        raise AccelError(f"policy {name!r} has no calibration (its plan is built from its options); calibratable "
                         f"policies: {', '.join(list_calibratable())}")
    mod, fn_name = ref.split(":")
    fn = getattr(importlib.import_module(mod), fn_name)
    params = inspect.signature(fn).parameters
    valid = [p for p in params if p not in ("model", "tokenizer", "texts")]

    def calibrate(model, tokenizer, texts=None, **options):
        bad = sorted(set(options) - set(valid))
        if bad:
            what = f"option {bad[0]} does" if len(bad) == 1 else f"options {', '.join(bad)} do"
            raise AccelError(f"calibrate({name}): {what} not apply; its options are {', '.join(valid)}")
        return fn(model, tokenizer, texts, **options)

    calibrate.options = valid
    calibrate.__doc__ = fn.__doc__
    return calibrate


def split_spec(part: str) -> tuple[str, dict]:
    """``"snapkv@budget_ratio=0.25@window=16"`` -> ("snapkv", {"budget_ratio": 0.25, "window": 16}): a
    policy with its options inline, so one evaluation can compare several budgets of one policy."""
    base, *opts = part.split("@")
    return base.strip(), parse_options(opts, f"policy option in {part!r} (e.g. snapkv@budget_ratio=0.25)")


def parse_options(items, what: str = "option") -> dict:
    """``["k=v", ...]`` -> ``{k: JSON value of v, or the string}`` (``--set`` and ``name@k=v`` specs). Python's
    ``True`` / ``False`` / ``None`` read as JSON's ``true`` / ``false`` / ``null`` (the string "False" would be a true
    value)."""
    import json

    literals = {"True": True, "False": False, "None": None}
    out = {}
    for it in items or []:
        if "=" not in it:
            raise AccelError(f"{what} expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        if v.strip() in literals:
            out[k] = literals[v.strip()]
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def make_policy(spec, overrides: dict | None = None):
    """Build a policy object from a name (``"dense"``), a composition (``"hylra+snapkv"`` or a list of
    names), names with inline options (``"snapkv@budget_ratio=0.25"``) or an existing policy object. Overrides go to the attention policy unless prefixed with a
    policy name and a dot (``snapkv.budget=512``)."""
    from .base import AttentionPolicy, ComposedPolicy, KVCachePolicy, Policy

    overrides = dict(overrides or {})
    if isinstance(spec, (Policy, ComposedPolicy)):
        if overrides:
            raise AccelError("pass overrides either to the policy object or to patch(), not both")
        return spec
    inline: dict[str, dict] = {}
    if isinstance(spec, str):
        names = []
        for part in (s.strip() for s in spec.split("+")):
            if not part:
                continue
            base, opts = split_spec(part)
            names.append(base)
            inline[base] = opts
    elif isinstance(spec, (list, tuple)):
        names = [str(s) for s in spec]
    else:
        raise AccelError(f"policy must be a name, a list of names or a Policy object, got {type(spec).__name__}")
    if not names:
        raise UnknownPolicyError(f"empty policy name. Registered policies: {', '.join(list_policies())}")
    classes = [get_policy_class(n) for n in names]
    per: dict[str, dict] = {n: {} for n in names}
    for key, val in overrides.items():
        if "." in key:
            pname, knob = key.split(".", 1)
            if pname not in per:
                raise AccelError(f"override {key!r} names policy {pname!r}, which is not in {names}")
            per[pname][knob] = val
        else:
            per[names[0]][key] = val
    for n, opts in inline.items():
        per[n].update(opts)  # options written into the spec win over global overrides
    objs = [cls.from_overrides(**per[n]) for n, cls in zip(names, classes)]
    alone = [o.name for o in objs if getattr(o, "alone", False)]
    if alone and len(objs) > 1:
        raise AccelError(f"{alone[0]!r} plans every layer and head itself and runs alone; use policy={alone[0]!r} "
                         f"without {'+'.join(o.name for o in objs if o.name != alone[0])}")
    attn = [o for o in objs if isinstance(o, AttentionPolicy)]
    kv = [o for o in objs if isinstance(o, KVCachePolicy)]
    if len(attn) > 1:
        raise AccelError(f"at most one attention policy per model, got {[o.name for o in attn]}; keep one of them "
                         "(attention policies compose with KV-cache policies, e.g. 'hylra+snapkv')")
    if not attn:
        attn = [get_policy_class("dense")()]
    if kv and not getattr(attn[0], "supports_compressed_cache", False):
        raise AccelError(
            f"{attn[0].name!r} decode over a compressed cache ({'+'.join(o.name for o in kv)}) is not supported yet: "
            f"use the KV policy alone (dense attention over the kept tokens), e.g. policy={kv[0].name!r}"
        )
    planned = [o.name for o in kv if getattr(o, "needs_plan", False)]
    if planned and attn[0].name != "dense":
        raise AccelError(
            f"{attn[0].name!r} over {planned[0]!r} is not supported yet: both need their own plan (layer modes and "
            f"per-head fields); compose {attn[0].name!r} with a plan-free KV policy (streaming, snapkv, pyramidkv, "
            f"h2o, taskkv), e.g. '{attn[0].name}+snapkv', or use {planned[0]!r} alone"
        )
    if len(objs) == 1 and isinstance(objs[0], AttentionPolicy):
        return objs[0]
    return ComposedPolicy(attention=attn[0], kv=kv)
