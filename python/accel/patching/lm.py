"""The language-model patcher behind ``accel.patch()``: scoped, reversible patching through transformers' public
extension points, and the runtime that routes each layer's attention to the policy.

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
from ..cache import sequences
from ..cache.accel_cache import AccelCache
from ..cache.sequences import SequenceState
from ..errors import AccelError, InputError
from .handle import dtype_problem
from ..models.registry import get_adapter
from ..attention.context import LayerContext
from ..attention.decode import ragged_prefill
from ..attention.masks import prompt_valid
from ..policies.base import ComposedPolicy, KVCachePolicy
from ..policies.budgeted import merge_statistics
from ..policies.registry import get_planner, make_policy
from ..plan import Plan
from .attention_fn import ATTN_NAME, MODULE_RUNTIME, ensure_registered
from .tensor_parallel import head_slice, local_info, refuse_policies
from .handle import (PATCHED, EagerDecoder, GenerateGuard, HandleBase, check_generate_request, prepare_forward,
                     refuse_if_patched)

logger = logging.getLogger("accel")


class _ThreadState(threading.local):
    """This thread's current forward: its cache, its sequence state and the attention calls counted so far."""

    def __init__(self):
        self.cache = None
        self.seq = SequenceState()
        self.attn_calls = 0
        self.fused_now = False
        self.stack_now = False
        self.stack_out = None
        self.stack_version = 0


def _tls_attr(name):
    return property(lambda self: getattr(self._tls, name), lambda self, v: setattr(self._tls, name, v))


def _seq_attr(name):
    return property(lambda self: getattr(self._tls.seq, name), lambda self, v: setattr(self._tls.seq, name, v))


class ModelRuntime:
    """Per-patched-model state shared by all layers during a forward pass. The per-generation part lives in the
    ``SequenceState`` beside each cache (``accel.cache.sequences``); which cache a thread is on, in a thread-local."""

    cache = _tls_attr("cache")
    attn_calls = _tls_attr("attn_calls")
    #: this forward may take the fused decode layers (``accel.patching.fused``)
    fused_now = _tls_attr("fused_now")
    #: this forward may run the whole decoder stack in one call (``FusedDecode.run_stack``), and the hidden states that
    #: call returned (the later layers pass them on)
    stack_now = _tls_attr("stack_now")
    stack_out = _tls_attr("stack_out")
    stack_version = _tls_attr("stack_version")
    layer_state = _seq_attr("layer_state")
    shared = _seq_attr("shared")
    step = _seq_attr("step")

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
        self._tls = _ThreadState()
        #: serialises the KV policies' prefill compression and decode eviction across threads (the policy
        #: objects keep scratch state while they compress)
        self.lock = threading.RLock()
        self.last_cache: AccelCache | None = None
        #: the keyword this model's forward takes its cache by (``cache`` on transformers 5.24+)
        self.cache_arg = compat.cache_arg_name(type(model).forward)
        #: decode-time accounting: KV bytes the attention of decode calls read (dense spans, selected
        #: rows, scoring passes) and the number of layer-level decode calls; ``accel bench`` reports
        #: bytes per step from them instead of assuming a dense read
        self.stats = {"kv_read_bytes": 0, "decode_layer_calls": 0, "fused_layer_calls": 0}
        #: KV-cache policies whose prefill statistics (``prefill_statistics``) a dense prefill records into the
        #: cache, so they can compress a copy of it later (the evaluation harness's shared prefill)
        self.record_stats: list | None = None
        #: layers whose selection a later layer reuses (they emit their top-k every decode step)
        self.donors = frozenset(lp.reuse_src for lp in plan.layers if lp.mode == "reuse")
        #: the fused decode layers (``accel.patching.fused.FusedDecode``), or None: decode runs the modules
        self.fused = None
        #: under transformers' tensor parallelism: this rank's heads (``accel.patching.tensor_parallel.HeadSlice``)
        #: and the model's index of its first KV head (per-head plans are indexed by the model's heads)
        self.tensor_parallel = None
        self.kv_offset = 0

    @staticmethod
    def sequence(cache) -> SequenceState:
        """The sequence state of ``cache`` (created on first use)."""
        return sequences.state_of(cache)

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
            if self.kv and ctx.cache_layer is not None and ctx.cache_layer.ragged is not None:
                ctx.accumulate = any(p.accumulates(ctx) for p in self.kv)
            out = self.attention.decode(ctx, query, key, value, attention_mask, scaling, **kwargs)
            if self.kv:
                with self.lock:
                    for p in self.kv:
                        p.after_decode(ctx, query, attention_mask)
        elif ctx.cache_layer is not None and ctx.cache_layer.ragged is not None:
            out = ragged_prefill(ctx, query, scaling)
            if self.kv:  # more prompt tokens on a compressed layer: each policy brings it back to its plan
                with self.lock:
                    for p in self.kv:
                        p.after_prefill(ctx, query, attention_mask)
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
        """Record what the ``record_stats`` policies need to compress a copy of this cache later (each policy's
        ``prefill_statistics``), as ``cache.prefill_stats[layer]``: prompt data that travels with the cache."""
        valid = prompt_valid(attention_mask, query.shape[0], key.shape[2])
        st: dict = {}
        with torch.no_grad():
            for p in self.record_stats:
                merge_statistics(st, p.prefill_statistics(query, key, valid, scaling or query.shape[-1] ** -0.5))
        if not hasattr(self.cache, "prefill_stats"):
            self.cache.prefill_stats = {}
        self.cache.prefill_stats[layer_idx] = st
        if layer_idx < len(self.cache.layers):  # which prompt write the statistics belong to
            st["prefill_mark"] = getattr(self.cache.layers[layer_idx], "prefills", 0)

    # -- the pre-hook -------------------------------------------------------------------------------
    def pre_forward(self, module, args, kwargs):
        pkv = prepare_forward(module, args, kwargs, lambda: AccelCache(module.config, reserve=self.reserve),
                              self.info.max_context if self.check_context else None, self.cache_arg,
                              policy_name=self.policy.name)
        oa = self.check_features(module, kwargs)
        self.attn_calls = 0
        self.fused_now = self.fused is not None and self.fused.active(oa)
        self.stack_out = None
        self.stack_now = self.fused_now and self.fused.stack_ok(self, module, kwargs)
        if isinstance(pkv, AccelCache):
            if pkv.get_seq_length() == 0:  # an empty cache starts a new sequence
                seq = sequences.restart(pkv)
            else:  # a cache continued: its own state, one decode step further
                seq = sequences.state_of(pkv)
                seq.step += 1
            self._tls.seq = seq
            self.cache = pkv
            self.last_cache = pkv  # the most recent cache of any thread (PatchHandle.cache)
        else:
            self._tls.seq = SequenceState()
            self.cache = None
        return args, kwargs

    def check_features(self, module, kwargs) -> bool:
        """Refuse forward options this policy cannot serve exactly (before anything runs); returns whether the
        forward asks for attention weights."""
        problem = dtype_problem(module)
        if problem:
            raise InputError(problem)
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
        return bool(oa)

    def __deepcopy__(self, memo):
        raise AccelError("a model patched by accel cannot be deep-copied (its hooks would run the original model's "
                         "runtime); copy it before accel.patch or after handle.remove()")

    def reset_sequences(self) -> None:
        """Drop what the runtime holds of every thread's generation (``remove()``): no cache outlives the patch here.
        The policies' state stays beside each cache (``accel.cache.sequences``), so a cache the patch compressed
        continues exactly under a new patch."""
        self._tls = _ThreadState()
        self.last_cache = None

    def check_generate(self, model, args, kwargs) -> None:
        """What ``generate()`` is asked for, checked before it runs (``accel.patching.handle.GenerateGuard``)."""
        check_generate_request(model, args, kwargs, policy_name=self.policy.name, dense=self.is_dense(),
                               context_limit=self.info.max_context if self.check_context else None)

    def is_dense(self) -> bool:
        return not self.kv and getattr(self.attention, "name", None) == "dense"

    def post_forward(self, module, args, kwargs, output):
        """The take-over check: a patched forward must have run accel's attention in every layer and kept
        accel's cache. Anything else means transformers routed around accel (e.g. a release that changed how the
        cache or the attention function is passed): refuse instead of returning unaccelerated or wrong output."""
        self.fused_now = False  # a later call that skips the pre-hook (a submodule called directly) takes the modules
        self.stack_now = False
        if self.stack_out is not None:
            self.stack_out = None
            raise AccelError("accel's fused decoder stack ran, but not every decoder layer was called after it; the "
                             "model's forward did not run its layers in order (patch with fused_decode=False)")
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
        out = (f"accel policy={self.runtime.policy.name} on {info.model_type} "
               f"({info.num_layers} layers, {info.num_heads}/{info.num_kv_heads} heads, head_dim {info.head_dim}); "
               f"layers by mode: {mode_s}")
        # a policy's own decisions: flux's routes, auto's per-head plan
        lines = [d(self.runtime) for d in (getattr(p, "describe", None) for p in [self.runtime.attention]
                                           + list(self.runtime.kv)) if d is not None]
        return out + "".join("; " + line for line in lines)

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
            PATCHED.pop(model, None)
        self.runtime.reset_sequences()
        self.active = False


def claim(policy, overrides: dict):
    """The LM patcher serves every policy spec the VLM and TPLA patchers did not claim (``accel.api``)."""
    return policy, overrides


def patch_lm(model, request, plan: Plan | str | Path | dict | None = None, *, reserve: int = 0,
             check_context: bool = True, fast_linear: bool = True, fused_decode: bool = True) -> PatchHandle:
    """Patch a ``*ForCausalLM`` of a supported architecture with an LM policy (``accel.patch`` documents the
    arguments; ``request`` is ``(policy spec, overrides)``)."""
    compat.check_transformers_version()
    refuse_if_patched(model)
    problem = dtype_problem(model)
    if problem:
        raise AccelError(problem)
    policy, overrides = request
    adapter = get_adapter(model)
    info = adapter.info()
    heads = head_slice(model, adapter, info)  # transformers' tensor parallelism: this rank's heads
    pol = make_policy(policy, overrides)
    parts = ([pol.attention] + list(pol.kv)) if isinstance(pol, ComposedPolicy) else [pol]
    reasons = []
    for p in parts:
        reasons += p.not_supported_reasons(info)
    if reasons:
        raise AccelError(f"policy {pol.name!r} cannot run on this model: " + "; ".join(reasons))
    refuse_policies(parts, heads, None)  # before a plan is looked for: what no plan changes
    # plans describe the whole model (every KV head), also on a tensor-parallel rank
    planner = next((p for p in parts if get_planner(p) is not None), None)
    if planner is not None:  # a plan solved for this model and machine (policy="auto")
        plan_obj = get_planner(planner)(planner, model, info, plan)
    else:
        plan_obj = pol.build_plan(info) if plan is None else Plan.coerce(plan)
    plan_obj.validate(num_layers=info.num_layers, num_kv_heads=info.num_kv_heads)
    pol.check_plan(plan_obj)  # the policy executes every layer mode and head kind the plan names
    refuse_policies(parts, heads, plan_obj)

    ensure_registered()
    runtime = ModelRuntime(model, adapter, local_info(info, heads), pol, plan_obj, reserve, check_context)
    if heads is not None:
        runtime.kv_offset, runtime.tensor_parallel = heads.kv_offset, heads
        logger.info("tensor parallelism: rank %d of %d holds KV heads %d-%d; decode runs transformers' sharded "
                    "modules (accel's fused layers and GEMV read whole weights)", heads.rank, heads.tp_size,
                    heads.kv_offset, heads.kv_offset + heads.num_kv_heads - 1)
        fused_decode = fast_linear = False
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
    fused = None
    if fused_decode:
        from .fused import install as install_fused

        # probed before the attention modules are routed to the runtime (the probe runs transformers' attention)
        fused = install_fused(runtime, adapter)
        runtime.fused = fused
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
    if fused is not None:
        extra_hooks.append(fused)
    extra_hooks.append(GenerateGuard(model, runtime.check_generate))
    if adapter.decoder() is not model:
        extra_hooks.append(EagerDecoder(adapter.decoder()))
    handle = PatchHandle(model, runtime, hook, saved, fast, extra_hooks)
    PATCHED[model] = handle
    logger.info("%s", handle.summary())
    return handle


patch_claimed = patch_lm  # the patcher interface of accel.api
