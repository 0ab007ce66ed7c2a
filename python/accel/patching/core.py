"""``accel.patch()``: scoped, reversible patching through transformers' public extension points.

What patching does to a model, and nothing else:
  1. registers accel's attention function under the name "accel" in transformers'
     ``AttentionInterface`` (once per process) and switches the model's configs to it with
     ``set_attn_implementation`` -- the original values are recorded;
  2. adds one forward pre-hook (``register_forward_pre_hook(with_kwargs=True)``) on the top-level
     model that gives each new generation an ``AccelCache`` and checks the inputs;
  3. records which attention module is which layer in a weak dictionary outside the model.
``PatchHandle.remove()`` undoes exactly these, so the model is as it was (parameters are never touched).
"""
from __future__ import annotations

import logging
import weakref
from pathlib import Path

import torch

from ..cache.accel_cache import AccelCache
from ..errors import AccelError, AlreadyPatchedError, InputError
from ..models.registry import get_adapter
from ..policies.base import ComposedPolicy, KVCachePolicy, LayerContext
from ..policies.registry import make_policy
from ..scheduler.plan import Plan
from .attention_fn import ATTN_NAME, MODULE_RUNTIME, ensure_registered

logger = logging.getLogger("accel")

_PATCHED: "weakref.WeakKeyDictionary[torch.nn.Module, PatchHandle]" = weakref.WeakKeyDictionary()


class ModelRuntime:
    """Per-patched-model state shared by all layers during a forward pass."""

    def __init__(self, model, adapter, info, policy, plan: Plan, reserve: int, check_context: bool):
        self.model_ref = weakref.ref(model)
        self.adapter = adapter
        self.info = info
        if isinstance(policy, ComposedPolicy):
            self.attention, self.kv = policy.attention, list(policy.kv)
        elif isinstance(policy, KVCachePolicy):
            from ..policies.dense import DensePolicy

            self.attention, self.kv = DensePolicy(), [policy]
        else:
            self.attention, self.kv = policy, []
        self.policy = policy
        self.plan = plan
        self.reserve = reserve
        self.check_context = check_context
        self.cache: AccelCache | None = None
        self.layer_state: dict[int, dict] = {}
        self.shared: dict = {}  # cross-layer data within a step (e.g. donor indices)
        self.step = 0
        #: decode-time accounting: KV bytes the attention of decode calls read (dense spans, selected
        #: rows, scoring passes) and the number of layer-level decode calls; ``accel bench`` reports
        #: bytes per step from them instead of assuming a dense read
        self.stats = {"kv_read_bytes": 0, "decode_layer_calls": 0}
        #: prefill statistics to record into the cache (``{"window": w, "colsum": bool}``), so KV-cache
        #: policies can compress a copy of this cache later (the evaluation harness's shared prefill)
        self.record_stats: dict | None = None
        #: layers whose selection a later layer reuses (they emit their top-k every decode step)
        self.donors = frozenset(lp.reuse_src for lp in plan.layers if lp.mode == "reuse")

    def new_sequence(self) -> None:
        self.layer_state = {}
        self.shared = {}
        self.step = 0

    def context(self, layer_idx: int, module) -> LayerContext:
        cache_layer = None
        if self.cache is not None and layer_idx < len(self.cache.layers):
            cache_layer = self.cache.layers[layer_idx]
        return LayerContext(
            layer_idx=layer_idx, module=module, plan=self.plan.layers[layer_idx], runtime=self,
            cache_layer=cache_layer, state=self.layer_state.setdefault(layer_idx, {}),
        )

    def attend(self, layer_idx, module, query, key, value, attention_mask, scaling, **kwargs):
        ctx = self.context(layer_idx, module)
        if query.shape[2] == 1:
            self.stats["decode_layer_calls"] += 1
            out = self.attention.decode(ctx, query, key, value, attention_mask, scaling, **kwargs)
            for p in self.kv:
                p.after_decode(ctx, query, attention_mask)
        elif ctx.cache_layer is not None and ctx.cache_layer.ragged is not None:
            from .attention_fn import ragged_prefill

            out = ragged_prefill(ctx, query, scaling)
        else:
            out = None
            for p in self.kv:  # a KV policy may sparsify the prefill too (MoA)
                if out is None and hasattr(p, "prefill_attention"):
                    out = p.prefill_attention(ctx, query, key, value, attention_mask, scaling)
            if out is None:
                out = self.attention.prefill(ctx, query, key, value, attention_mask, scaling, **kwargs)
            if isinstance(out, tuple):
                out = out[0]
            if self.record_stats and self.cache is not None:
                self._record(layer_idx, query, key, attention_mask, scaling)
            for p in self.kv:
                p.after_prefill(ctx, query, attention_mask)
        return out, None

    def _record(self, layer_idx, query, key, attention_mask, scaling) -> None:
        from ..policies.kvcompress import column_sums, prompt_valid

        st = {}
        w = int(self.record_stats.get("window", 0) or 0)
        if w:
            st["q_window"] = query[:, :, -w:].detach().clone()
        if self.record_stats.get("colsum"):
            valid = prompt_valid(attention_mask, query.shape[0], key.shape[2])
            st["colsum"] = column_sums(query, key, valid, scaling or query.shape[-1] ** -0.5)
        if not hasattr(self.cache, "prefill_stats"):
            self.cache.prefill_stats = {}
        self.cache.prefill_stats[layer_idx] = st

    # -- the pre-hook -------------------------------------------------------------------------------
    def pre_forward(self, module, args, kwargs):
        pkv = prepare_forward(module, args, kwargs, lambda: AccelCache(module.config, reserve=self.reserve),
                              self.info.max_context if self.check_context else None)
        if isinstance(pkv, AccelCache):
            if pkv is not self.cache:
                self.new_sequence()
            self.cache = pkv
        else:
            if self.cache is not None:
                self.new_sequence()
            self.cache = None
        if pkv is None or pkv.get_seq_length() == 0:
            self.new_sequence()
        else:
            self.step += 1
        return args, kwargs


def prepare_forward(module, args, kwargs, make_cache, context_limit: int | None):
    """What every accel pre-forward hook does on the top-level model: refuse an empty prompt, give a new
    generation (no cache, or transformers' fresh ``DynamicCache``) the cache ``make_cache()`` builds, refuse a
    sequence longer than ``context_limit`` (None = no check) and a right-padded batch. Edits ``kwargs`` in place;
    returns the cache the forward will use (or None)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if ref is not None and ref.shape[1] == 0:
        raise InputError("empty prompt: the input has 0 tokens; give at least one token")
    q_len = ref.shape[1] if ref is not None else 0
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", True)
    pkv = kwargs.get("past_key_values")
    if use_cache and not module.training:
        from transformers.cache_utils import DynamicCache

        if pkv is None or (type(pkv) is DynamicCache and pkv.get_seq_length() == 0):
            pkv = make_cache()
            kwargs["past_key_values"] = pkv
    past = pkv.get_seq_length() if pkv is not None else 0
    if context_limit and past + q_len > context_limit:
        raise InputError(
            f"sequence of {past + q_len} tokens ({past} cached + {q_len} new) exceeds the model's context "
            f"window of {context_limit} tokens (config.max_position_embeddings); shorten the prompt or lower "
            "max_new_tokens (or patch with check_context=False to run past it anyway)"
        )
    am = kwargs.get("attention_mask")
    if past == 0 and isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[0] > 1:
        a = am.bool()
        # a row is left-padded (or unpadded) iff once a 1 appears, no 0 follows
        seen = torch.cumsum(a.int(), dim=1) > 0
        if bool((seen & ~a).any()):
            raise InputError(
                "the batch is right-padded (a 0 follows a 1 in attention_mask); decoder-only generation needs "
                "left padding: set tokenizer.padding_side = 'left' before tokenizing"
            )
    return pkv


def _tpla_spec(policy):
    """``(inline options, policy object)`` when ``policy`` asks for TPLA, else None."""
    from ..policies.registry import split_spec

    if isinstance(policy, str):
        parts = [p.strip() for p in policy.split("+") if p.strip()]
        names = [split_spec(p)[0] for p in parts]
        if "tpla" not in names:
            return None
        if len(parts) > 1:
            raise AccelError("tpla replaces the attention of MLA models and does not compose with other policies yet; "
                             "use policy='tpla' alone")
        return split_spec(parts[0])[1], None
    if getattr(policy, "name", None) == "tpla":
        return {}, policy
    return None


class HandleBase:
    """Context-manager and repr plumbing shared by accel's patch handles (``remove``, ``summary`` and ``active``
    come from the subclass)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        return f"<{type(self).__name__} {'active' if self.active else 'removed'}: {self.summary()}>"


class PatchHandle(HandleBase):
    """Returned by ``accel.patch``. A context manager; ``remove()`` restores the model exactly."""

    def __init__(self, model, runtime: ModelRuntime, hook, saved_impls, fast_linears=(), extra_hooks=()):
        self._model_ref = weakref.ref(model)
        self._extra_hooks = list(extra_hooks)
        self._fast_linears = list(fast_linears)
        self.runtime = runtime
        self._hook = hook
        self._saved_impls = saved_impls
        self.active = True

    @property
    def plan(self) -> Plan:
        return self.runtime.plan

    @property
    def policy(self):
        return self.runtime.policy

    @property
    def cache(self) -> AccelCache | None:
        """The cache of the most recent forward pass (for KV-byte accounting)."""
        return self.runtime.cache

    def summary(self) -> str:
        info = self.runtime.info
        modes: dict[str, int] = {}
        for lp in self.plan.layers:
            key = lp.mode if lp.mode != "reuse" else "reuse"
            modes[key] = modes.get(key, 0) + 1
        mode_s = ", ".join(f"{k}: {v}" for k, v in sorted(modes.items()))
        return (f"accel policy={self.runtime.policy.name} on {info.model_type} "
                f"({info.num_layers} layers, {info.num_heads}/{info.num_kv_heads} heads, head_dim {info.head_dim}); "
                f"layers by mode: {mode_s}")

    def remove(self) -> None:
        if not self.active:
            return
        model = self._model_ref()
        self._hook.remove()
        for h in self._extra_hooks:
            h.remove()
        self._extra_hooks = []
        from .linear import unbind_fast_linear

        unbind_fast_linear(self._fast_linears)
        self._fast_linears = []
        if model is not None:
            for cfg, impl in self._saved_impls:
                cfg._attn_implementation_internal = impl
            for m in self.runtime.adapter.attention_modules():
                MODULE_RUNTIME.pop(m, None)
            _PATCHED.pop(model, None)
        self.runtime.cache = None
        self.active = False


def patch(model, policy="dense", plan: Plan | str | Path | dict | None = None, *, reserve: int = 0,
          check_context: bool = True, fast_linear: bool = True, **overrides) -> PatchHandle:
    """Patch a loaded transformers model in place.

    Args:
        model: a ``*ForCausalLM`` of a supported architecture (see ``accel.supported_model_types()``),
            or a supported VLM for the visual-token policies (``accel.vlm.adapters.supported_vlm_types()``).
        policy: a registered policy name (``accel.list_policies()``), a composition
            ``"attention+kv"`` (e.g. ``"hylra+snapkv"``, or ``"fastervlm+hylra"`` on a VLM) or a policy object.
        plan: a ``Plan`` (or path / dict of one) from the scheduler; default: the policy's own plan.
        reserve: tokens to preallocate per layer in accel's cache (0 = grow as needed).
        check_context: raise when prompt + generated tokens exceed the model's context window.
        fast_linear: on CPU, run decode-time (<= 8 rows) linear layers with accel's GEMV kernel
            (``accel.patching.linear``); numerically fp32-equivalent to BLAS, ~1.7x faster here.
        **overrides: policy knobs, e.g. ``topk=512``; ``name.knob=value`` targets one policy of a
            composition.
    Returns:
        a ``PatchHandle`` (context manager, ``.remove()``).
    """
    if model in _PATCHED:
        prev = _PATCHED[model]
        raise AlreadyPatchedError(
            f"this model is already patched by accel (policy {prev.policy.name!r}); call "
            "handle.remove() (or accel.unpatch(model)) before patching it again"
        )
    tpla = _tpla_spec(policy)
    if tpla is not None:  # MLA models: TPLA swaps the attention modules (accel.tpla)
        from ..tpla.patch import patch_tpla

        opts, obj = tpla
        if obj is not None and overrides:
            raise AccelError("pass overrides either to the policy object or to patch(), not both")
        calib = {k: overrides.pop(k) for k in ("calibration", "pca") if k in overrides}
        return patch_tpla(model, plan=plan, check_context=check_context, **calib,
                          **({"_policy_obj": obj} if obj is not None else {**overrides, **opts}))
    from ..vlm.runtime import patch_vlm, split_visual

    vpol, lm_spec, lm_overrides = split_visual(policy, overrides)
    if vpol is not None:  # a visual-token policy (VLMs), optionally composed with an LM-side one
        return patch_vlm(model, vpol, lm_spec, plan=plan, lm_overrides=lm_overrides, reserve=reserve,
                         check_context=check_context, fast_linear=fast_linear)
    adapter = get_adapter(model)
    info = adapter.info()
    pol = make_policy(policy, overrides)
    reasons = []
    for p in ([pol.attention] + list(pol.kv)) if isinstance(pol, ComposedPolicy) else [pol]:
        reasons += p.not_supported_reasons(info)
    if reasons:
        from ..errors import AccelError

        raise AccelError(f"policy {pol.name!r} cannot run on this model: " + "; ".join(reasons))
    plan_obj = pol.build_plan(info) if plan is None else Plan.coerce(plan)
    plan_obj.validate(num_layers=info.num_layers, num_kv_heads=info.num_kv_heads)

    ensure_registered()
    runtime = ModelRuntime(model, adapter, info, pol, plan_obj, reserve, check_context)
    # record every config whose attention implementation we change
    saved = []
    seen = set()
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal") and id(cfg) not in seen:
            seen.add(id(cfg))
            saved.append((cfg, cfg._attn_implementation_internal))
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:  # pragma: no cover - defensive
        for cfg, impl in saved:
            cfg._attn_implementation_internal = impl
        raise RuntimeError("transformers refused accel's attention implementation")
    for i, m in enumerate(adapter.attention_modules()):
        MODULE_RUNTIME[m] = (runtime, getattr(m, "layer_idx", i))
    hook = model.register_forward_pre_hook(runtime.pre_forward, with_kwargs=True)
    # policy-owned forward hooks (e.g. RefreshKV reads the pre-RoPE query); removed with the patch
    extra_hooks = []
    for p in ([pol.attention] + list(pol.kv)) if isinstance(pol, ComposedPolicy) else [pol]:
        if hasattr(p, "install"):
            extra_hooks += p.install(runtime, adapter)
    fast = []
    if fast_linear:
        from .linear import bind_fast_linear

        fast = bind_fast_linear(model.modules())
    handle = PatchHandle(model, runtime, hook, saved, fast, extra_hooks)
    _PATCHED[model] = handle
    logger.info("%s", handle.summary())
    return handle


def unpatch(model) -> bool:
    """Remove accel from ``model`` if patched; returns whether it was."""
    h = _PATCHED.get(model)
    if h is None:
        return False
    h.remove()
    return True


def get_handle(model) -> PatchHandle | None:
    return _PATCHED.get(model)
