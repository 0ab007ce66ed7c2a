"""The decode cost model against measured steps: policies and plans beyond the calibration's, at contexts it never
measured, and at batch sizes between the measured ones (2 and 6, interpolated).

    accel calibrate-cost --threads 2 --out bench/results/cost_model_smollm2.json
    python bench/cost_model.py --cost bench/results/cost_model_smollm2.json --threads 2 \\
        --out bench/results/cost_model_check.csv

Each row: a policy patched on the model, the cost model's predicted decode step (from the layer kinds and keys the
step touches, ``accel.scheduler.measure.step_work``) and the step measured right after (``generate()`` from a random
cache of that context, median step), one run each; and the same for dense at that point, measured just before the
policy (after one untimed dense generation at each new point: the first run at a batch size measured up to 20% slow),
so each row also compares the predicted speed-up over dense (what a speed target asks for) with the measured one.
With ``--repeats N`` the whole list runs N times, interleaved, and each row gives the median step and the median of its
pairs' speed-ups (this machine's speed flips between fast and slow spells within seconds). Writes the CSV and a PNG of
predicted against measured.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

DEFAULT_POLICIES = ("dense,hylra,hylra@topk_ratio=0.25,snapkv@budget_ratio=0.25,snapkv@budget_ratio=0.1,"
                    "h2o@budget_ratio=0.25,streaming@budget_ratio=0.1,pyramidkv@budget_ratio=0.25,duo@budget_ratio=0.25,"
                    "moa")


def main(argv=None):
    from accel.api import patch
    from accel.cli.calibrate_cost import draw_fit
    from accel.cli.common import load_model, write_csv
    from accel.perf import machine_facts
    from accel.policies.registry import split_spec
    from accel.scheduler.cost import cost_model_for
    from accel.scheduler.measure import step_work, time_steps

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cost", required=True, help="cost model JSON from `accel calibrate-cost`")
    ap.add_argument("--policies", default=DEFAULT_POLICIES)
    ap.add_argument("--points", default="1:3000,6000;2:2500;4:2000;6:2500;8:1500,3000",
                    help="BATCH:CONTEXTS;... measured for every policy")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure the whole list this many times, interleaved; each row gives the median step and the "
                         "median of the (dense, plan) pairs' speed-ups")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/cost_model_check.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    model, _ = load_model(args.model)
    cm = cost_model_for(model, args.cost)
    facts = machine_facts()
    points = [(int(b), int(c)) for part in args.points.split(";") for b, cs in [part.split(":")]
              for c in cs.split(",")]
    jobs = [(p, b, c) for b, c in points for p in args.policies.split(",") if p]
    runs = []
    warmed = set()
    for spec, b, c in tqdm(jobs * max(1, args.repeats), desc="cost model check"):
        name, opts = split_spec(spec)
        if name == "auto" and "speed" in opts and args.cost:
            opts["cost"] = str(args.cost)  # a speed plan is solved with the cost model it is checked against
        t = time.time()
        # dense at the same point right before: the speed-up of the pair is what a speed target predicts
        hd = patch(model, "dense", reserve=c + args.new_tokens + 64)
        try:
            if (b, c) not in warmed:  # an untimed generation first at each new point (allocator, caches)
                time_steps(model, hd, b, c, 4)
                warmed.add((b, c))
            pred_dense = cm.predict(step_work(hd, model, c), b)
            dense_ms = time_steps(model, hd, b, c, args.new_tokens)
        finally:
            hd.remove()
        h = patch(model, name, reserve=c + args.new_tokens + 64, **opts)
        try:
            work = step_work(h, model, c)
            pred = cm.predict(work, b)
            ms = time_steps(model, h, b, c, args.new_tokens)
        finally:
            h.remove()
        kinds = {} if work.stacked else {"layer by layer": 1}
        for w in work.layers:
            kinds[w.kind] = kinds.get(w.kind, 0) + 1
        runs.append({"spec": spec, "b": b, "c": c, "kinds": kinds, "pred": pred, "pred_dense": pred_dense, "ms": ms,
                     "dense_ms": dense_ms, "seconds": time.time() - t})
        tqdm.write(f"{spec} batch {b} context {c}: predicted {pred:.1f} ms, measured {ms:.1f} ms "
                   f"({100 * (pred / ms - 1):+.1f}%); speed-up over dense measured just before: predicted "
                   f"{pred_dense / pred:.3f}x, measured {dense_ms / ms:.3f}x")
    rows = []
    for spec, b, c in jobs:
        mine = [r for r in runs if (r["spec"], r["b"], r["c"]) == (spec, b, c)]
        r0 = mine[0]
        ms = statistics.median(r["ms"] for r in mine)
        dense_ms = statistics.median(r["dense_ms"] for r in mine)
        speedup = statistics.median(r["dense_ms"] / r["ms"] for r in mine)
        pred, pred_dense = r0["pred"], r0["pred_dense"]
        rows.append({"model": args.model, "policy": spec, "batch": b, "context": c,
                     "layer_kinds": " ".join(f"{k}:{n}" if k != "layer by layer" else k for k, n in r0["kinds"].items()),
                     "predicted_ms": round(pred, 3), "step_ms": round(ms, 3), "error": round(pred / ms - 1, 4),
                     "dense_predicted_ms": round(pred_dense, 3), "dense_step_ms": round(dense_ms, 3),
                     "predicted_speedup": round(pred_dense / pred, 4), "speedup": round(speedup, 4),
                     "speedup_error": round((pred_dense / pred) / speedup - 1, 4),
                     "repeats": len(mine), "step_ms_all": " ".join(f"{r['ms']:.2f}" for r in mine),
                     "dense_step_ms_all": " ".join(f"{r['dense_ms']:.2f}" for r in mine),
                     "interpolated_batch": b not in cm.batches(), "cost_model": Path(args.cost).name,
                     "seconds": round(sum(r["seconds"] for r in mine), 1), **facts})
    out = write_csv(args.out, rows)
    draw_fit(rows, out.with_suffix(".png"), f"cost model vs measured steps, {args.model} (plans it was not fitted on)",
             pred_key="predicted_ms")
    worst = max(rows, key=lambda r: abs(r["error"]))
    within = sum(abs(r["error"]) <= 0.15 for r in rows)
    print(f"{within} of {len(rows)} steps within 15%; worst {worst['policy']} batch {worst['batch']} context "
          f"{worst['context']}: {100 * worst['error']:+.1f}%")
    worst_s = max(rows, key=lambda r: abs(r["speedup_error"]))
    within_s = sum(abs(r["speedup_error"]) <= 0.15 for r in rows)
    print(f"{within_s} of {len(rows)} speed-ups over dense within 15%; worst {worst_s['policy']} batch "
          f"{worst_s['batch']} context {worst_s['context']}: {100 * worst_s['speedup_error']:+.1f}%")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
