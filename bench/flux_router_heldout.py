"""Flux's shipped router on requests it never saw: the KL its routes lose against the static layer order.

The trainer (``accel plan --policy flux``) builds ``n_texts`` requests (48 by default) and holds every 4th out. This script builds the same
request series further (indices ``--start`` onwards: new passkey / NIAH / essay requests, seeds the trainer did not
use), labels them the trainer's way (per layer, the KL of the next-token distribution when that layer alone runs the
sparse backend) and scores the shipped router against the static order, the oracle and a random order at the plan's
full-layer ratio.

    python bench/flux_router_heldout.py --out bench/results/flux_router_heldout.csv
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--start", type=int, default=None,
                    help="first request index (default: the plan's n_texts, the first request the trainer did not use)")
    ap.add_argument("--n", type=int, default=12, help="requests to score")
    ap.add_argument("--backends", default="quest", help="comma-separated backends of the plan to score")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from accel.calibration.flux import heldout_scores, label_requests, training_requests
    from accel.models import load
    from accel.models.registry import get_adapter
    from accel.plan.shipped import shipped_plan
    from accel.policies.flux import FluxPolicy, Router

    model, tok = load(args.model)
    info = get_adapter(model).info()
    plan = shipped_plan("flux", info)
    if plan is None:
        raise SystemExit(f"no flux router ships for {args.model}")
    prov = plan.provenance["args"]
    if args.start is None:
        args.start = int(prov["n_texts"])
    elif args.start < int(prov["n_texts"]):
        raise SystemExit(f"--start {args.start}: the router was trained on requests 0..{prov['n_texts'] - 1}")
    backends = [b for b in args.backends.split(",") if b]
    reqs = training_requests(tok, args.start + args.n, prov["lengths"], prov["n_cont"])[args.start:]
    routed = [i for i, lp in enumerate(plan.layers) if lp.mode == "flux"]
    policy = FluxPolicy(**plan.params["feature_args"])
    t0 = time.perf_counter()
    feats, labels = label_requests(model, policy, reqs, routed, info.num_layers, backends)
    n_full = int(round(float(plan.params["full_ratio"]) * len(routed)))
    rows = []
    for b in backends:
        r = Router.from_plan(plan, b)
        s = heldout_scores(r, feats, labels[b], routed, n_full)
        lt = torch.tensor(routed)
        static = set(r.static_order[:n_full])
        off = sum(len({routed[j] for j in r.scores(f, lt).topk(n_full).indices.tolist()} - static) for f in feats)
        rows.append({"backend": b, "requests": len(reqs), "first_request": args.start, "full_layers": n_full,
                     "kl_router": s["router"], "kl_static": s["static"], "kl_oracle": s["oracle"],
                     "kl_random": s["random"], "spearman": s["spearman"],
                     "layers_off_static_per_request": round(off / len(feats), 2),
                     "seconds": round(time.perf_counter() - t0, 1), "threads": args.threads, "model": args.model})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
