"""Per-head profilers: DuoAttention head classification without gradient training.

DuoAttention (Xiao et al., 2024, arXiv 2410.10819) gives every KV head a gate alpha in [0, 1] and trains
the gates so that the mixture ``alpha * full + (1 - alpha) * streaming`` reproduces the full model's
hidden states on synthetic retrieval data, with an L1 push towards streaming; heads whose gate stays
high are retrieval heads. accel measures the quantity the gates are trained against directly, one head
at a time, with no training ([INFER] criterion, documented in the README):

    score(l, h) = mean over profiled queries of ||o_full - o_stream|| / ||o_full||

where ``o_full`` is the head's exact attention output and ``o_stream`` its output when it only sees
``sink`` + ``recent`` tokens (the streaming head's Λ pattern, 64 + 256 by default), averaged over the
GQA group's query heads. The queries are the last ``steps`` positions of synthetic retrieval prompts
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
from .plan import HeadPlan, LayerPlan, Plan

logger = logging.getLogger("accel")

CALIB_SEED = 9_000_000  # evaluation samples use seed * 1000 + i with small seeds


def streaming_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sink: int,
                     recent: int) -> torch.Tensor:
    """One layer, one text: q [H, S, D] (last S positions), k/v [Hkv, T, D] -> [Hkv] mean relative
    output error of streaming attention (sink + recent) against full causal attention."""
    H, S, D = q.shape
    Hkv, T, _ = k.shape
    G = H // Hkv
    pos = torch.arange(T - S, T).view(S, 1)
    t = torch.arange(T).view(1, T)
    causal = t <= pos
    lam = causal & ((t < sink) | (t > pos - recent))
    kk, vv = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
    logits = torch.einsum("hsd,htd->hst", q, kk) * scale
    o_full = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1) @ vv
    o_str = torch.softmax(logits.masked_fill(~lam, float("-inf")), -1) @ vv
    err = (o_full - o_str).norm(dim=-1) / o_full.norm(dim=-1).clamp_min(1e-12)  # [H, S]
    return err.mean(-1).view(Hkv, G).mean(-1)


def calibration_prompts(tokenizer, n: int, tokens: int) -> list[str]:
    """Synthetic retrieval prompts with their answers appended (half passkey, half NIAH)."""
    from ..eval.niah import make_niah
    from ..eval.passkey import make_passkey

    out = []
    for i in range(n):
        make = make_passkey if i % 2 == 0 else make_niah
        s = make(tokenizer, tokens - 24, depth=(0.1 + 0.8 * ((i * 0.37) % 1.0)), seed=CALIB_SEED + i)
        out.append(s.prompt + " " + s.answer)
    return out


def calibrate_duo(model, tokenizer, texts=None, *, tokens: int = 2048, steps: int = 64, n_texts: int = 4,
                  sink: int = 64, recent: int = 256, retrieval_fraction: float = 0.5,
                  progress: bool = True) -> Plan:
    """Score every KV head of every full-attention layer (see the module docstring); returns a
    ``duo`` plan whose heads carry ``score`` and a default ``kind`` (the top ``retrieval_fraction``
    retrieval, DuoAttention's deployment default of 50% streaming heads)."""
    from ..models.registry import get_adapter
    from ..patching.core import patch
    from .profiler import _Recorder

    info = get_adapter(model).info()
    tokens = min(tokens, info.max_context or tokens)
    if steps >= tokens or sink + recent >= tokens - steps:
        raise AccelError(f"calibrate(duo): tokens ({tokens}) must exceed steps + sink + recent ({steps + sink + recent})")
    if texts is None:
        texts = calibration_prompts(tokenizer, n_texts, tokens)
    if isinstance(texts, str):
        texts = [texts]
    full_layers = [i for i, w in enumerate(info.sliding_windows) if w is None]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="calibrating duo", unit="text")
        except ImportError:  # pragma: no cover
            bar = None
    t0 = time.perf_counter()
    acc = {li: torch.zeros(info.num_kv_heads) for li in full_layers}
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
        if ids.shape[1] <= steps + sink + recent:
            raise AccelError(f"calibrate(duo): a calibration text has only {ids.shape[1]} tokens")
        rec = _Recorder(steps=steps, keep_values=True)
        with patch(model, rec, fast_linear=False), torch.no_grad():
            model(input_ids=ids, use_cache=True)
        for li in full_layers:
            q, k, scale = rec.records[li]
            acc[li] += streaming_errors(q, k, rec.values[li], scale, sink, recent)
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
                     "retrieval_fraction": retrieval_fraction},
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    plan.validate(num_layers=info.num_layers, num_kv_heads=info.num_kv_heads)
    logger.info("calibrated duo plan: %d of %d heads retrieval at fraction %.2f", n_ret, len(ranked), retrieval_fraction)
    return plan
