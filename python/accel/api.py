"""``accel.patch()``, ``accel.unpatch()``, ``accel.get_handle()`` and ``accel.calibrate()``: the entry points.

``patch`` offers the policy spec to each patcher of ``PATCHERS`` in order; the first that claims it patches the
model. A patcher module provides ``claim(policy, overrides) -> request | None`` and
``patch_claimed(model, request, plan=, reserve=, check_context=, fast_linear=, fused_decode=) -> handle``; all of them share the
handle plumbing of ``accel.patching.handle``.
"""
from __future__ import annotations

import importlib

from . import compat
from .errors import AccelError
from .patching.handle import PATCHED, dtype_problem, refuse_if_patched

#: (family, patcher module), asked in order
PATCHERS = (
    ("mla", "accel.tpla.patch"),  # TPLA swaps the attention modules of MLA models (DeepSeek-V2/V3)
    ("vlm", "accel.vlm.runtime"),  # a visual-token policy, optionally composed with an LM-side one
    ("lm", "accel.patching.lm"),  # everything else: the attention registry and accel's cache
)


def patch(model, policy="dense", plan=None, *, reserve: int = 0, check_context: bool = True, fast_linear: bool = True,
          fused_decode: bool = True, **overrides):
    """Patch a loaded transformers model in place.

    Args:
        model: a ``*ForCausalLM`` of a supported architecture (``accel.supported_model_types()``), a supported VLM
            for the visual-token policies, or an MLA model (DeepSeek-V2/V3) for ``tpla``.
        policy: a registered policy name (``accel.list_policies()``), a composition ``"attention+kv"`` (e.g.
            ``"hylra+snapkv"``, or ``"fastervlm+hylra"`` on a VLM), names with inline options
            (``"snapkv@budget_ratio=0.25"``) or a policy object.
        plan: a ``Plan`` (or a path / dict of one) from ``accel plan`` / ``accel.calibrate``; default: the
            policy's own plan (a shipped one for the calibrated policies).
        reserve: tokens to preallocate per layer in accel's cache (0 = grow as needed).
        check_context: raise when prompt + generated tokens exceed the model's context window.
        fast_linear: on CPU, run decode-time (<= 8 rows) linear layers with accel's GEMV kernel
            (``accel.patching.linear``); numerically fp32-equivalent to BLAS.
        fused_decode: on CPU, run each decode step's decoder layers (Llama, Mistral, Qwen2, Qwen3, Phi3) as two fused
            C++ calls around the policy's attention (``accel.patching.fused``); verified against the model's own
            layer when patching, and off (decode runs transformers' modules) wherever it would not be exact.
        **overrides: policy knobs, e.g. ``topk=512``; ``name.knob=value`` targets one policy of a composition.
    Returns:
        a handle (context manager; ``.remove()`` restores the model exactly).
    """
    compat.check_transformers_version()
    import torch

    if not isinstance(model, torch.nn.Module):
        raise AccelError(f"accel.patch takes a loaded transformers model (a torch.nn.Module), got {type(model).__name__}; "
                         "load one first, e.g. accel.models.load('smollm2-135m') or AutoModelForCausalLM.from_pretrained")
    refuse_if_patched(model)
    problem = dtype_problem(model)
    if problem:
        raise AccelError(problem)
    from .patching.tensor_parallel import mesh_problem, tensor_parallel_size

    problem = mesh_problem(model)
    if problem:
        raise AccelError(problem)
    tp = tensor_parallel_size(model)
    for family, name in PATCHERS:
        mod = importlib.import_module(name)
        request = mod.claim(policy, dict(overrides))
        if request is not None and family != "lm" and tp != 1:
            raise AccelError(
                f"this model was loaded with transformers' tensor parallelism (tp_size={tp}) and policy {policy!r} "
                f"is served by accel's {family.upper()} patcher, which does not follow a rank's slice of the heads; "
                "load it without tp_plan (one process; `accel generate --input` under torchrun shares prompts among "
                "ranks instead), or for MLA models use tpla's own tensor parallelism (--tp)")
        if request is not None:
            return mod.patch_claimed(model, request, plan=plan, reserve=reserve, check_context=check_context,
                                     fast_linear=fast_linear, fused_decode=fused_decode)
    raise AccelError(f"no patcher serves policy {policy!r}")  # pragma: no cover - the LM patcher claims everything


def unpatch(model) -> bool:
    """Remove accel from ``model`` if patched; returns whether it was."""
    h = PATCHED.get(model)
    if h is None:
        return False
    h.remove()
    return True


def get_handle(model):
    """The active handle of a patched model, else None."""
    return PATCHED.get(model)


def calibrate(model, tokenizer, texts=None, policy: str = "hylra", **options):
    """Make a plan for ``policy`` on ``model`` from calibration text: the policy's own calibrator (its class names
    it in ``calibrator``; ``accel.list_calibratable()`` lists them). Returns a ``Plan``; save it with
    ``plan.save(path)`` and use it with ``accel.patch(model, policy, plan=...)``."""
    from .patching.tensor_parallel import tensor_parallel_size
    from .policies.registry import get_calibrator

    tp = tensor_parallel_size(model)
    if tp != 1:
        raise AccelError(f"accel.calibrate profiles the whole model in one process, and this one was loaded with "
                         f"transformers' tensor parallelism (tp_size={tp}): calibrate the checkpoint loaded without "
                         "tp_plan, save the plan, and pass it to accel.patch on every rank")
    return get_calibrator(policy)(model, tokenizer, texts, **options)
