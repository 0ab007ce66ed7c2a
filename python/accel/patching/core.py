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
import threading
import weakref
from pathlib import Path

import torch

from .. import compat
from ..cache.accel_cache import AccelCache
from ..errors import AccelError, AlreadyPatchedError, InputError
from ..models.registry import get_adapter
from ..policies.base import ComposedPolicy, KVCachePolicy, LayerContext
from ..policies.registry import make_policy
from ..scheduler.plan import Plan
from .attention_fn import ATTN_NAME, MODULE_RUNTIME, ensure_registered

logger = logging.getLogger("accel")

_PATCHED: "weakref.WeakKeyDictionary[torch.nn.Module, PatchHandle]" = weakref.WeakKeyDictionary()


class _SequenceState(threading.local):
    """What one generation carries between forward passes: its cache, per-layer policy state, cross-layer data
    within a step and the step counter. Thread-local, so two threads may generate with one patched model."""

    def __init__(self):
        self.cache = None
        self.layer_state: dict[int, dict] = {}
        self.shared: dict = {}
        self.step = 0
        self.attn_calls = 0


def _seq_attr(name):
    return property(lambda self: getattr(self._seq, name), lambda self, v: setattr(self._seq, name, v))


class ModelRuntime:
    """Per-patched-model state shared by all layers during a forward pass. The per-generation part (cache,
    layer state, step) lives in a thread-local ``_SequenceState``."""

    cache = _seq_attr("cache")
    layer_state = _seq_attr("layer_state")
    shared = _seq_attr("shared")
    step = _seq_attr("step")
    attn_calls = _seq_attr("attn_calls")

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
        self._seq = _SequenceState()
        #: serialises the KV policies' prefill compression and decode eviction across threads (the policy
        #: objects keep scratch state while they compress)
        self.lock = threading.RLock()
        self.last_cache: AccelCache | None = None
        #: the keyword this model's forward takes its cache by (``cache`` on transformers 5.24+)
        self.cache_arg = compat.cache_arg_name(type(model).forward)
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
            if self.kv:
                with self.lock:
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
            if self.kv:
                with self.lock:
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
                              self.info.max_context if self.check_context else None, self.cache_arg,
                              policy_name=self.policy.name)
        self.check_features(module, kwargs)
        self.attn_calls = 0
        if isinstance(pkv, AccelCache):
            if pkv is not self.cache:
                self.new_sequence()
            self.cache = pkv
            self.last_cache = pkv  # the most recent cache of any thread (PatchHandle.cache)
        else:
            if self.cache is not None:
                self.new_sequence()
            self.cache = None
        if pkv is None or pkv.get_seq_length() == 0:
            self.new_sequence()
        else:
            self.step += 1
        return args, kwargs

    def check_features(self, module, kwargs) -> None:
        """Refuse forward options this policy cannot serve exactly (before anything runs)."""
        oa = kwargs.get("output_attentions")
        if oa is None:
            oa = getattr(module.config, "output_attentions", False)
        if oa:
            if not self.is_dense():
                raise InputError(
                    f"output_attentions=True with policy {self.policy.name!r}: the policy does not compute the full "
                    "attention matrix transformers would return; drop output_attentions or patch with policy='dense'"
                )
            kwargs["output_attentions"] = True  # set on the config only: the attention function must see it too
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if self.kv and not use_cache and not module.training:
            raise InputError(
                f"use_cache=False with KV-cache policy {self.policy.name!r}: the policy compresses the cache, and "
                "without one there is nothing to compress; pass use_cache=True or patch with an attention-only policy"
            )

    def __deepcopy__(self, memo):
        raise AccelError("a model patched by accel cannot be deep-copied (its hooks would run the original model's "
                         "runtime); copy it before accel.patch or after handle.remove()")

    def reset_sequences(self) -> None:
        """Drop every thread's generation state (``remove()``): no cache outlives the patch."""
        self._seq = _SequenceState()
        self.last_cache = None

    def check_generate(self, model, args, kwargs) -> None:
        """What ``generate()`` is asked for, checked before it runs (``accel.patching.core.GenerateGuard``)."""
        check_generate_request(model, args, kwargs, policy_name=self.policy.name, dense=self.is_dense(),
                               context_limit=self.info.max_context if self.check_context else None)

    def is_dense(self) -> bool:
        return not self.kv and getattr(self.attention, "name", None) == "dense"

    def post_forward(self, module, args, kwargs, output):
        """The take-over check: a patched forward must have run accel's attention in every layer and kept
        accel's cache. Anything else means transformers routed around accel (e.g. a release that changed how the
        cache or the attention function is passed): refuse instead of returning unaccelerated or wrong output."""
        if module.training:
            return output
        n_layers = self.info.num_layers
        if self.attn_calls < n_layers:
            raise AccelError(
                f"accel's attention ran in {self.attn_calls} of {n_layers} layers of this forward: transformers "
                f"{compat.transformers_version()} did not route attention through accel; accel supports transformers "
                f"{compat.window_text()} ({compat.install_hint()})"
            )
        expected = self.cache
        if expected is not None:
            got = compat.output_cache(output)
            if got is not None and got is not expected:
                raise AccelError(
                    f"this forward used a {type(got).__name__} instead of accel's cache: transformers "
                    f"{compat.transformers_version()} did not take accel's cache; accel supports transformers "
                    f"{compat.window_text()} ({compat.install_hint()})"
                )
        return output


def prepare_forward(module, args, kwargs, make_cache, context_limit: int | None, cache_arg: str = "past_key_values",
                    policy_name: str = "accel"):
    """What every accel pre-forward hook does on the top-level model: refuse an empty prompt, give a new
    generation (no cache, or transformers' fresh ``DynamicCache``) the cache ``make_cache()`` builds, refuse a
    cache accel cannot decode on (a ``StaticCache``, a filled cache of another class), a sequence longer than
    ``context_limit`` (None = no check) and a right-padded batch. The cache is passed on under ``cache_arg``
    (``cache`` on transformers 5.24+, ``past_key_values`` before), whichever name the caller used. Edits ``kwargs``
    in place; returns the cache the forward will use (or None)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if ref is not None and ref.shape[1] == 0:
        raise InputError("empty prompt: the input has 0 tokens; give at least one token")
    q_len = ref.shape[1] if ref is not None else 0
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", True)
    pkv = compat.take_cache(kwargs)
    if pkv is not None and not isinstance(pkv, AccelCache):
        refuse_foreign_cache(pkv, policy_name)
    if use_cache and not module.training:
        if pkv is None or not isinstance(pkv, AccelCache):
            pkv = make_cache()
    if pkv is not None:
        kwargs[cache_arg] = pkv
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


def check_generate_request(model, args, kwargs, *, policy_name: str, dense: bool, context_limit: int | None) -> None:
    """Refuse, before ``generate()`` produces anything, what accel cannot serve exactly as planned: a cache
    implementation of transformers' own (accel decodes on its cache), assisted / prompt-lookup decoding and
    ``output_attentions`` with a non-dense policy, and a request longer than the context window."""
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def opt(name):
        if kwargs.get(name) is not None:
            return kwargs[name]
        return getattr(gc, name, None) if gc is not None else None

    impl = opt("cache_implementation")
    # "dynamic" builds an empty DynamicCache (accel replaces it); "hybrid", which Gemma checkpoints ship, is dropped
    # by transformers itself; any other cache implementation would be transformers' own preallocated cache
    if impl is not None and impl not in ("dynamic", "hybrid"):
        raise InputError(
            f"generate(cache_implementation={impl!r}) with accel policy {policy_name!r}: accel decodes on its own "
            "preallocated cache; drop cache_implementation (patch(model, reserve=N) preallocates N tokens) or remove "
            "the patch"
        )
    assisted = [n for n in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit") if opt(n)]
    if assisted and not dense:
        raise InputError(
            f"generate({assisted[0]}=...) with accel policy {policy_name!r}: assisted and prompt-lookup decoding verify "
            "several drafted tokens per step and roll the cache back, which this policy's compressed or sparse state "
            "cannot follow; use policy='dense' for assisted decoding, or generate without it"
        )
    oa = opt("output_attentions")
    if oa is None:
        oa = getattr(getattr(model, "config", None), "output_attentions", False)
    if oa and not dense:
        raise InputError(
            f"generate(output_attentions=True) with accel policy {policy_name!r}: the policy does not compute the full "
            "attention matrix transformers would return; drop output_attentions or patch with policy='dense'"
        )
    if context_limit:
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args and isinstance(args[0], torch.Tensor) else None))
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        n_in = int(ids.shape[1]) if ids is not None and ids.dim() >= 2 else 0
        new = opt("max_new_tokens")
        total = n_in + int(new) if new is not None else max(int(opt("max_length") or 0), n_in + 1)
        if total > context_limit:
            raise InputError(
                f"generate() asks for up to {total} tokens ({n_in} in the prompt + {total - n_in} new), which "
                f"exceeds the model's context window of {context_limit} tokens (config.max_position_embeddings); shorten the prompt or lower max_new_tokens (or patch with "
                "check_context=False to run past it anyway)"
            )


class EagerDecoder:
    """Keeps the patched decoder stack out of ``torch.compile`` graphs: an instance-level ``forward`` on the module
    that owns the layers, wrapped in ``torch.compiler.disable``; ``remove()`` deletes it.

    accel's decode runs its own kernels over a cache with per-sequence Python state (positions, growth, policy
    selections). Traced by Dynamo, that state either becomes guards that recompile the graph every step, or -- kept
    out with a break per layer -- splits the graph into per-layer pieces that Dynamo recompiles per ``layer_idx``
    (measured on SmolLM2 at 4K: compiled 0.71x of eager with a break in every attention module). With the decoder as
    one eager call, the compiled graph holds the rest (the LM head, as accel's ``small_m_linear`` custom op) and
    compiled decode runs at eager speed (``bench/bench_compile.py``)."""

    def __init__(self, decoder):
        self._ref = weakref.ref(decoder)
        self._had = "forward" in decoder.__dict__
        self._previous = decoder.__dict__.get("forward")
        self.fn = torch.compiler.disable(decoder.forward)
        decoder.forward = self.fn

    def remove(self) -> None:
        d = self._ref()
        if d is None or d.__dict__.get("forward") is not self.fn:
            return
        if self._had:
            d.forward = self._previous
        else:
            del d.__dict__["forward"]


class GenerateGuard:
    """Checks a ``generate()`` call before it runs. Installed as an instance attribute ``generate`` on the patched
    model (transformers has no pre-generate hook; forward hooks only see the first forward, after generate has
    prepared its caches and candidates) and deleted by ``remove()``, so the class's own ``generate`` is untouched."""

    def __init__(self, model, check):
        import inspect

        self._model_ref = weakref.ref(model)
        self._had = "generate" in model.__dict__
        self._previous = model.__dict__.get("generate")
        ref = self._model_ref

        def generate(*args, **kwargs):
            m = ref()
            check(m, args, kwargs)
            orig = self._previous if self._had else type(m).generate.__get__(m)
            return orig(*args, **kwargs)

        bound = model.generate
        generate.__signature__ = inspect.signature(bound)  # pipelines and generate read the signature
        generate.__doc__, generate.__name__ = bound.__doc__, "generate"
        self.fn = generate
        model.generate = generate

    def remove(self) -> None:
        m = self._model_ref()
        if m is None:
            return
        if m.__dict__.get("generate") is self.fn:
            if self._had:
                m.generate = self._previous
            else:
                del m.__dict__["generate"]


def refuse_foreign_cache(pkv, policy_name: str) -> None:
    """accel decodes on its own ``AccelCache``. transformers' fresh (empty) ``DynamicCache`` is replaced by one;
    any other cache object is refused with what to pass instead."""
    from transformers.cache_utils import DynamicCache, StaticCache

    if isinstance(pkv, StaticCache):
        raise InputError(
            f"a StaticCache (cache_implementation='static' or a user-built one) with accel policy {policy_name!r}: "
            "accel decodes on its own preallocated cache; drop cache_implementation / the cache (patch(model, "
            "reserve=N) preallocates N tokens) or remove the patch"
        )
    if type(pkv) is DynamicCache and pkv.get_seq_length() == 0:
        return
    if not hasattr(pkv, "get_seq_length"):
        raise InputError(f"a cache of type {type(pkv).__name__} was passed; transformers 5 takes Cache objects only "
                         "(pass accel.AccelCache(model.config), the cache a patched call returned, or none)")
    raise InputError(
        f"a {type(pkv).__name__} holding {pkv.get_seq_length()} tokens was passed to a model patched with accel "
        f"policy {policy_name!r}; accel continues only its own cache: pass the cache a patched call returned "
        "(out.cache on transformers 5.24+, out.past_key_values before), an empty accel.AccelCache(model.config), or no cache"
    )


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
        """The cache of this thread's most recent forward pass, else of any thread's (for KV-byte accounting)."""
        return self.runtime.cache if self.runtime.cache is not None else self.runtime.last_cache

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
        self.runtime.reset_sequences()
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
    compat.check_transformers_version()
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
    post_hook = model.register_forward_hook(runtime.post_forward, with_kwargs=True)
    # policy-owned forward hooks (e.g. RefreshKV reads the pre-RoPE query); removed with the patch
    extra_hooks = [post_hook]
    for p in ([pol.attention] + list(pol.kv)) if isinstance(pol, ComposedPolicy) else [pol]:
        if hasattr(p, "install"):
            extra_hooks += p.install(runtime, adapter)
    fast = []
    if fast_linear:
        from .linear import bind_fast_linear

        fast = bind_fast_linear(model.modules())
    extra_hooks.append(GenerateGuard(model, runtime.check_generate))
    if adapter.decoder() is not model:
        extra_hooks.append(EagerDecoder(adapter.decoder()))
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
