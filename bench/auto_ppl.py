"""policy="auto" under a perplexity target: the plan each ``max_ppl_increase`` gets from the shipped profile (its mean
kept share and the perplexity increase the profile's measured curve predicts) against the perplexity it gives on the
evaluation's held-out text (the ``lm`` task of ``accel eval``: essays' first half, teacher-forced tokens after a long
prefix), next to dense.

    python bench/auto_ppl.py --threads 2 --targets 0.005,0.01,0.02,0.05 --context 4096 --samples 3 \\
        --out bench/results/auto_ppl_smollm2_4k.csv

Each row: a target, the solved plan's mean kept share and predicted increase (``plan.params["predicted"]``), the
measured perplexity (pooled over the samples' tokens, as ``accel eval`` reports per sample) and its increase over
dense, the KV bytes held after compression, and whether the measured increase is within the target. One run.
"""
from __future__ import annotations

import argparse
import math
import time


def main(argv=None):
    import torch

    from accel.cli.common import load_model, write_csv
    from accel.eval.runner import run_lm
    from accel.models.registry import get_adapter
    from accel.perf import machine_facts
    from accel.plan.shipped import require_shipped_plan
    from accel.scheduler.solve import solve_plan

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--targets", default="0.005,0.01,0.02,0.05", help="max_ppl_increase values")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--lm-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    targets = [float(x) for x in args.targets.split(",") if x.strip()]
    model, tok = load_model(args.model, "float32")
    info = get_adapter(model).info()
    profile = require_shipped_plan("auto", info, "a calibration profile")
    policies = [f"auto@max_ppl_increase={t}" for t in targets]
    t0 = time.perf_counter()
    res = run_lm(model, tok, ["dense", *policies], [args.context], args.lm_tokens, args.samples, args.seed)
    seconds = time.perf_counter() - t0

    def pooled(pol):
        rs = [r for r in res if r.policy == pol]
        return math.exp(sum(r.extra["nll"] for r in rs) / len(rs)), sum(r.extra["kv_bytes"] for r in rs) / len(rs)

    dense_ppl, dense_kv = pooled("dense")
    facts = machine_facts()
    rows = [{"target": "dense", "policy": "dense", "kv_share": 1.0, "predicted_increase": 0.0, "ppl": round(dense_ppl, 4),
             "increase": 0.0, "kv_mb": round(dense_kv / 1e6, 3), "within": True}]
    for t, pol in zip(targets, policies):
        pred = solve_plan(profile, {"max_ppl_increase": t}, info=info).params["predicted"]
        ppl, kv = pooled(pol)
        inc = ppl / dense_ppl - 1
        rows.append({"target": t, "policy": pol, "kv_share": pred["kv_share"],
                     "predicted_increase": pred.get("ppl_increase", ""), "ppl": round(ppl, 4),
                     "increase": round(inc, 5), "kv_mb": round(kv / 1e6, 3), "within": inc <= t})
    for r in rows:
        r.update(model=args.model, context=args.context, samples=args.samples, lm_tokens=args.lm_tokens,
                 seconds=round(seconds, 1), **facts)
    write_csv(args.out, rows)
    for r in rows:
        print(f"{r['policy']:28s} share {r['kv_share']:<7} predicted {r['predicted_increase']!s:<9} "
              f"measured {r['increase']:+.4f} (ppl {r['ppl']}, {r['kv_mb']} MB)")


if __name__ == "__main__":
    main()
