"""Quality evaluation: generation tasks (passkey, NIAH, RULER) and teacher-forced language-model
metrics (perplexity, agreement with dense), for the unpatched model and accel policies, on the same
samples in one run.

Shared prefill: prefill costs tens of seconds per sample here, and every policy whose prefill is
exact dense attention produces the same prompt KV. So each sample's prompt (all but its last token)
is prefilled once with accel's dense path, and each policy decodes from its own copy of that cache
(``fork_cache``; a ``DynamicCache`` copy for the unpatched baseline). Policies that change prefill
(``Policy.dense_prefill = False``) run their own prefill.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .. import compat
from ..config import cache_dir
from ..errors import AccelError

BASELINE = "hf"  # the unpatched transformers model
GEN_TASKS = ("passkey", "niah")
LM_TASKS = ("lm",)  # perplexity + agreement with dense


@dataclass
class Sample:
    task: str
    target_len: int
    prompt: str
    answers: list[str]
    depth: float | None = None
    max_new_tokens: int = 16
    n_tokens: int = 0
    idx: int = 0


@dataclass
class Result:
    policy: str
    task: str
    target_len: int
    n_tokens: int
    depth: float | None
    idx: int
    score: float
    prediction: str
    decode_s: float = float("nan")
    extra: dict = field(default_factory=dict)


def patch_for(model, policy: str, overrides: dict | None = None, plan=None, reserve: int = 0):
    """Patch ``model`` with ``policy`` unless it is the unpatched baseline; returns the handle or None."""
    if policy == BASELINE:
        return None
    from ..api import patch

    return patch(model, policy, plan=plan, reserve=reserve, **(overrides or {}))


# -- samples ---------------------------------------------------------------------------------------
def build_samples(task: str, tok, tokenizer_path, lengths: list[int], depths: list[float], n: int,
                  seed: int) -> list[Sample]:
    """Deterministic samples for ``task``; cached as JSON under the accel cache folder."""
    key = json.dumps([task, lengths, depths, n, seed, str(tokenizer_path)], sort_keys=True)
    path = cache_dir() / "datasets" / "samples" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    if path.exists():
        return [Sample(**d) for d in json.loads(path.read_text())]
    out: list[Sample] = []
    if task in ("passkey", "niah"):
        from .niah import make_niah
        from .passkey import make_passkey

        make = make_passkey if task == "passkey" else make_niah
        for L in lengths:
            for i in range(n):
                d = depths[i % len(depths)]
                s = make(tok, L - 16, depth=d, seed=seed * 1000 + i)
                out.append(Sample(task, L, s.prompt, [s.answer], d, 16, s.n_tokens, i))
    elif task.startswith("ruler_"):
        from .ruler import generate_ruler

        for L in lengths:
            rows = generate_ruler(task[len("ruler_"):], tokenizer_path, L, n, seed=seed)
            for i, r in enumerate(rows):
                n_tok = len(tok(r["input"])["input_ids"])
                out.append(Sample(task, L, r["input"], list(r["outputs"]), None, int(r["tokens_to_generate"]), n_tok, i))
    else:
        raise AccelError(f"unknown task {task!r}; tasks: passkey, niah, ruler_<{'|'.join(_ruler_names())}>, lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(s) for s in out]))
    return out


def _ruler_names():
    from .ruler import RULER_TASKS

    return RULER_TASKS


def score(task: str, prediction: str, answers: list[str]) -> float:
    if task == "passkey":
        from .passkey import passkey_correct

        return float(passkey_correct(prediction, answers[0]))
    if task == "niah":
        from .niah import niah_correct

        return float(niah_correct(prediction, answers[0]))
    from .ruler import string_match_all

    return string_match_all(prediction, answers)


# -- cache forking -----------------------------------------------------------------------------------
def fork_cache(cache, for_hf: bool = False):
    """An independent copy of an ``AccelCache`` (or a ``DynamicCache`` with the same contents)."""
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    from ..cache.accel_cache import AccelCache, AccelLayer

    if for_hf:
        new = DynamicCache()
        layers = []
        for layer in cache.layers:
            if layer.is_sliding:
                hl = DynamicSlidingWindowLayer(sliding_window=layer.sliding_window)
                hl.update(layer.keys.clone(), layer.values.clone())
                hl.cumulative_length = layer.cumulative_length
                keep = min(layer.cumulative_length, layer.sliding_window - 1)
                hl.keys, hl.values = hl.keys[:, :, -keep:], hl.values[:, :, -keep:]
            else:
                from transformers.cache_utils import DynamicLayer

                hl = DynamicLayer()
                hl.update(layer.keys.clone(), layer.values.clone())
            layers.append(hl)
        new.layers = layers
        new.layer_class_to_replicate = None
        return new
    new = AccelCache.__new__(AccelCache)
    new.__dict__.update({k: v for k, v in cache.__dict__.items() if k != "layers"})
    new.layers = []
    for layer in cache.layers:
        nl = AccelLayer.__new__(AccelLayer)
        nl.__dict__.update(layer.__dict__)
        for name in ("k_buf", "v_buf", "head_lengths"):
            t = getattr(layer, name)
            setattr(nl, name, None if t is None else t.clone())
        nl.num_reallocations = 0
        new.layers.append(nl)
    return new


def _shares_dense_prefill(policy_name: str) -> bool:
    if policy_name == "hf":
        return True
    from ..policies.registry import make_policy

    pol = make_policy(policy_name)
    parts = [pol.attention, *pol.kv] if hasattr(pol, "kv") else [pol]
    return all(getattr(p, "dense_prefill", True) for p in parts)


def _prefill(model, ids, mask, record: list | None = None):
    """Prefill ``ids`` with accel's dense path; returns the AccelCache and seconds. ``record``: prefill
    statistics KV-cache policies need to compress a copy of the cache (``_stats_needed``)."""
    from ..models.base import last_logits_only
    from ..api import patch

    t = time.perf_counter()
    with patch(model, "dense") as h, torch.no_grad():
        h.runtime.record_stats = record or None
        model(input_ids=ids, attention_mask=mask, use_cache=True, **last_logits_only(model))
        cache = h.cache
    return cache, time.perf_counter() - t


def _stats_needed(policies: list[str], overrides: dict | None = None) -> list:
    """The KV-cache policies among ``policies``: the shared prefill records what each of them needs
    (``prefill_statistics``) to compress a copy of the cache later."""
    from ..policies.registry import make_policy

    need, seen = [], set()
    for name in policies:
        if name == BASELINE:
            continue
        pol = make_policy(name, _own_overrides(name, overrides))
        parts = list(getattr(pol, "kv", []) or [])
        attn = getattr(pol, "attention", pol)
        if "prefill_statistics" in type(attn).__dict__:  # an attention policy that decides from the prompt (flux)
            parts.append(attn)
        for p in parts:
            # one recording per statistic, not per budget of a policy
            key = (type(p), getattr(p, "stats_key", getattr(p, "window", None)))
            if key not in seen:
                seen.add(key)
                need.append(p)
    return need


def _own_overrides(name: str, overrides: dict | None) -> dict | None:
    return overrides if name not in ("hf", "dense") else None


def kv_bytes(cache) -> float:
    """KV bytes a policy's cache holds when its decode starts (after compression), NaN where the cache is not
    accel's (the unpatched baseline's)."""
    f = getattr(cache, "nbytes", None)
    return float(f()) if callable(f) else float("nan")


def _compress_fork(handle, cache, mask) -> None:
    """Let the KV-cache policies of ``handle`` compress a forked, recorded prefill cache."""
    if handle is None or cache is None:
        return
    for p in handle.runtime.kv:
        p.compress_recorded(cache, handle.runtime, mask)


# -- generation tasks --------------------------------------------------------------------------------
def run_generation(model, tok, samples: list[Sample], policies: list[str], overrides: dict | None = None,
                   progress=None) -> list[Result]:
    results = []
    shares = {p: _shares_dense_prefill(p) for p in policies}
    record = _stats_needed(policies, overrides)
    for s in samples:
        enc = tok(s.prompt, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        base = None
        if any(shares.values()):
            base, _ = _prefill(model, ids[:, :-1], mask[:, :-1], record)
        for pol in policies:
            cache = fork_cache(base, for_hf=(pol == "hf")) if (base is not None and shares[pol]) else None
            handle = patch_for(model, pol, overrides if pol != "hf" else None)
            try:
                _compress_fork(handle, cache, mask[:, :-1])
                held = kv_bytes(cache)
                t = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=mask, **compat.cache_kwargs(model, cache),
                                         max_new_tokens=s.max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
                dt = time.perf_counter() - t
            finally:
                if handle is not None:
                    handle.remove()
            pred = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            results.append(Result(pol, s.task, s.target_len, s.n_tokens, s.depth, s.idx, score(s.task, pred, s.answers),
                                  pred.strip()[:200], dt, extra={"kv_bytes": held}))
        if progress is not None:
            progress.update(1)
    return results


# -- language-model metrics ----------------------------------------------------------------------------
def run_lm(model, tok, policies: list[str], lengths: list[int], n_eval: int, n_samples: int, seed: int,
           overrides: dict | None = None, progress=None) -> list[Result]:
    """Teacher-forced decode of ``n_eval`` held-out tokens after a ``length``-token prefix of the essays:
    perplexity of those tokens, and top-1 agreement / KL(dense || policy) of every next-token
    distribution against accel dense (the exact reference) computed on the same prefix."""
    from .text import essays_text

    text = essays_text()
    results = []
    refs = ["dense"] + [p for p in policies if p != "dense"]
    record = _stats_needed(refs, overrides)
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    for L_req in lengths:
        L = min(L_req, limit - n_eval)  # prefix + scored tokens must fit the context window
        for i in range(n_samples):
            start = ((seed * 7919 + i) * 104_729) % max(1, len(text) // 2)
            ids = tok(text[start : start + int((L + n_eval) * 6)], return_tensors="pt")["input_ids"][:, : L + n_eval]
            if ids.shape[1] < L + n_eval:
                raise AccelError("not enough held-out text for the requested length")
            prefix, cont = ids[:, :L], ids[0, L:]
            scored = teacher_forced(model, prefix, cont, refs, overrides, record=record)
            ref_logp = scored["dense"][0]
            for pol in policies:
                logp, held = scored[pol]
                nll = -logp.gather(1, cont.view(-1, 1)).mean().item()
                agree = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean().item()
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
                results.append(Result(pol, "lm", L_req, L, None, i, agree, "", extra={
                    "ppl": math.exp(nll), "nll": nll, "top1_agree": agree, "kl": kl, "kv_bytes": held}))
            if progress is not None:
                progress.update(1)
    return results


def teacher_forced(model, prefix: torch.Tensor, cont: torch.Tensor, policies: list[str],
                   overrides: dict | None = None, plans: dict | None = None, record: list | None = None) -> dict:
    """``{policy: (log-probabilities [len(cont), vocab], KV bytes held after compression)}``: every policy decodes
    ``cont`` [n] teacher-forced after ``prefix`` [1, L] from its own fork of one dense prefill of ``prefix[:, :-1]``
    (compressed by its KV-cache policies). ``plans``: a plan per policy name; ``record``: the prefill statistics the
    policies need (``_stats_needed``, computed from ``policies`` when not given)."""
    if record is None:
        record = _stats_needed(policies, overrides)
    base, _ = _prefill(model, prefix[:, :-1], torch.ones_like(prefix[:, :-1]), record)
    out = {}
    for pol in policies:
        cache = fork_cache(base, for_hf=(pol == "hf"))
        handle = patch_for(model, pol, overrides if pol not in ("hf", "dense") else None,
                           plan=(plans or {}).get(pol))
        try:
            _compress_fork(handle, cache, None)
            held = kv_bytes(cache)
            logps = []
            tok_in = prefix[:, -1:]
            with torch.no_grad():
                for t in range(cont.shape[0]):
                    o = model(input_ids=tok_in, use_cache=True, **compat.cache_kwargs(model, cache))
                    cache = compat.output_cache(o)
                    logps.append(torch.log_softmax(o.logits[0, -1].float(), -1))
                    tok_in = cont[t : t + 1].view(1, 1)
        finally:
            if handle is not None:
                handle.remove()
        out[pol] = (torch.stack(logps), held)
    return out


# -- statistics -------------------------------------------------------------------------------------
def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, c - h), min(1.0, c + h)


def summarise(results: list[Result]) -> list[dict]:
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.policy, r.task, r.target_len), []).append(r)
    rows = []
    for (pol, task, L), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        n = len(rs)
        mean = sum(r.score for r in rs) / n
        row = {"policy": pol, "task": task, "context": L, "n": n, "mean_tokens": round(sum(r.n_tokens for r in rs) / n)}
        held = [r.extra.get("kv_bytes", float("nan")) for r in rs]
        row["kv_mb"] = "" if any(math.isnan(b) for b in held) else round(sum(held) / n / 2**20, 3)
        if task == "lm":
            for k in ("ppl", "top1_agree", "kl"):
                row[k] = round(sum(r.extra[k] for r in rs) / n, 5)
            row["accuracy"] = round(mean, 4)
            row["ci_low"], row["ci_high"] = "", ""
        else:
            binary = all(r.score in (0.0, 1.0) for r in rs)
            if binary:
                lo, hi = wilson(sum(r.score for r in rs), n)
            else:
                sd = math.sqrt(sum((r.score - mean) ** 2 for r in rs) / max(1, n - 1))
                lo, hi = max(0.0, mean - 1.96 * sd / math.sqrt(n)), min(1.0, mean + 1.96 * sd / math.sqrt(n))
            row.update({"accuracy": round(mean, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                        "ppl": "", "top1_agree": "", "kl": ""})
        rows.append(row)
    return rows
