"""Offline profiling on calibration text and the HyLRA planner (``accel.calibrate``).

Following HyLRA's profiler (methods.md 1.2-1.5): the dense model reads calibration text; for the last
``steps`` positions of each text, every layer's post-RoPE query attends to its causal prefix exactly as a
decode step would (teacher forcing: one prefill yields ``steps`` decode-step queries per layer, the same
numbers a token-by-token decode gives). From those probabilities, per layer and KV head:

* sensitivity ``ratio90``: probabilities summed over the group's query heads, summed into chunks,
  the fraction of chunks needed for 90% of the mass; outliers across steps clipped with the 1.5 IQR
  rule, averaged over steps, then over KV heads -> ``stat[l]`` (high = diffuse = sensitive);
* inter-layer overlap: probabilities averaged over the group, chunk sums, sink and recent chunks forced,
  top-k chunks; ``overlap[i, j]`` = mean over steps of ``|m_i & m_j| / |m_j|``; merged over KV heads
  with the element-wise minimum.

The ``ceil(L * (1 - sparsity))`` most sensitive layers become rollback (full-attention) layers; their
rows and columns of the overlap are zeroed (diagonal kept) so they neither donate nor receive
(``rollback_can_donate=True`` keeps their rows [INFER]); the DP (``dp.hylra_dp``) then picks anchors
with ``c_max = ceil(L * sparsity * computed_ratio) + |rollback|`` switches. Sliding-window layers
(Gemma 3's local layers) stay exact and are left out of the DP.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from ..errors import AccelError
from ..models.base import last_logits_only
from ..models.registry import get_adapter
from ..patching.lm import patch_lm
from ..plan import LayerPlan, Plan
from .common import Recorder, calibration_prompts, progress_bar
from .dp import hylra_dp, path_value

logger = logging.getLogger("accel")


def _ratio90(chunk_mass: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """chunk_mass [..., S, nC] (zeros past each step's prefix), n_valid [S] chunks per step -> [..., S]."""
    srt = chunk_mass.sort(dim=-1, descending=True).values
    cum = srt.cumsum(-1) / srt.sum(-1, keepdim=True).clamp_min(1e-30)
    need = (cum < 0.9).sum(-1) + 1
    return need.float() / n_valid.float()


def _iqr_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim after clipping values outside [Q1 - 1.5 IQR, Q3 + 1.5 IQR]."""
    q1, q3 = torch.quantile(x, 0.25, dim=-1, keepdim=True), torch.quantile(x, 0.75, dim=-1, keepdim=True)
    iqr = q3 - q1
    return torch.maximum(torch.minimum(x, q3 + 1.5 * iqr), q1 - 1.5 * iqr).mean(-1)


def layer_statistics(q: torch.Tensor, k: torch.Tensor, scale: float, *, chunk: int, preserved: int, sink: int,
                     recent: int, return_mass: bool = False):
    """One layer, one text. q [H, S, D] (the last S positions), k [Hkv, T, D].
    Returns (ratio90 per KV head [Hkv, S], top-k chunk masks [Hkv, S, nC]) and, with ``return_mass``,
    each query head's attention mass per chunk [H, S, nC] (for ``mass_recall_matrix``)."""
    H, S, D = q.shape
    Hkv, T, _ = k.shape
    G = H // Hkv
    pos = torch.arange(T - S, T)  # query positions
    logits = torch.einsum("hsd,htd->hst", q, k.repeat_interleave(G, 0)) * scale
    causal = torch.arange(T).view(1, -1) <= pos.view(-1, 1)  # [S, T]
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).view(Hkv, G, S, T)
    nC = (T + chunk - 1) // chunk
    pad = nC * chunk - T

    def chunks(x):
        return torch.nn.functional.pad(x, (0, pad)).view(*x.shape[:-1], nC, chunk).sum(-1)

    n_valid = (pos // chunk) + 1  # chunks holding the prefix of each step
    ratio = _ratio90(chunks(p.sum(1)), n_valid)  # [Hkv, S]
    cm = chunks(p.mean(1))  # [Hkv, S, nC]
    cidx = torch.arange(nC).view(1, -1)
    valid_c = cidx < n_valid.view(-1, 1)
    forced = (cidx < (sink + chunk - 1) // chunk) | (cidx >= ((pos + 1 - recent).clamp_min(0) // chunk).view(-1, 1))
    forced &= valid_c
    score = cm.masked_fill(forced, float("inf")).masked_fill(~valid_c, float("-inf"))
    kc = max(1, preserved // chunk)
    top = score.topk(min(kc, nC), dim=-1).indices
    mask = torch.zeros(Hkv, S, nC, dtype=torch.bool).scatter_(-1, top, True) & valid_c
    if return_mass:
        return ratio, mask, chunks(p.reshape(H, S, T))
    return ratio, mask


def overlap_matrix(masks: list[torch.Tensor]) -> torch.Tensor:
    """masks: per layer [Hkv, S, nC] -> [Hkv, L, L] mean over steps of |m_i & m_j| / |m_j| (i <= j)."""
    L = len(masks)
    Hkv = masks[0].shape[0]
    out = torch.zeros(Hkv, L, L, dtype=torch.float64)
    for j in range(L):
        mj = masks[j].float()
        den = mj.sum(-1).clamp_min(1)
        for i in range(j + 1):
            out[:, i, j] = ((masks[i].float() * mj).sum(-1) / den).mean(-1).double()
    for i in range(L):
        out[:, i, i] = 1.0
    return out


def mass_recall_matrix(masks: list[torch.Tensor], mass: list[torch.Tensor], reduce: str = "mean") -> torch.Tensor:
    """The ``metric="mass"`` alternative to ``overlap_matrix`` ([INFER], accel's): ``out[h, i, j]`` = mean
    over steps of the share of query head ``h``'s attention in layer ``j`` that falls on layer ``i``'s
    selection for ``h``'s KV head (``i <= j``; the diagonal is each head's own recall, set to 1 as in the
    overlap). Weighting by attention mass, per query head, lets a retrieval head that puts most of its
    mass on a few chunks (a needle) veto a donor that misses them, where the chunk-count overlap barely
    moves. masks: per layer [Hkv, S, nC]; mass: per layer [H, S, nC] (``layer_statistics(return_mass=True)``).
    ``reduce``: over steps, 'mean' or 'min' (the worst step: a needle is read on a few steps only)."""
    L = len(masks)
    H = mass[0].shape[0]
    Hkv = masks[0].shape[0]
    G = H // Hkv
    out = torch.zeros(H, L, L, dtype=torch.float64)
    for j in range(L):
        mj = mass[j].view(Hkv, G, *mass[j].shape[1:])
        for i in range(j):
            got = (mj * masks[i].unsqueeze(1).to(mj.dtype)).sum(-1)  # [Hkv, G, S]
            got = got.reshape(H, -1)
            out[:, i, j] = (got.amin(-1) if reduce == "min" else got.mean(-1)).double()
        out[:, j, j] = 1.0
    return out


def calibrate_hylra(model, tokenizer, texts=None, *, tokens: int = 4096, steps: int | None = None,
              chunk: int = 16, preserved_ratio: float = 0.125, sink: int = 16, recent: int = 64,
              sparsity: float = 0.91, computed_ratio: float = 0.2, rollback_can_donate: bool = False,
              anchor_mode: str = "full", n_texts: int | None = None, data: str = "retrieval",
              metric: str | None = None, progress: bool = True) -> Plan:
    """Profile ``model`` on calibration text and solve HyLRA's layer DP. Returns a ``Plan``.

    Args:
        texts: calibration strings (default: the Paul Graham essays shipped with the data extra, split
            into ``n_texts`` windows of ``tokens`` tokens).
        tokens: tokens per calibration text (clipped to the model's context).
        steps: decode-step queries profiled per text (the last ``steps`` positions; default 32 for hylra,
            the question and answer of a retrieval prompt; 64 for duo / moa).
        chunk, preserved_ratio, sink, recent: the selection the profiler emulates (chunk size, top-k as a
            fraction of the text, forced sink / recent tokens); match them to the runtime knobs.
        sparsity: rollback layers = ceil(L * (1 - sparsity)) most sensitive layers (UCM default 0.91).
        computed_ratio: switch budget share (UCM default 0.3; 0.2 here [INFER]: on SmolLM2 at 4K, NIAH of 9
            dense-correct samples: 0.1 -> 7, 0.2 -> 8 with 3 more full layers; see the README).
        anchor_mode: 'full' (anchors compute exact attention and emit; paper wording) or 'select'
            (non-rollback anchors score their own top-k and attend sparsely; UCM's computing layers).
        data: calibration text when ``texts`` is None: 'retrieval' (default; synthetic passkey / needle
            prompts with their answers, the generator of the duo profiler, seeds disjoint from the
            evaluation's) or 'essays' (plain Paul Graham essays) [INFER]. Which layers retrieve a needle only
            shows on retrieval text: on SmolLM2 layers 18 and 23 put up to 0.95 of a head's attention on
            the needle, and the first shipped plan, profiled on essays with 'overlap', let them reuse layer
            15, which never selects it (NIAH 2 of 9 dense-correct samples at 4K; 'retrieval' + 'mass_min'
            with the same number of full layers: 7 of 9).
        metric: inter-layer similarity the DP maximises: 'overlap' (HyLRA/UCM: share of chunk masks,
            min over KV heads), 'mass' (``mass_recall_matrix``: share of each query head's attention mass
            the donor's selection keeps, mean over steps, min over query heads) or 'mass_min' (default:
            the same with the worst step instead of the mean, since a needle is read on a few steps)
            [INFER]. On retrieval text at 4K: overlap 1, mass 5, mass_min 7 of 9 NIAH samples (c_max 6).
            With ``policy="duo"`` it is the head score ('far_mass' by default, 'residual', 'relative').
    """
    if not (0.0 <= sparsity < 1.0) or not (0.0 <= computed_ratio <= 1.0):
        raise AccelError(f"calibrate: sparsity must be in [0, 1) and computed_ratio in [0, 1], got {sparsity}, {computed_ratio}")
    if data not in ("essays", "retrieval"):
        raise AccelError(f"calibrate: data must be 'essays' or 'retrieval', got {data!r}")
    metric = "mass_min" if metric is None else metric
    if metric not in ("overlap", "mass", "mass_min"):
        raise AccelError(f"calibrate: metric must be 'overlap', 'mass' or 'mass_min', got {metric!r}")
    if anchor_mode not in ("full", "select"):
        raise AccelError(f"calibrate: anchor_mode must be 'full' or 'select', got {anchor_mode!r}")
    steps = 32 if steps is None else steps
    n_texts = 4 if n_texts is None else n_texts
    info = get_adapter(model).info()
    limit = info.max_context or tokens
    tokens = min(tokens, limit)
    if steps >= tokens:
        raise AccelError(f"calibrate: steps ({steps}) must be smaller than tokens ({tokens})")
    texts_generated = texts is None
    # essays are cut to ``tokens``; a generated retrieval prompt keeps its end (question and answer)
    retrieval = data == "retrieval" and texts_generated
    if retrieval:
        texts = calibration_prompts(tokenizer, n_texts, tokens)
    elif texts is None:
        from ..eval.text import essays_text

        text = essays_text()
        span = len(text) // max(1, n_texts)
        texts = [text[i * span:(i + 1) * span] for i in range(n_texts)]
    if isinstance(texts, str):
        texts = [texts]
    full_layers = [i for i, w in enumerate(info.sliding_windows) if w is None]
    bar = progress_bar(progress, len(texts), "calibrating")
    t0 = time.perf_counter()
    stats_per_text, overlaps = [], []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
        ids = ids[:, -tokens:] if retrieval else ids[:, :tokens]
        if ids.shape[1] < (tokens * 3 // 4 if retrieval else tokens):
            raise AccelError(f"calibrate: a calibration text has {ids.shape[1]} tokens, fewer than tokens={tokens}")
        preserved = max(chunk, int(preserved_ratio * ids.shape[1]))
        rec = Recorder(steps=steps)
        with patch_lm(model, (rec, {}), fast_linear=False), torch.no_grad():
            model(input_ids=ids, use_cache=True, **last_logits_only(model))
        ratios, masks, masses = {}, [], []
        for li in full_layers:
            q, k, scale = rec.records[li]
            r, m, *ms = layer_statistics(q, k, scale, chunk=chunk, preserved=preserved, sink=sink, recent=recent,
                                         return_mass=metric.startswith("mass"))
            ratios[li] = _iqr_mean(r).mean().item()
            masks.append(m)
            masses.extend(ms)
        stats_per_text.append(ratios)
        if metric.startswith("mass"):  # min over query heads
            overlaps.append(mass_recall_matrix(masks, masses, "min" if metric == "mass_min" else "mean").amin(0))
        else:
            overlaps.append(overlap_matrix(masks).amin(0))  # min over KV heads
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    stat = {li: sum(s[li] for s in stats_per_text) / len(stats_per_text) for li in full_layers}
    Lf = len(full_layers)
    n_roll = math.ceil(Lf * (1 - sparsity))
    rollback_local = sorted(sorted(range(Lf), key=lambda x: -stat[full_layers[x]])[:n_roll])
    tables = []
    for A in overlaps:
        A = A.clone()
        for r in rollback_local:
            keep = A[r, r].item()
            if not rollback_can_donate:
                A[r, :] = 0
            A[:, r] = 0
            A[r, r] = keep
        tables.append(A)
    c_max = math.ceil(Lf * sparsity * computed_ratio) + len(rollback_local)
    config = hylra_dp(tables, c_max, rollback=set(rollback_local))
    vmin, vsum = path_value(tables, config)
    layers = [LayerPlan(mode="full", attention="hylra") for _ in range(info.num_layers)]
    for jl, src in enumerate(config):
        li = full_layers[jl]
        if src == -1:
            is_roll = jl in rollback_local
            layers[li] = LayerPlan(mode="full" if (is_roll or anchor_mode == "full") else "select", attention="hylra")
        else:
            layers[li] = LayerPlan(mode="reuse", attention="hylra", reuse_src=full_layers[src])
    rollback = [full_layers[r] for r in rollback_local]
    plan = Plan(
        policy="hylra", num_layers=info.num_layers, num_kv_heads=info.num_kv_heads, model_type=info.model_type,
        params={"chunk": chunk, "sink": sink, "recent": recent, "topk_ratio": preserved_ratio},
        layers=layers,
        provenance={
            "fingerprint": info.fingerprint, "source": "accel.calibrate (HyLRA profiler + DP)",
            "args": {"tokens": tokens, "steps": steps, "chunk": chunk, "preserved_ratio": preserved_ratio, "sink": sink,
                     "recent": recent, "sparsity": sparsity, "computed_ratio": computed_ratio,
                     "rollback_can_donate": rollback_can_donate, "anchor_mode": anchor_mode, "n_texts": len(texts),
                     "data": data if texts_generated else "user texts", "metric": metric},
            "rollback_layers": rollback, "c_max": c_max,
            "sensitivity_ratio90": {str(k): round(v, 4) for k, v in stat.items()},
            "similarity_matrix": [[round(float(x), 4) for x in row] for row in tables[0].tolist()],
            "path_min_overlap": round(vmin, 4), "path_sum_overlap": round(vsum, 4),
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    plan.validate(num_layers=info.num_layers, num_kv_heads=info.num_kv_heads)
    logger.info("calibrated hylra plan: rollback %s, anchors %s", rollback,
                [i for i, lp in enumerate(layers) if lp.mode != "reuse"])
    return plan
