"""TCA-Attention's offline calibration (You, Chen, Zhang et al., "Training-free Context-adaptive Attention", arXiv
2512.09238; methods.md 7.2): one dense forward per calibration text records every layer's last queries, its keys and
values; each KV head's attention output under every per-block quota (``accel.policies.tca``'s own attention rule) is
compared with dense attention, and the head gets the sparsest configuration of the log-Gaussian family whose relative
L2 error stays within ``tolerance``."""
from __future__ import annotations

import logging
import time

import torch

from ..errors import AccelError
from ..models.base import last_logits_only
from ..models.registry import get_adapter
from ..patching.lm import patch_lm
from ..plan import HeadPlan, LayerPlan, Plan
from ..policies.tca import family, pick, select, tca_attention
from .common import Recorder, calibration_prompts, progress_bar

logger = logging.getLogger("accel")


def quota_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sink: int, window: int,
                 block: int, metric: str = "cosine", reduce: str = "max") -> torch.Tensor:
    """[Hkv, block] relative L2 error of TCA attention against dense attention for the last ``S`` queries ``q``
    [H, S, D] over keys/values [Hkv, T, D], at every per-block quota 1..block (same quota for every head).
    ``reduce``: 'mean', the error of all the group's outputs together; 'max', the worst query's (each query's error
    over the group's heads)."""
    H, S, D = q.shape
    Hkv, T = k.shape[0], k.shape[1]
    G = H // Hkv
    first = torch.zeros(1, dtype=torch.long)
    qq, kk, vv = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    out = []
    dense = None
    for quota in range(block, 0, -1):  # block first: dense attention under the same rule
        kept, blk = select(kk, first, torch.full((Hkv,), quota, dtype=torch.long), sink, window, block, metric)
        o = tca_attention(qq, kk, vv, kept, blk, first, scale, sink, window, block)[0].float()  # [H, S, Dv]
        o = o.view(Hkv, G, S, -1).transpose(1, 2)  # [Hkv, S, G, Dv]
        if dense is None:
            dense = o
        if reduce == "max":
            diff = (o - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1).clamp(min=1e-12)
            out.append(diff.amax(-1))
        else:
            diff = (o - dense).flatten(1).norm(dim=-1)
            out.append(diff / dense.flatten(1).norm(dim=-1).clamp(min=1e-12))
    return torch.stack(out[::-1], 1)  # [Hkv, block], column i: quota i + 1


def calibrate_tca(model, tokenizer, texts=None, *, tokens: int = 2048, steps: int = 256, n_texts: int = 2,
                  block: int = 16, sink: int = 16, window: int = 64, sigma: float = 1.0, metric: str = "context",
                  reduce: str = "max", tolerance: float = 0.37, progress: bool = True) -> Plan:
    """Calibrate every KV head of every full-attention layer (module docstring). Calibration text: synthetic
    retrieval prompts (seeds disjoint from the evaluation's) unless ``texts`` are given. Returns a ``tca`` plan whose
    heads carry their quota (``budget``), mu (``alpha``), sigma (``beta``) and error (``score``), with every head's
    error at every quota in the layer's ``params["errors"]``."""
    from ..policies.tca import TCAPolicy

    TCAPolicy(block=block, sink=sink, window=window, sigma=sigma, metric=metric)  # the same option checks as the policy's
    if reduce not in ("mean", "max"):
        raise AccelError(f"calibrate(tca): reduce must be 'mean' or 'max', got {reduce!r}")
    if not tolerance >= 0:
        raise AccelError(f"calibrate(tca): tolerance must be >= 0, got {tolerance!r}")
    info = get_adapter(model).info()
    tokens = min(tokens, info.max_context or tokens)
    if sink + window + block + steps >= tokens:
        raise AccelError(f"calibrate(tca): tokens ({tokens}) must exceed sink + window + block + steps "
                         f"({sink + window + block + steps})")
    if texts is None:
        texts = calibration_prompts(tokenizer, n_texts, tokens)
    if isinstance(texts, str):
        texts = [texts]
    full_layers = [i for i, w in enumerate(info.sliding_windows) if w is None]
    Hkv = info.num_kv_heads
    acc = {li: torch.zeros(Hkv, block, dtype=torch.float64) for li in full_layers}
    bar = progress_bar(progress, len(texts), "calibrating tca")
    t0 = time.perf_counter()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
        if ids.shape[1] <= sink + window + block + steps:
            raise AccelError(f"calibrate(tca): a calibration text has only {ids.shape[1]} tokens")
        rec = Recorder(steps=steps, keep_values=True)
        with patch_lm(model, (rec, {}), fast_linear=False), torch.no_grad():
            model(input_ids=ids, use_cache=True, **last_logits_only(model))
        for li in full_layers:
            q, k, scale = rec.records[li]
            acc[li] += quota_errors(q, k, rec.values[li], scale, sink, window, block, metric, reduce).double()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    reachable = family(block, sigma)
    layers = []
    kept = []
    for li in range(info.num_layers):
        if li not in acc:
            layers.append(LayerPlan(mode="full", kv=None))
            continue
        errs = (acc[li] / len(texts)).tolist()
        heads = []
        for h in range(Hkv):
            qt = pick(errs[h], reachable, tolerance, block)
            heads.append(HeadPlan(kind="tca", budget=qt, alpha=reachable.get(qt), beta=float(sigma),
                                  score=round(float(errs[h][qt - 1]), 6)))
            kept.append(qt / block)
        layers.append(LayerPlan(mode="compress", kv="tca", sink=sink, recent=window, heads=heads,
                                params={"errors": [[round(float(e), 6) for e in row] for row in errs]}))
    plan = Plan(
        policy="tca", num_layers=info.num_layers, num_kv_heads=Hkv, model_type=info.model_type,
        params={"block": block, "sink": sink, "window": window, "sigma": float(sigma), "metric": metric,
                "tolerance": float(tolerance),
                "head_fields": {"budget": "tokens kept per block", "alpha": "mu", "beta": "sigma",
                                "score": "relative L2 error of the layer's attention output at that quota"}},
        layers=layers,
        provenance={
            "fingerprint": info.fingerprint,
            "source": "accel.calibrate (TCA-Attention: per-head quota from the attention-output error, no training)",
            "args": {"tokens": tokens, "steps": steps, "n_texts": len(texts), "block": block, "sink": sink,
                     "window": window, "sigma": sigma, "metric": metric, "reduce": reduce,
                     "tolerance": tolerance},
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    plan.validate(num_layers=info.num_layers, num_kv_heads=Hkv)
    logger.info("calibrated tca plan: blocks keep %.1f%% of their tokens on average at tolerance %.3g",
                100 * sum(kept) / max(len(kept), 1), tolerance)
    return plan
