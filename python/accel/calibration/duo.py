"""Per-head profilers: DuoAttention head classification without gradient training.

DuoAttention (Xiao et al., 2024, arXiv 2410.10819) gives every KV head a gate alpha in [0, 1] and trains
the gates so that the mixture ``alpha * full + (1 - alpha) * streaming`` reproduces the full model's
hidden states on synthetic retrieval data, with an L1 push towards streaming; heads whose gate stays
high are retrieval heads. accel scores heads one at a time with no training ([INFER] criterion,
documented in the README). Default (``metric="far_mass"``, ``reduce="max"``):

    score(l, h) = max over profiled queries of the attention mass outside sink + recent   ("far_mass")

the share of its attention a head would lose as a streaming head, at the step where it loses most (max
over the group's query heads too). On the retrieval prompts below, whose last steps copy the answer
from the needle, the heads that do the copying put ~all their mass on the needle for a few steps, and
these are the heads a streaming cache must not cut (see ``far_mass``). It replaced the output-error
score below after an A/B at a 25% budget on SmolLM2 (NIAH at 4K, 10 samples, dense 9: residual-mean
plan 2, far_mass-max plan 6); that one measures the quantity DuoAttention's gates are trained against:

    score(l, h) = mean over profiled queries of ||W_O,h (o_full - o_stream)||     (metric="residual")

where ``o_full`` is the head's exact attention output, ``o_stream`` its output when it only sees
``sink`` + ``recent`` tokens (the streaming head's Λ pattern, 64 + 256 by default), and W_O,h the
head's slice of the output projection: the change streaming would write into the residual stream,
summed over the GQA group's query heads (``metric="relative"``: ``||o_full - o_stream|| / ||o_full||``
in the head's own space, which ignores how much the head contributes). The queries are the last ``steps`` positions of synthetic retrieval prompts
(passkey and needle-in-a-haystack over the Paul Graham essays, with the correct answer appended, as
DuoAttention trains on synthetic passkey retrieval), generated with seeds disjoint from the
evaluation's. A head whose output changes when it loses the middle of the context needs the full cache.

The plan stores every head's score; the runtime ranks heads globally and turns the top ones into
retrieval heads for whatever budget a request gives (``duo`` policy), so one calibration serves every
budget.
"""

from __future__ import annotations

import logging
import time

import torch

from ..errors import AccelError
from ..models.base import last_logits_only
from ..models.registry import get_adapter
from ..patching.lm import patch_lm
from ..plan import HeadPlan, LayerPlan, Plan
from .common import Recorder, calibration_prompts, progress_bar

logger = logging.getLogger("accel")


def _logits_and_window(q: torch.Tensor, k: torch.Tensor, scale: float, sink: int, recent: int):
    """Scaled logits [H, S, T] of the last S positions' queries over all T keys, the causal mask [S, T]
    and the streaming window (sink + recent, inside the causal mask) [S, T]."""
    H, S, _ = q.shape
    Hkv, T, _ = k.shape
    pos = torch.arange(T - S, T).view(S, 1)
    t = torch.arange(T).view(1, T)
    causal = t <= pos
    window = causal & ((t < sink) | (t > pos - recent))
    logits = torch.einsum("hsd,htd->hst", q, k.repeat_interleave(H // Hkv, 0)) * scale
    return logits, causal, window


def streaming_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sink: int,
                     recent: int, w_o: torch.Tensor | None = None, reduce: str = "mean") -> torch.Tensor:
    """One layer, one text: q [H, S, D] (last S positions), k/v [Hkv, T, D] -> [Hkv] mean output error
    of streaming attention (sink + recent) against full causal attention. Without ``w_o``: relative
    error ``||o_full - o_stream|| / ||o_full||`` in the head's space. With ``w_o`` ([hidden, H * D], the
    layer's output projection): the absolute error the head writes into the residual stream,
    ``||W_O,h (o_full - o_stream)||``, summed over the group's query heads (the quantity DuoAttention's
    gates are trained to keep small, one head at a time). ``reduce``: over the S steps, 'mean' or 'max'
    (the worst step: an answer copied from a needle is a handful of steps)."""
    H, S, D = q.shape
    Hkv = k.shape[0]
    G = H // Hkv
    logits, causal, lam = _logits_and_window(q, k, scale, sink, recent)
    vv = v.repeat_interleave(G, 0)
    o_full = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1) @ vv
    o_str = torch.softmax(logits.masked_fill(~lam, float("-inf")), -1) @ vv
    if w_o is not None:
        Wh = w_o.float().view(w_o.shape[0], H, D)  # [E, H, D]
        diff = torch.einsum("hsd,ehd->hse", o_full - o_str, Wh)  # [H, S, E]
        per_step = diff.view(Hkv, G, S, -1).sum(1).norm(dim=-1)  # [Hkv, S]
        return per_step.amax(-1) if reduce == "max" else per_step.mean(-1)
    err = (o_full - o_str).norm(dim=-1) / o_full.norm(dim=-1).clamp_min(1e-12)  # [H, S]
    err = err.amax(-1) if reduce == "max" else err.mean(-1)
    return err.view(Hkv, G).mean(-1)


def far_mass(q: torch.Tensor, k: torch.Tensor, scale: float, sink: int, recent: int, reduce: str = "max") -> torch.Tensor:
    """One layer, one text: q [H, S, D], k [Hkv, T, D] -> [Hkv] attention mass a head puts outside its
    sink + recent window (what streaming would drop), max over the group's query heads, then over the
    steps (``reduce="max"``) or their mean. On retrieval prompts with their answers appended this is a
    copy score in the spirit of retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically
    Explains Long-Context Factuality"): a head that copies the answer from the needle puts ~all its
    mass there on the answer steps, and streaming it breaks the copy mid-answer ([INFER] accel's)."""
    H, S, D = q.shape
    Hkv = k.shape[0]
    G = H // Hkv
    logits, causal, window = _logits_and_window(q, k, scale, sink, recent)
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    far = (p * (causal & ~window)).sum(-1).view(Hkv, G, S).amax(1)  # [Hkv, S]
    return far.amax(-1) if reduce == "max" else far.mean(-1)


def calibrate_duo(model, tokenizer, texts=None, *, tokens: int = 2048, steps: int = 64, n_texts: int = 4,
                  sink: int = 64, recent: int = 256, retrieval_fraction: float = 0.5, metric: str = "far_mass",
                  reduce: str = "max", progress: bool = True) -> Plan:
    """Score every KV head of every full-attention layer (see the module docstring); returns a
    ``duo`` plan whose heads carry ``score`` and a default ``kind`` (the top ``retrieval_fraction``
    retrieval, DuoAttention's deployment default of 50% streaming heads)."""

    if metric not in ("far_mass", "residual", "relative") or reduce not in ("max", "mean"):
        raise AccelError(f"calibrate(duo): metric must be 'far_mass', 'residual' or 'relative' and reduce 'max' or "
                         f"'mean', got {metric!r}, {reduce!r}")
    info = get_adapter(model).info()
    tokens = min(tokens, info.max_context or tokens)
    if steps >= tokens or sink + recent >= tokens - steps:
        raise AccelError(f"calibrate(duo): tokens ({tokens}) must exceed steps + sink + recent ({steps + sink + recent})")
    if texts is None:
        texts = calibration_prompts(tokenizer, n_texts, tokens)
    if isinstance(texts, str):
        texts = [texts]
    full_layers = [i for i, w in enumerate(info.sliding_windows) if w is None]
    bar = progress_bar(progress, len(texts), "calibrating duo")
    t0 = time.perf_counter()
    acc = {li: torch.zeros(info.num_kv_heads) for li in full_layers}
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
        if ids.shape[1] <= steps + sink + recent:
            raise AccelError(f"calibrate(duo): a calibration text has only {ids.shape[1]} tokens")
        rec = Recorder(steps=steps, keep_values=True)
        with patch_lm(model, (rec, {}), fast_linear=False), torch.no_grad():
            model(input_ids=ids, use_cache=True, **last_logits_only(model))
        adapter = get_adapter(model)
        for li in full_layers:
            q, k, scale = rec.records[li]
            if metric == "far_mass":
                acc[li] += far_mass(q, k, scale, sink, recent, reduce=reduce)
                continue
            w_o = adapter.output_projection(li) if metric == "residual" else None
            acc[li] += streaming_errors(q, k, rec.values[li], scale, sink, recent, w_o=w_o, reduce=reduce)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    scores = {li: (acc[li] / len(texts)).tolist() for li in full_layers}
    ranked = sorted(((s, li, h) for li in full_layers for h, s in enumerate(scores[li])), key=lambda x: (-x[0], x[1], x[2]))
    n_ret = round(retrieval_fraction * len(ranked))
    retrieval = {(li, h) for _, li, h in ranked[:n_ret]}
    layers = []
    for li in range(info.num_layers):
        if li not in scores:
            layers.append(LayerPlan(mode="full", kv=None))
            continue
        heads = [HeadPlan(kind="retrieval" if (li, h) in retrieval else "streaming", score=round(float(s), 6))
                 for h, s in enumerate(scores[li])]
        layers.append(LayerPlan(mode="compress", kv="duo", sink=sink, recent=recent, heads=heads))
    plan = Plan(
        policy="duo", num_layers=info.num_layers, num_kv_heads=info.num_kv_heads, model_type=info.model_type,
        params={"sink": sink, "recent": recent}, layers=layers,
        provenance={
            "fingerprint": info.fingerprint,
            "source": "accel.calibrate (DuoAttention head scores: streaming-attention output error, no training)",
            "args": {"tokens": tokens, "steps": steps, "n_texts": len(texts), "sink": sink, "recent": recent,
                     "retrieval_fraction": retrieval_fraction, "metric": metric, "reduce": reduce},
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    plan.validate(num_layers=info.num_layers, num_kv_heads=info.num_kv_heads)
    logger.info("calibrated duo plan: %d of %d heads retrieval at fraction %.2f", n_ret, len(ranked), retrieval_fraction)
    return plan

