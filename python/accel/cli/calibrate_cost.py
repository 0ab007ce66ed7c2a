"""`accel calibrate-cost`: measure the decode cost model of a model on this machine and write it as versioned JSON
(with a CSV of every calibration run, fitted against measured, and a PNG of the two)."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import int_list, load_model, setup, write_csv


def run(args) -> int:
    from ..errors import AccelError
    from ..scheduler.measure import calibrate_cost, calibration_design

    setup(args)
    batches = int_list(args.batches, "--batches")
    if args.new_tokens < 4:
        raise AccelError(f"--new-tokens {args.new_tokens}: give at least 4 (the first step is not a decode step)")
    if args.passes < 1:
        raise AccelError(f"--passes {args.passes}: give at least 1")
    if not str(args.out).endswith(".json"):
        raise AccelError(f"--out {args.out!r}: give a .json path (the CSV and PNG of the fit go beside it)")
    contexts = {}
    for part in (args.contexts or "").split(";"):
        if not part.strip():
            continue
        b, _, cs = part.partition(":")
        trio = int_list(cs, "--contexts")
        if not b.strip().isdigit() or len(trio) != 3 or not trio[0] < trio[1] < trio[2]:
            raise AccelError(f"--contexts {part!r}: give BATCH:LOW,MID,HIGH with three increasing contexts, "
                             "e.g. '1:1024,4096,8000;8:512,2048,4096'")
        if int(b) not in batches:
            raise AccelError(f"--contexts {part!r}: batch {int(b)} is not among --batches {batches}")
        contexts[int(b)] = tuple(trio)
    model, _ = load_model(args.model, args.dtype)
    n_runs = len(calibration_design(2, (1, 2, 3)))
    print(f"calibrate-cost: {args.model}, batches {batches}; {n_runs} timed generations per batch size and pass, "
          f"{args.passes} passes (minutes)", file=sys.stderr)
    cm = calibrate_cost(model, args.model, batches=batches, contexts=contexts, new_tokens=args.new_tokens,
                        passes=args.passes, progress=True, kv_floor=not args.free_kv_slopes)
    out = Path(args.out)
    cm.save(out)
    rows = [{"model": args.model, **{k: v for k, v in r.items() if k != "overrides"},
             "overrides": ";".join(f"{k}={v}" for k, v in r["overrides"].items()),
             "error": round(r["fitted_ms"] / r["step_ms"] - 1, 4), **cm.machine} for r in cm.runs]
    write_csv(out.with_suffix(".csv"), rows)
    worst = max(rows, key=lambda r: abs(r["error"]))
    print(f"fit: worst calibration run {worst['policy']} {worst['modes']} {worst['overrides']} batch {worst['batch']} "
          f"context {worst['context']}: measured {worst['step_ms']:.1f} ms, fitted {worst['fitted_ms']:.1f} "
          f"({100 * worst['error']:+.1f}%)", file=sys.stderr)
    draw_fit(rows, out.with_suffix(".png"), f"cost model fit, {args.model}")
    print(f"wrote {out}, {out.with_suffix('.csv')} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


def draw_fit(rows: list[dict], path: Path, title: str, pred_key: str = "fitted_ms") -> None:
    """Predicted against measured step per run, one colour per batch size, the +-15% band drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    top = max(max(float(r["step_ms"]), float(r[pred_key])) for r in rows) * 1.08
    xs = [0, top]
    ax.plot(xs, xs, color="gray", lw=1)
    ax.fill_between(xs, [0.85 * x for x in xs], [1.15 * x for x in xs], color="gray", alpha=0.15, label="within 15%")
    for b in sorted({int(r["batch"]) for r in rows}):
        pts = [r for r in rows if int(r["batch"]) == b]
        ax.scatter([float(r["step_ms"]) for r in pts], [float(r[pred_key]) for r in pts], s=14, label=f"batch {b}")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("measured decode step (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
