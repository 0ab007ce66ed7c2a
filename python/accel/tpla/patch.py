"""Installing TPLA on a DeepSeek-V2/V3 model, in one process (simulated shards) or one rank per shard.

``accel.patch(model, "tpla", shards=2, transform="hadamard")`` swaps every layer's attention for
``TPLAAttention`` and adds one forward pre-hook on the model that gives each new generation an ``AccelCache``
holding the sharded latent rows. ``remove()`` puts the original attention modules back (the same objects,
never modified), so the model is exactly as it was.
"""
from __future__ import annotations

import logging
import threading
import weakref

from .. import compat
from ..errors import AccelError, InputError
from ..patching.handle import (PATCHED, GenerateGuard, HandleBase, check_generate_request, prepare_forward,
                              refuse_if_patched)
from ..plan import Plan
from .adapters import get_mla_adapter
from .attention import TPLAAttention
from .transforms import build_transform

logger = logging.getLogger("accel")


class TPLAPatchHandle(HandleBase):
    """Returned by ``accel.patch(model, "tpla", ...)``; a context manager; ``remove()`` restores the model."""

    def __init__(self, model, adapter, policy, plan, originals, hook, records=(), mlp_hooks=()):
        self._model_ref = weakref.ref(model)
        self._records = list(records)  # sliced parameters (distributed execution)
        self._mlp_hooks = list(mlp_hooks)
        self.adapter = adapter
        self.policy = policy
        self.plan = plan
        self._originals = originals  # [(layer, original attention)]
        self._hook = hook
        self.cache = None
        self.active = True

    @property
    def modules(self) -> list[TPLAAttention]:
        return [layer.self_attn for layer, _ in self._originals]

    @property
    def distributed(self) -> bool:
        return self.plan.params.get("execution") == "distributed"

    def shard_nbytes(self) -> list[int]:
        """KV bytes each shard holds in the last generation's cache (all layers); in distributed execution,
        the one entry of this rank."""
        if self.cache is None:
            return []
        g = 1 if self.distributed else self.plan.params["shards"]
        out = [0] * g
        for layer in self.cache.layers:
            if layer.k_buf is None:
                continue
            for r in range(g):
                out[r] += layer.k_buf[:, r, layer.start:layer.end].numel() * layer.k_buf.element_size()
        return out

    def summary(self) -> str:
        modes = {}
        for lp in self.plan.layers:
            modes[lp.mode] = modes.get(lp.mode, 0) + 1
        return (f"accel policy=tpla on {self.adapter.config.model_type}: {self.plan.params['shards']} shards, "
                f"transform {self.plan.layers[0].params.get('transform')}, layers by mode: "
                + ", ".join(f"{k}: {v}" for k, v in sorted(modes.items())))

    def remove(self) -> None:
        if not self.active:
            return
        self._hook.remove()
        for h in self._mlp_hooks:
            h.remove()
        for layer, orig in self._originals:
            layer.self_attn = orig
        for rec in reversed(self._records):  # collective: every rank restores its slices together
            rec.restore()
        model = self._model_ref()
        if model is not None and PATCHED.get(model) is self:
            PATCHED.pop(model, None)
        self.cache = None
        self.active = False


def _model_info(model) -> dict:
    return {"num_layers": model.config.num_hidden_layers, "model_type": model.config.model_type}


class _Tracker(threading.local):
    """What the TPLA layers of this thread's current forward saw (the take-over check)."""

    def __init__(self):
        self.calls, self.caches, self.expected = 0, [], None


def patch_tpla(model, plan=None, *, calibration=None, pca=None, check_context: bool = True, **overrides) -> TPLAPatchHandle:
    """Patch an MLA model with TPLA (see ``TPLAPolicy`` for the knobs).

    Args:
        plan: a TPLA ``Plan`` (per-layer ``mode`` ``tpla``/``mla_exact`` and ``params.transform``) or a path /
            dict of one; default: built from the knobs.
        calibration: token ids ``[B, T]`` to estimate the per-layer latent covariance for ``transform="pca"``.
        pca: per-layer covariances (``{layer: [dc, dc]}``, e.g. ``calibrate_pca``'s output or ``load_pca``).
    """
    from ..policies.registry import get_policy_class

    compat.check_transformers_version()
    refuse_if_patched(model)
    adapter = get_mla_adapter(model)
    policy_obj = overrides.pop("_policy_obj", None)
    pol = policy_obj if policy_obj is not None else get_policy_class("tpla").from_overrides(**overrides)
    info = _model_info(model)
    plan_obj = pol.build_plan(info) if plan is None else Plan.coerce(plan)
    plan_obj.validate(num_layers=info["num_layers"])
    if plan_obj.policy != "tpla":
        raise AccelError(f"tpla: the plan is for policy {plan_obj.policy!r}, not 'tpla'")
    params = dict(plan_obj.params)
    shards = int(params.get("shards", pol.shards))
    plan_obj.params = {**params, "shards": shards}
    for i, lp in enumerate(plan_obj.layers):
        if lp.mode not in ("tpla", "mla_exact"):
            raise AccelError(f"tpla plan: layers[{i}].mode must be 'tpla' or 'mla_exact', got {lp.mode!r}")
    dc = adapter.attention(0).kv_lora_rank
    needs_pca = any(lp.params.get("transform") == "pca" for lp in plan_obj.layers)
    if needs_pca and pca is None:
        if calibration is None:
            raise AccelError("tpla: transform='pca' needs calibration: pass calibration=<token ids [B, T]> or "
                             "pca=<covariances from accel.tpla.calibrate_pca>")
        from .calibrate import calibrate_pca

        pca = calibrate_pca(model, calibration)
    execution = params.get("execution", pol.execution)
    plan_obj.params["execution"] = execution
    records, rank = [], None
    if execution == "distributed":
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise AccelError("tpla: execution='distributed' needs an initialised torch.distributed group: launch with "
                             "`torchrun --nproc-per-node <shards> ...` and call accel.tpla.init_distributed() first")
        if dist.get_world_size() != shards:
            raise AccelError(f"tpla: shards={shards} but the process group has {dist.get_world_size()} ranks; "
                             "use one rank per shard")
        rank = dist.get_rank()
    modules = []
    for i, lp in enumerate(plan_obj.layers):
        attn = adapter.attention(i)
        kind = lp.params.get("transform", pol.transform)
        cov = None if pca is None else pca.get(i, pca.get(str(i)))
        u = build_transform(kind, dc, shards, cov, params.get("assignment", pol.assignment))
        kw = dict(transform=u, mode=lp.mode, rope_mode=params.get("rope_mode", pol.rope_mode),
                  norm_mode=params.get("norm_mode", pol.norm_mode),
                  shard_logit_scale=params.get("shard_logit_scale", pol.shard_logit_scale), backend=pol.backend)
        if rank is None:
            mod = TPLAAttention(attn, adapter, i, shards=shards, **kw)
        else:
            from .distributed import TPLATPAttention

            mod = TPLATPAttention(attn, adapter, i, rank=rank, world=shards, records=records,
                                  attn_weights=params.get("attn_weights", pol.attn_weights), **kw)
        modules.append(mod.to(attn.o_proj.weight.device))
    mlp_hooks = []
    if rank is not None:
        from .distributed import _mlp_all_reduce_hook, shard_mlp

        for layer in adapter.layers:
            shard_mlp(layer.mlp, records)
        for rec in records:
            rec.apply(rank, shards)
        mlp_hooks = [layer.mlp.register_forward_hook(_mlp_all_reduce_hook) for layer in adapter.layers]
    originals = []
    for i, mod in enumerate(modules):
        layer = adapter.layers[i]
        originals.append((layer, layer.self_attn))
        layer.self_attn = mod
    handle = None

    limit = getattr(model.config, "max_position_embeddings", None) if check_context else None

    tracker = _Tracker()  # per thread, like the generations it checks
    for mod in modules:
        mod.tracker = tracker
    cache_arg = compat.cache_arg_name(type(model).forward)

    def pre_forward(module, args, kwargs):
        from ..cache.accel_cache import AccelCache
        pkv = prepare_forward(module, args, kwargs, lambda: AccelCache(num_layers=len(adapter.layers)), limit,
                              cache_arg, policy_name="tpla")
        if isinstance(pkv, AccelCache):
            handle.cache = pkv
        if kwargs.get("output_attentions") or getattr(module.config, "output_attentions", False):
            raise InputError("output_attentions=True with policy 'tpla': TPLA attends over latent shards and has no "
                             "per-head attention matrix to return; drop output_attentions or remove the patch")
        tracker.calls, tracker.caches, tracker.expected = 0, [], pkv
        return args, kwargs

    def post_forward(module, args, kwargs, output):
        # the take-over check: every TPLA layer ran, on accel's cache
        if module.training:
            return output
        n = len(modules)
        if tracker.calls < n or any(c is not tracker.expected for c in tracker.caches):
            raise AccelError(
                f"tpla: {tracker.calls} of {n} TPLA layers ran on accel's cache in this forward: transformers "
                f"{compat.transformers_version()} did not hand accel its cache; accel supports transformers "
                f"{compat.window_text()} ({compat.install_hint()})")
        return output

    hook = model.register_forward_pre_hook(pre_forward, with_kwargs=True)
    post = model.register_forward_hook(post_forward, with_kwargs=True)
    guard = GenerateGuard(model, lambda m, a, k: check_generate_request(
        m, a, k, policy_name="tpla", dense=False, context_limit=limit))
    mlp_hooks = list(mlp_hooks) + [post, guard]
    handle = TPLAPatchHandle(model, adapter, pol, plan_obj, originals, hook, records, mlp_hooks)
    PATCHED[model] = handle
    logger.info("%s", handle.summary())
    return handle


def claim(policy, overrides: dict):
    """TPLA's part of ``accel.patch``: ``("tpla", inline options and overrides, policy object or None)`` when the
    spec asks for ``tpla``, else None."""
    from ..policies.registry import split_spec

    if isinstance(policy, str):
        parts = [p.strip() for p in policy.split("+") if p.strip()]
        names = [split_spec(p)[0] for p in parts]
        if "tpla" not in names:
            return None
        if len(parts) > 1:
            raise AccelError("tpla replaces the attention of MLA models and does not compose with other policies yet; "
                             "use policy='tpla' alone")
        return {**overrides, **split_spec(parts[0])[1]}, None
    if getattr(policy, "name", None) == "tpla":
        if overrides:
            raise AccelError("pass overrides either to the policy object or to patch(), not both")
        return {}, policy
    return None


def patch_claimed(model, request, *, plan=None, reserve: int = 0, check_context: bool = True, fast_linear: bool = True,
                  fused_decode: bool = True):
    """``accel.patch`` on an MLA model (``reserve``, ``fast_linear`` and ``fused_decode`` do not apply: TPLA keeps its own latent
    cache and projections)."""
    opts, obj = request
    opts = dict(opts)
    calib = {k: opts.pop(k) for k in ("calibration", "pca") if k in opts}
    return patch_tpla(model, plan=plan, check_context=check_context, **calib,
                      **({"_policy_obj": obj} if obj is not None else opts))
