"""The scheduler's quality model: every KV head's predicted damage under each eviction rule and budget.

For ``policy="auto"`` (``accel.policies.auto``, ``accel.scheduler.solve``). Calibration texts are prefilled densely
once each; for every full-attention layer, KV head, rule (``window``: sinks + newest tokens; ``scored``: SnapKV's
score from the prompt's last ``window`` queries) and share of the prompt kept, the profile records

    damage(l, h, rule, share) = attention mass the head's queries after the prompt put on the prompt tokens
                                that head has dropped by then (the largest over its GQA group's query heads),

reduced over those queries by ``reduce`` ("max": the worst step, default; "mean") and averaged over the texts.
It is the attention a compressed head loses at decode time under ``decode="fixed"`` (each generated token takes a
prompt token's place, ``lost_mass``), one head compressed at a time (the independence MoA's
profile assumes too); the solver adds it over heads. ``far_mass`` in ``accel.calibration.duo`` is the same
quantity for one window; its A/B there (max over the answer steps ranked heads better than the mean output error)
set the default ([INFER] the metric and its reduction).

Texts ([INFER]): ``n_texts`` prompts of ``tokens`` tokens, alternating passkey and needle retrieval prompts (split at
the end of the question: the queries scored are the answer's tokens, as DuoAttention profiles on synthetic passkey
retrieval with the answer appended); ``data="mixed"`` adds plain essay text after every two (the last ``steps``
tokens scored). The retrieval prompts have seeds of their own (``CALIB_SEED``); essay passages come from the essays'
second half, clear of the evaluation's perplexity passages (which start in the first half) up to 7/6 of ``tokens``.
``metric="output"`` ([INFER]) records the relative change of the head's output instead of the lost mass
(``output_error``).
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
from ..policies.auto import RULES
from .common import CALIB_SEED, Recorder, progress_bar

logger = logging.getLogger("accel")

#: the shares of the prompt the profile measures (1.0 is every token: no damage)
SHARES = (0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0)
#: the damage a profile records: attention mass lost, or the relative change of the head's output ([INFER])
METRICS = ("lost_mass", "output")
#: the kv_budget targets whose plans' perplexity the profile measures ([INFER]: the evaluation's budgets and the
#: steps between them)
PPL_BUDGETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75)


#: what the damage profile is measured on: ``retrieval`` (passkey and needle prompts with their answers) or
#: ``mixed`` (those and essay text, in turn)
DATA = ("retrieval", "mixed")


def auto_texts(tokenizer, n: int, tokens: int, steps: int = 64,
               data: str = "retrieval") -> list[tuple[torch.Tensor, int]]:
    """``n`` calibration texts as (ids [1, T], split): retrieval prompts with their answer appended (split at the
    prompt's end) and essay text (split ``steps`` tokens before the end), in turn: passkey, needle, essay.
    ``data="retrieval"``: the same sequence without its essay texts (the first ``n`` of its passkey and needle
    prompts, each with the seed and depth it has in the mixed sequence)."""
    from ..eval.niah import make_niah
    from ..eval.passkey import make_passkey

    if data not in DATA:
        raise AccelError(f"calibrate(auto): data must be one of {', '.join(DATA)}, got {data!r}")
    out = []
    i = -1
    while len(out) < n:
        i += 1
        kind = i % 3
        if kind < 2:
            make = make_passkey if kind == 0 else make_niah
            s = make(tokenizer, tokens - 24, depth=(0.1 + 0.8 * ((i * 0.37) % 1.0)), seed=CALIB_SEED + i)
            p = tokenizer(s.prompt, return_tensors="pt")["input_ids"]
            a = tokenizer(" " + s.answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out.append((torch.cat([p, a], 1), p.shape[1]))
        elif data == "mixed":
            out.append((essay_passages(tokenizer, 1, tokens, first=i)[0], tokens - steps))
    return out


def essay_passages(tokenizer, n: int, tokens: int, first: int = 0) -> list[torch.Tensor]:
    """``n`` passages [1, tokens] of the essays' second half (the evaluation reads the first), at the calibration's
    offsets ``first``, ``first + 1``, ..."""
    from ..eval.text import essays_text

    text = essays_text()
    half = len(text) // 2
    out = []
    for i in range(first, first + n):
        x = ((CALIB_SEED + i) * 104_729) % max(1, half - tokens * 6)
        if x < 7 * tokens:  # clear of the evaluation's passages (from the first half, 6 characters a token)
            x += 7 * tokens
        start = half + x
        ids = tokenizer(text[start:start + tokens * 6], return_tensors="pt")["input_ids"][:, :tokens]
        if ids.shape[1] < tokens:
            raise AccelError("calibrate(auto): not enough essay text for the requested length")
        out.append(ids)
    return out


def keep_orders(q_win: torch.Tensor, k_prompt: torch.Tensor, scale: float, rule: str, sink: int, window: int,
                kernel: int) -> torch.Tensor:
    """[Hkv, c] prompt positions of one layer in the order a head of ``rule`` keeps them (the first ``b`` are what a
    budget of ``b`` tokens keeps): ``AutoPolicy``'s own keep scores (``window``: the first ``sink`` tokens then the
    newest; ``scored``: the observation window then SnapKV's score), highest first."""
    from ..policies.auto import AutoPolicy
    from ..policies.budgeted import PrefillView

    pol = AutoPolicy(sink=sink, window=window, kernel=kernel)
    pol._rule = rule
    s = pol.token_scores(PrefillView(query=q_win.unsqueeze(0)), k_prompt.unsqueeze(0), None, None, scale)[0]
    return torch.sort(s.double(), dim=-1, descending=True, stable=True).indices


def _held(S: int, c: int, budgets: list[int], evict: bool, protected: int) -> torch.Tensor:
    """[S, len(budgets)]: how many of its kept prompt tokens a head of each budget still holds at each of ``S`` decode
    steps (``lost_mass``: one evicted per generated token under ``evict``, never below ``protected``; all of them when
    the budget covers the prompt)."""
    steps = torch.arange(S).view(S, 1)
    b = torch.tensor([min(x, c) for x in budgets]).view(1, -1)
    floor = b.clamp(max=protected)
    return torch.where(b >= c, b, torch.maximum(b - steps, floor)) if evict else b.expand(S, -1)


def lost_mass(q_eval: torch.Tensor, k: torch.Tensor, scale: float, c: int, orders: torch.Tensor,
              budgets: list[int], reduce: str, evict: bool = True, protected: int = 0) -> torch.Tensor:
    """[Hkv, len(budgets)]: the attention mass the queries ``q_eval`` [H, S, D] (positions c..c+S-1) put on the
    prompt tokens a head of budget ``b`` has dropped, max over the GQA group, reduced over the queries.

    The head keeps the first ``b`` tokens of ``orders`` [Hkv, c] at compression; with ``evict`` (``decode="fixed"``)
    each generated token then takes one prompt token's place, so the query at step ``s`` sees the first ``b - s``:
    exact for the window rule (the oldest non-sink token leaves first, and ``orders`` lists sinks then newest), for
    the scored rule the lowest-scored token first, without the scores the decode steps add. The first ``protected``
    tokens of ``orders`` are never evicted (the window rule's sinks). A budget covering the prompt keeps everything
    (such a head grows)."""
    H, S, D = q_eval.shape
    Hkv, T, _ = k.shape
    G = H // Hkv
    logits = torch.einsum("hsd,htd->hst", q_eval, k.repeat_interleave(G, 0)) * scale
    pos = torch.arange(c, c + S).view(S, 1)
    logits = logits.masked_fill(torch.arange(T).view(1, T) > pos, float("-inf"))
    p = torch.softmax(logits.double(), -1)[..., :c]  # [H, S, c] mass on the prompt
    total = p.sum(-1)  # [H, S]
    ordered = p.gather(-1, orders.repeat_interleave(G, 0).view(H, 1, c).expand(H, S, c))
    kept = torch.cat([torch.zeros(H, S, 1, dtype=ordered.dtype), ordered.cumsum(-1)], -1)  # [H, S, c + 1]
    held = _held(S, c, budgets, evict, protected)  # [S, nb] prompt tokens each query sees
    got = kept.gather(-1, held.view(1, S, -1).expand(H, S, held.shape[1]))  # [H, S, nb]
    lost = (total.unsqueeze(-1) - got).clamp(min=0)
    lost = lost.view(Hkv, G, S, -1).amax(1)  # [Hkv, S, nb]
    return (lost.amax(1) if reduce == "max" else lost.mean(1)).float()


def output_error(q_eval: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, c: int, orders: torch.Tensor,
                 budgets: list[int], reduce: str, evict: bool = True, protected: int = 0) -> torch.Tensor:
    """[Hkv, len(budgets)]: like ``lost_mass``, but the damage is the change of the head's output, the relative error
    ``||o - o_b|| / ||o||`` of the attention output ``o`` when the head keeps only what a budget ``b`` keeps of the
    prompt (the weights of what it keeps renormalised, the tokens after the prompt always kept), max over the GQA
    group, reduced over the queries. Dropping many small weights of similar values (a diffuse head) changes the
    output little; dropping the one token a retrieval head copies changes it entirely, which lost mass cannot tell
    apart ([INFER]; DuoAttention's ``relative`` metric for every rule and share)."""
    H, S, D = q_eval.shape
    Hkv, T, _ = k.shape
    G = H // Hkv
    held = _held(S, c, budgets, evict, protected)  # [S, nb]
    nb = held.shape[1]
    pos = torch.arange(c, c + S).view(S, 1)
    out = torch.zeros(Hkv, G, S, nb, dtype=torch.float64)
    for h in range(H):
        kv = h // G
        logits = (q_eval[h] @ k[kv].T) * scale  # [S, T]
        logits = logits.masked_fill(torch.arange(T).view(1, T) > pos, float("-inf"))
        p = torch.softmax(logits.double(), -1)
        vv = v[kv].double()
        full = p @ vv  # [S, D]
        tail_w, tail_m = p[:, c:] @ vv[c:], p[:, c:].sum(-1, keepdim=True)  # the tokens after the prompt
        order = orders[kv]
        p_ord = p[:, :c].gather(-1, order.view(1, c).expand(S, c))  # [S, c]
        cw = torch.cat([torch.zeros(S, 1, D), (p_ord.float().unsqueeze(-1) * v[kv][order].float().unsqueeze(0))
                        .cumsum(1)], 1)  # [S, c + 1, D] the kept weighted values
        cm = torch.cat([torch.zeros(S, 1, dtype=p_ord.dtype), p_ord.cumsum(-1)], -1)  # [S, c + 1] the kept mass
        kept_w = cw.gather(1, held.view(S, nb, 1).expand(S, nb, D)).double() + tail_w.unsqueeze(1)  # [S, nb, D]
        kept_m = cm.gather(1, held) + tail_m  # [S, nb]
        o_b = kept_w / kept_m.clamp(min=1e-300).unsqueeze(-1)
        err = (o_b - full.unsqueeze(1)).norm(dim=-1) / full.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        out[kv, h % G] = torch.where(held >= c, torch.zeros_like(err), err)  # everything kept: exact
    out = out.amax(1)  # [Hkv, S, nb]
    return (out.amax(1) if reduce == "max" else out.mean(1)).float()


def ppl_curve(model, profile_plan: Plan, passages: list[torch.Tensor], steps: int, budgets=PPL_BUDGETS,
              bar=None) -> dict:
    """The measured perplexity of the plans the solver picks for ``budgets`` (``kv_budget`` targets) on
    ``passages`` (each [1, T]: the last ``steps`` tokens scored teacher-forced after the rest, on a fork of one dense
    prefill, as the evaluation's ``lm`` task), against dense attention: ``{"budgets", "damage" (each plan's predicted
    damage), "ppl_increase" (ppl / dense ppl - 1, the tokens of every passage pooled), "dense_ppl", "passages",
    "steps"}``. Budgets below what the profile's smallest share keeps are left out."""
    from ..api import patch
    from ..eval.runner import teacher_forced
    from ..policies.auto import kept_tokens

    prof = profile_plan.params["profile"]
    sink, window = int(profile_plan.params["sink"]), int(profile_plan.params["window"])
    n = int(prof["context"])
    floor = max(kept_tokens(prof["shares"][0], n, r, sink, window) for r in RULES) / n
    budgets = [float(b) for b in budgets if b >= floor]
    plans = {}
    for b in budgets:  # each solved by the policy's own planner, as accel.patch(model, "auto", kv_budget=b) solves it
        with patch(model, f"auto@kv_budget={b}", plan=profile_plan) as h:
            plans[f"auto@kv_budget={b}"] = h.runtime.plan
    names = ["dense", *plans]
    nll = dict.fromkeys(names, 0.0)
    for ids in passages:
        prefix, cont = ids[:, :-steps], ids[0, -steps:]
        scored = teacher_forced(model, prefix, cont, names, plans=plans)
        for name, (logp, _) in scored.items():
            nll[name] += -float(logp.gather(1, cont.view(-1, 1)).sum())
        if bar is not None:
            bar.update(1)
    total = steps * len(passages)
    dense = math.exp(nll["dense"] / total)
    return {
        "budgets": budgets,
        "damage": [plans[k].params["predicted"]["damage"] for k in plans],
        "ppl_increase": [round(math.exp(nll[k] / total) / dense - 1, 6) for k in plans],
        "dense_ppl": round(dense, 6), "passages": len(passages), "steps": steps,
    }


def calibrate_auto(model, tokenizer, texts=None, *, tokens: int = 4096, n_texts: int = 12, steps: int = 64,
                   sink: int = 16, window: int = 32, kernel: int = 7, reduce: str = "max", ppl_texts: int | list = 3,
                   metric: str = "lost_mass", data: str = "retrieval", progress: bool = True) -> Plan:
    """Profile every full-attention KV head (module docstring) and return an ``auto`` profile plan: its
    ``params["profile"]`` holds the damage table and its layers are not assigned yet, so one calibration serves every
    target (``accel.patch(model, "auto", plan=plan, kv_budget=...)`` solves it for the target, 25% by default;
    ``accel plan --policy auto`` writes it solved). ``texts``: a list of ``(ids [1, T], split)`` pairs (default
    ``auto_texts``). ``ppl_texts``: how many essay passages of ``tokens`` tokens the perplexity curve (``ppl_curve``)
    is measured on, or the passages themselves (token ids [1, T]); 0: no curve, and no ``max_ppl_increase`` target
    from this profile."""
    from ..policies.auto import kept_tokens

    if reduce not in ("max", "mean"):
        raise AccelError(f"calibrate(auto): reduce must be 'max' or 'mean', got {reduce!r}")
    if metric not in METRICS:
        raise AccelError(f"calibrate(auto): metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if data not in DATA:
        raise AccelError(f"calibrate(auto): data must be one of {', '.join(DATA)}, got {data!r}")
    info = get_adapter(model).info()
    tokens = min(tokens, info.max_context or tokens)
    if tokens < 4 * (steps + window + sink):
        raise AccelError(f"calibrate(auto): tokens ({tokens}) must be at least 4 x (steps + window + sink)")
    if isinstance(ppl_texts, (list, tuple)):
        if not all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == 1 and t.shape[1] > 2 * steps
                   for t in ppl_texts):
            raise AccelError(f"calibrate(auto): ppl_texts must be token ids [1, T] with T > 2 x steps ({2 * steps})")
    elif isinstance(ppl_texts, bool) or not isinstance(ppl_texts, int) or ppl_texts < 0:
        raise AccelError(f"calibrate(auto): ppl_texts must be a number of essay passages >= 0 or a list of token "
                         f"ids [1, T], got {ppl_texts!r}")
    elif ppl_texts and tokenizer is None:
        raise AccelError("calibrate(auto): the perplexity curve's essay passages need the tokenizer; pass "
                         "ppl_texts=[ids, ...] or ppl_texts=0 (no curve)")
    n_ppl = len(ppl_texts) if isinstance(ppl_texts, (list, tuple)) else ppl_texts
    given = texts
    if texts is None:
        texts = auto_texts(tokenizer, n_texts, tokens, steps, data)
    full_layers = [i for i, w in enumerate(info.sliding_windows) if w is None]
    if not full_layers:
        raise AccelError("calibrate(auto): the model has no full-attention layer to compress")
    bar = progress_bar(progress, len(texts) + n_ppl, "calibrating auto")
    t0 = time.perf_counter()
    damage = {r: {li: torch.zeros(info.num_kv_heads, len(SHARES)) for li in full_layers} for r in RULES}
    dev = next(model.parameters()).device
    for ids, split in texts:
        T = ids.shape[1]
        if not (window < split < T):
            raise AccelError(f"calibrate(auto): a text's split ({split}) must lie between the observation window "
                             f"({window}) and its length ({T})")
        rec = Recorder(steps=T - split + window, keep_values=metric == "output")
        with patch_lm(model, (rec, {}), fast_linear=False), torch.no_grad():
            model(input_ids=ids.to(dev), use_cache=True, **last_logits_only(model))
        for li in full_layers:
            q, k, scale = rec.records[li]
            q, k = q.cpu(), k.cpu()
            for r in RULES:
                budgets = [kept_tokens(s, split, r, sink, window) for s in SHARES]
                orders = keep_orders(q[:, :window], k[:, :split], scale, r, sink, window, kernel)
                if metric == "output":
                    damage[r][li] += output_error(q[:, window:], k, rec.values[li].cpu(), scale, split, orders,
                                                  budgets, reduce, protected=sink if r == "window" else 0)
                else:
                    damage[r][li] += lost_mass(q[:, window:], k, scale, split, orders, budgets, reduce,
                                               protected=sink if r == "window" else 0)
        if bar is not None:
            bar.update(1)
    n = len(texts)
    profile = {
        "metric": metric, "reduce": reduce, "context": int(round(sum(split for _, split in texts) / n)),
        "shares": list(SHARES), "rules": list(RULES), "layers": full_layers,
        "damage": {r: [[[round(float(x) / n, 6) for x in row] for row in damage[r][li]] for li in full_layers]
                   for r in RULES},
    }
    layers = [LayerPlan(mode="full") for _ in range(info.num_layers)]
    plan = Plan(
        policy="auto", num_layers=info.num_layers, num_kv_heads=info.num_kv_heads, model_type=info.model_type,
        params={"sink": sink, "window": window, "kernel": kernel, "profile": profile}, layers=layers,
        provenance={
            "fingerprint": info.fingerprint,
            "source": f"accel.calibrate (auto: each head's {metric} under each rule and budget)",
            "args": {"tokens": tokens, "n_texts": n, "steps": steps, "sink": sink, "window": window,
                     "kernel": kernel, "reduce": reduce, "ppl_texts": n_ppl, "metric": metric,
                     "data": data if given is None else "given"},
        },
    )
    if any(not math.isfinite(x) for r in RULES for L in profile["damage"][r] for row in L for x in row):
        raise AccelError("calibrate(auto): the profile holds non-finite damage; check the model's dtype")
    if n_ppl:
        passages = (list(ppl_texts) if isinstance(ppl_texts, (list, tuple))
                    else essay_passages(tokenizer, ppl_texts, tokens, first=n))
        profile["ppl"] = ppl_curve(model, plan, passages, steps, bar=bar)
    if bar is not None:
        bar.close()
    plan.provenance["seconds"] = round(time.perf_counter() - t0, 1)
    return plan
