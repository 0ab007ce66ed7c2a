"""MoA's profiler and optimiser (Fu et al., 2024, "MoA: Mixture of Sparse Attention for Automatic Large Language
Model Compression", arXiv 2406.14909; methods.md 4.1): every KV head's attention profiled at several lengths, the
mass each candidate (alpha, beta) band would drop, and a mixed-integer program (HiGHS through scipy) that picks one
span rule per head under an average density."""
from __future__ import annotations

import logging
import time

import torch

from ..errors import AccelError
from ..models.base import last_logits_only
from ..models.registry import get_adapter
from ..patching.lm import patch_lm
from ..plan import HeadPlan, LayerPlan, Plan
from ..policies.moa import MOA_MIN_CACHE, MOA_SINK, MOA_SPLIT, moa_span
from .common import Recorder, calibration_prompts, progress_bar

logger = logging.getLogger("accel")


def band_loss(p: torch.Tensor, spans: list[int], sink: int = MOA_SINK) -> torch.Tensor:
    """Attention mass a sink + sliding band drops. p [Hkv, S, T]: probabilities (summed over each KV
    head's group) of the last S positions of a T-token text. Returns [Hkv, len(spans)]: mean over the
    S queries of the mass outside the first ``min(span, sink)`` tokens and the ``span - sink`` tokens
    ending at the query."""
    Hkv, S, T = p.shape
    C = torch.nn.functional.pad(p.cumsum(-1), (1, 0))  # C[..., j] = mass of tokens < j
    pos = torch.arange(T - S, T)
    total = C[:, torch.arange(S), pos + 1]  # [Hkv, S]
    out = []
    for span in spans:
        sk = min(span, sink)
        w = span - sk
        lo = torch.clamp(pos + 1 - w, min=sk)  # window covers [lo, pos]
        kept = C[:, :, sk] + (C[:, torch.arange(S), pos + 1] - C[:, torch.arange(S), lo])
        kept = torch.minimum(kept, total)
        out.append(((total - kept) / total.clamp_min(1e-12)).mean(-1))
    return torch.stack(out, -1)


def solve_spans(loss: torch.Tensor, density: torch.Tensor, bound: float) -> torch.Tensor:
    """MoA's optimiser as a mixed-integer program (HiGHS through ``scipy.optimize.milp``): pick one
    candidate per head minimising the summed loss over the profiled lengths, subject to the average
    density (cached tokens / length) at every profiled length staying <= ``bound``.
    loss [heads, cands, lengths], density [cands, lengths] -> [heads] chosen candidate indices.
    [INFER] MoA optimises every length as a separate objective (Pareto front + validation); accel
    sums them with equal weights, and drops MoA's kernel-motivated limit of 2 configurations per layer."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    Hn, Cn, Ln = loss.shape
    c = loss.sum(-1).reshape(-1).double().numpy()
    A_eq = np.zeros((Hn, Hn * Cn))
    for h in range(Hn):
        A_eq[h, h * Cn:(h + 1) * Cn] = 1
    A_d = np.zeros((Ln, Hn * Cn))
    for li in range(Ln):
        A_d[li] = np.tile(density[:, li].double().numpy(), Hn)
    cons = [LinearConstraint(A_eq, 1, 1), LinearConstraint(A_d, -np.inf, bound * Hn)]
    res = milp(c, constraints=cons, integrality=np.ones(Hn * Cn), bounds=Bounds(0, 1))
    if res.x is None:
        raise AccelError(f"MoA optimiser: no span assignment meets density {bound} ({res.message}); raise the density")
    x = np.round(res.x).reshape(Hn, Cn)
    return torch.tensor(x.argmax(1))


def calibrate_moa(model, tokenizer, texts=None, *, lengths=(2048, 4096), steps: int = 64, n_texts: int = 2,
                  densities=(0.5, 0.25, 0.1), alphas=None, betas=None, progress: bool = True) -> Plan:
    """Profile every KV head's attention at several lengths and solve MoA's span program for each
    density. Returns a ``moa`` plan: heads carry (alpha, beta) of the first density, and
    ``params["solutions"]`` holds every density's spans (the ``moa`` policy's ``density`` picks one).

    Profiling statistic ([INFER]): MoA estimates the loss of masking attention entries from gradients
    (``A * dL/dA``) on model-aligned long QA; accel uses the attention mass each candidate band drops
    on the last ``steps`` queries of synthetic retrieval prompts (the same prompts as ``duo``'s),
    which needs no backward pass (a 4K backward through a 135M model does not fit a CPU profile)."""

    info = get_adapter(model).info()
    limit = info.max_context or max(lengths)
    lengths = [min(L, limit) for L in lengths]
    alphas = list(alphas) if alphas is not None else [-1024.0, 0.0, 1024.0]
    betas = list(betas) if betas is not None else [i / 8 for i in range(9)]
    cands = [(a, b) for a in alphas for b in betas]
    full_layers = [i for i, w in enumerate(info.sliding_windows) if w is None]
    Hkv = info.num_kv_heads
    loss = torch.zeros(len(full_layers) * Hkv, len(cands), len(lengths))
    dens = torch.zeros(len(cands), len(lengths))
    bar = progress_bar(progress, len(lengths) * n_texts, "calibrating moa")
    t0 = time.perf_counter()
    for li_len, L in enumerate(lengths):
        spans = [moa_span(a, b, L) for a, b in cands]
        dens[:, li_len] = torch.tensor(spans, dtype=torch.float64) / L
        prompts = texts if texts is not None else calibration_prompts(tokenizer, n_texts, L)
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :L]
            rec = Recorder(steps=steps)
            with patch_lm(model, (rec, {}), fast_linear=False), torch.no_grad():
                model(input_ids=ids, use_cache=True, **last_logits_only(model))
            T = ids.shape[1]
            for j, li in enumerate(full_layers):
                q, k, scale = rec.records[li]
                H, S, D = q.shape
                G = H // Hkv
                pos = torch.arange(T - S, T).view(S, 1)
                logits = torch.einsum("hsd,htd->hst", q, k.repeat_interleave(G, 0)) * scale
                p = torch.softmax(logits.masked_fill(torch.arange(T).view(1, T) > pos, float("-inf")), -1)
                p = p.view(Hkv, G, S, T).sum(1)
                loss[j * Hkv:(j + 1) * Hkv, :, li_len] += band_loss(p, [moa_span(a, b, T) for a, b in cands]) / len(prompts)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    solutions = {}
    for d in densities:
        choice = solve_spans(loss, dens, float(d))
        sol = [[list(cands[int(choice[j * Hkv + h])]) for h in range(Hkv)] for j in range(len(full_layers))]
        solutions[str(d)] = {"spans": sol,
                             "profiled_loss": round(float(sum(loss[i, int(choice[i])].sum() for i in range(len(choice)))), 4),
                             "density": [round(float(dens[choice, i].mean()), 4) for i in range(len(lengths))]}
    first = solutions[str(densities[0])]["spans"]
    layers = []
    for li in range(info.num_layers):
        if li not in full_layers:
            layers.append(LayerPlan(mode="full", kv=None))
            continue
        j = full_layers.index(li)
        heads = [HeadPlan(kind="budget", alpha=float(a), beta=float(b)) for a, b in first[j]]
        layers.append(LayerPlan(mode="compress", kv="moa", heads=heads))
    plan = Plan(
        policy="moa", num_layers=info.num_layers, num_kv_heads=Hkv, model_type=info.model_type,
        params={"solutions": {d: s["spans"] for d, s in solutions.items()}, "density": float(densities[0]),
                "sink": MOA_SINK, "min_cache": MOA_MIN_CACHE, "split": MOA_SPLIT},
        layers=layers,
        provenance={
            "fingerprint": info.fingerprint,
            "source": "accel.calibrate (MoA: band mass-loss profile + span MILP, HiGHS)",
            "args": {"lengths": lengths, "steps": steps, "n_texts": n_texts, "densities": list(densities),
                     "alphas": alphas, "betas": betas},
            "solutions": {d: {"profiled_loss": s["profiled_loss"], "density": s["density"]} for d, s in solutions.items()},
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    plan.validate(num_layers=info.num_layers, num_kv_heads=Hkv)
    return plan

