"""Measuring decode steps for the cost model (``accel calibrate-cost``) and describing a patched model's step as the
cost model's per-layer work (``step_work``).

Every measurement is a real ``generate()`` of the patched model from a cache of random keys and values of the given
context (speed only: the cost of these layer kinds depends on how many keys they touch, not on which), timed per step
by a streamer; a run's step is the median of its steps. The calibration design varies each layer kind's context and
budget on whole-model plans (``calibration_design``), so every coefficient is determined.
"""
from __future__ import annotations

import logging
import statistics
import time

import torch

from ..errors import AccelError
from .cost import CostModel, LayerWork, StepWork, fit

logger = logging.getLogger("accel")

#: attention policies whose layer plan ``step_work`` describes (with no KV policy beside them)
LAYER_POLICIES = ("dense", "hylra")


def _held_per_layer(handle, model, T: int) -> list[float | None]:
    """Mean tokens a KV head holds in each layer after the handle's KV policies compress a random prompt of ``T``
    tokens (their own budget rules: per-layer, per-head plans), None for a layer they leave dense."""
    from ..eval.synthetic import compress_synthetic, synthetic_cache

    cache = synthetic_cache(model, 1, T, for_hf=False)
    compress_synthetic(cache, handle)
    out = []
    for layer in cache.layers:
        rg = getattr(layer, "ragged", None)
        out.append(None if rg is None else float(rg.lengths.float().mean()))
    return out


def _stacked(rt) -> bool:
    """Whether a decode step of this patch runs accel's fused whole-stack call (``accel.patching.fused``)."""
    f = rt.fused
    return f is not None and f.whole_stack and f._stack_reason is None


def step_work(handle, model, context: int) -> StepWork:
    """The cost model's description of a decode step of the model as ``handle`` patched it, with ``context`` tokens
    cached before the step (for a KV policy: a prompt of ``context`` tokens, each head holding what its budget keeps
    of it). Describes ``dense`` and ``hylra`` layer plans (full / select / reuse layers and the full layers others
    reuse, sliding-window layers as their window) and one budgeted KV policy under dense attention that evicts to its
    budget (``decode='fixed'``) with no per-step work of its own. Refuses anything else in one line."""
    from ..attention.selection import token_budget
    from ..policies.budgeted import BudgetedKVPolicy

    rt = handle.runtime
    att, kv = rt.attention, rt.kv
    T = int(context) + 1  # the step attends to the cached tokens and its own
    windows = rt.info.sliding_windows
    full = [LayerWork("full", attend=min(T, w) if w else T) for w in windows]
    what = "the cost model describes dense, hylra, and one budgeted KV policy under dense attention"
    if kv:
        p = kv[0]
        if att.name != "dense" or len(kv) != 1 or not isinstance(p, BudgetedKVPolicy):
            raise AccelError(f"{what}; {rt.policy.name!r} is not one of them")
        if p.decode != "fixed":
            raise AccelError(f"{what} evicting to its budget; {p.name} with decode={p.decode!r} grows its cache every "
                             "step (use decode='fixed')")
        if type(p).after_decode is not BudgetedKVPolicy.after_decode or hasattr(p, "after_stack"):
            raise AccelError(f"{what}; {p.name} does work of its own every decode step that the cost model does not "
                             "measure")
        held = _held_per_layer(handle, model, int(context))
        kinds = ["kv_scored" if p.scored_layer(i, rt.plan) else "kv_plain" for i in range(len(full))]
        layers = [fw if h is None else LayerWork(k, attend=h + 1) for fw, h, k in zip(full, held, kinds)]
        return StepWork(layers, stacked=_stacked(rt))
    if att.name not in LAYER_POLICIES:
        raise AccelError(f"{what}; {att.name!r} is not one of them")
    if att.name == "dense":
        return StepWork(full, stacked=_stacked(rt))
    plan = rt.plan.layers

    def budget(i):
        lp = plan[i]
        topk = lp.topk if lp.topk is not None else att.topk
        ratio = lp.params.get("topk_ratio", att.topk_ratio)
        k = token_budget(T, topk, ratio, att.min_topk)
        return k, (k < T and T >= att.min_context and not windows[i])

    layers = []
    for i, lp in enumerate(plan):
        k, sparse = budget(i)
        if windows[i]:
            layers.append(full[i])  # window layers stay exact
        elif lp.mode == "select" and sparse:
            layers.append(LayerWork("select", scan=T, attend=k))
        elif lp.mode == "reuse":
            # the anchor's selection, of the anchor's size; dense when either side is not sparse
            ka, anchor_sparse = budget(lp.reuse_src)
            layers.append(LayerWork("reuse", attend=ka) if sparse and anchor_sparse else full[i])
        elif i in rt.donors and sparse:
            layers.append(LayerWork("donor", scan=T, attend=T))
        else:
            layers.append(full[i])
    return StepWork(layers, stacked=_stacked(rt))


def time_steps(model, handle, batch: int, context: int, new_tokens: int) -> float:
    """Median decode step (ms) of ``generate()`` at ``batch`` rows from a random cache of ``context`` tokens (compressed
    by the handle's KV policies first). The prompt's tokens are random too: only the last one runs (the cache holds
    the rest), and the steps' cost does not depend on which tokens they are."""
    from .. import compat
    from ..eval.synthetic import compress_synthetic, synthetic_cache
    from ..perf import TimingStreamer

    vocab = int(model.get_input_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(0, vocab, (batch, context + 1), generator=g).to(next(model.parameters()).device)
    cache = synthetic_cache(model, batch, context, for_hf=False)
    if handle.runtime.kv:
        compress_synthetic(cache, handle)
    pad = getattr(model.generation_config, "pad_token_id", None)
    st = TimingStreamer()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=st, max_new_tokens=new_tokens,
                       eos_token_id=None, do_sample=False,
                       pad_token_id=0 if pad is None else pad, **compat.cache_kwargs(model, cache))
    steps = [1e3 * (b - a) for a, b in zip(st.stamps[1:], st.stamps[2:])]
    if len(steps) < 2:
        raise AccelError("a timed run produced fewer than two decode steps; give new_tokens >= 4")
    return float(statistics.median(steps))


def layer_plan(model, modes: list[str]):
    """A HyLRA plan whose layer ``i`` runs ``modes[i]`` (``full`` / ``select`` / ``reuse``; reuse layers point at the
    nearest earlier non-reuse layer)."""
    from ..models.registry import get_adapter
    from ..plan import Plan
    from ..plan.schema import LayerPlan

    info = get_adapter(model).info()
    layers, anchor = [], None
    for i, m in enumerate(modes):
        if m == "reuse":
            if anchor is None:
                raise AccelError("layer_plan: a reuse layer needs an earlier full or select layer")
            layers.append(LayerPlan(mode="reuse", attention="hylra", reuse_src=anchor))
        else:
            layers.append(LayerPlan(mode=m, attention="hylra"))
            anchor = i
    plan = Plan(policy="hylra", num_layers=info.num_layers, num_kv_heads=info.num_kv_heads,
                model_type=info.model_type, layers=layers,
                provenance={"made_by": "accel.scheduler.measure.layer_plan"})
    plan.validate(info.num_layers, info.num_kv_heads)
    return plan


def calibration_design(num_layers: int, contexts: tuple[int, int, int]) -> list[dict]:
    """The runs of one batch size: ``{"policy", "modes" | None, "overrides", "context"}``. ``contexts`` = (low, mid,
    high). Each layer kind runs at two contexts at least, alone on every layer and mixed with others (one anchor, or
    every other layer), so its fixed and per-key costs are told apart; a HyLRA plan of full layers only measures the
    cost of decoding layer by layer (HyLRA's own decode) against the fused whole stack (dense)."""
    lo, mid, hi = contexts
    L = num_layers
    alt = lambda a, b: [a if i % 2 == 0 else b for i in range(L)]  # noqa: E731
    runs = [{"policy": "dense", "modes": None, "overrides": {}, "context": c} for c in (16, lo, mid, hi)]
    for modes, points in ((["full"] * L, ((mid, 0.125), (hi, 0.125))),  # hylra's own decode, every layer exact
                          (["select"] * L, ((mid, 0.125), (hi, 0.125), (hi, 0.25))),
                          (["select"] + ["reuse"] * (L - 1), ((mid, 0.125), (hi, 0.125), (hi, 0.25))),
                          (alt("select", "reuse"), ((mid, 0.125), (hi, 0.25))),
                          (["full"] + ["reuse"] * (L - 1), ((mid, 0.125), (hi, 0.125))),
                          (alt("full", "reuse"), ((mid, 0.125), (hi, 0.25)))):
        for c, r in points:
            runs.append({"policy": "hylra", "modes": modes, "overrides": {"topk_ratio": r}, "context": c})
    for name in ("snapkv", "streaming"):
        for c, r in ((mid, 0.125), (hi, 0.125), (hi, 0.25)):
            runs.append({"policy": name, "modes": None, "overrides": {"budget_ratio": r}, "context": c})
    return runs


def patch_run(model, run: dict):
    """Patch ``model`` for one design run; returns the handle."""
    from ..api import patch

    plan = layer_plan(model, run["modes"]) if run["modes"] is not None else None
    return patch(model, run["policy"], plan=plan, reserve=run["context"] + 128, **run["overrides"])


def calibrate_cost(model, model_name: str, batches=(1, 4, 8), contexts=None, new_tokens: int = 24,
                   passes: int = 3, progress: bool = False, kv_floor: bool = True) -> CostModel:
    """Measure the calibration design at each batch size ``passes`` times (each pass over the whole design, after one
    untimed warm-up generation) and fit the cost model to each design point's median step over the passes (minutes
    on a 2-core CPU). ``kv_floor``: the compressed layers' per-key costs at least a full layer's (``fit``).
    ``contexts``: ``{batch: (low, mid, high)}``; default (1024, 4096, 8000) at batch 1 and (512, 2048, 4096) above."""
    from tqdm.auto import tqdm

    from ..models.registry import get_adapter
    from ..perf import machine_facts
    from .cost import device_kind, model_dtype

    info = get_adapter(model).info()
    contexts = contexts or {}
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    jobs = []
    for b in batches:
        ctx = tuple(contexts.get(b, (1024, 4096, 8000) if b == 1 else (512, 2048, 4096)))
        if ctx[-1] + 1 + new_tokens > limit:
            raise AccelError(f"calibrate-cost: context {ctx[-1]} + {new_tokens} new tokens exceeds the model's "
                             f"{limit}-token window; give lower contexts (--contexts)")
        jobs += [(b, r) for r in calibration_design(info.num_layers, ctx)]
    jobs = jobs * passes
    runs = []
    t0 = time.time()
    # one untimed generation first (allocator, caches, thread pool): the first timed runs would pay for it
    b0, r0 = jobs[0]
    c0 = max(r["context"] for b, r in jobs if b == b0)
    warm = patch_run(model, {**r0, "context": c0})
    try:
        time_steps(model, warm, b0, c0, 4)
    finally:
        warm.remove()
    for b, r in tqdm(jobs, desc="calibrate-cost", disable=not progress):
        handle = patch_run(model, r)
        try:
            work = step_work(handle, model, r["context"])
            ms = time_steps(model, handle, b, r["context"], new_tokens)
        finally:
            handle.remove()
        runs.append({"batch": b, "policy": r["policy"], "modes": "" if r["modes"] is None else _modes_label(r["modes"]),
                     "overrides": r["overrides"], "context": r["context"], "work": work, "stacked": work.stacked,
                     "step_ms": ms})
        logger.info("calibrate-cost: batch %d %s %s context %d: %.2f ms", b, r["policy"], r["overrides"],
                    r["context"], ms)
    # each design point's median over the passes is fitted: a slow spell of the machine during one pass moves no
    # coefficient
    points: dict = {}
    for r in runs:
        points.setdefault((r["batch"], r["policy"], r["modes"], tuple(sorted(r["overrides"].items())), r["context"]),
                          []).append(r)
    per_batch, paths = fit([{**g[0], "step_ms": statistics.median(x["step_ms"] for x in g)} for g in points.values()],
                           info.num_kv_heads, kv_floor=kv_floor)
    cm = CostModel(model=model_name, model_type=info.model_type, fingerprint=info.fingerprint,
                   num_layers=info.num_layers, num_kv_heads=info.num_kv_heads, head_dim=info.head_dim,
                   dtype=model_dtype(model), machine={**machine_facts(), "device": device_kind(model)},
                   per_batch=per_batch, stacked_paths=paths,
                   provenance={"command": "accel calibrate-cost", "new_tokens": new_tokens, "passes": passes,
                               "kv_floor": bool(kv_floor),
                               "seconds": round(time.time() - t0, 1), "measured": time.strftime("%Y-%m-%d")})
    for r in runs:
        pred = cm.predict(r["work"], r["batch"])
        cm.runs.append({k: v for k, v in r.items() if k != "work"} | {"step_ms": round(r["step_ms"], 3),
                                                                       "fitted_ms": round(pred, 3)})
    return cm


def _modes_label(modes: list[str]) -> str:
    out, prev, n = [], None, 0
    for m in modes + [None]:
        if m == prev:
            n += 1
            continue
        if prev is not None:
            out.append(f"{prev}x{n}" if n > 1 else prev)
        prev, n = m, 1
    return ",".join(out)
