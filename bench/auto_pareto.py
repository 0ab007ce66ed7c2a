"""policy="auto" against every single KV policy at the same budget: accuracy (from `accel eval`) against decode
tokens/s (from `accel bench`), one Pareto plot per budget.

    accel eval --threads 2 --policies dense,<for R in 0.5,0.25,0.1: auto@kv_budget=R, snapkv, pyramidkv, h2o,
        streaming, duo, taskkv @budget_ratio=R, moa@density=R@max_new_tokens=16@sparse_prefill=False> \\
        --tasks passkey,niah,ruler_niah_single_1 --contexts 4096 --samples 20 --out bench/results/eval_auto_smollm2_4k.csv
    accel bench --threads 2 --policies <the same> --contexts 4096 --batch 1 --synthetic-kv --new-tokens 32 \\
        --out bench/results/decode_auto_smollm2_b1.csv        (and --batch 8 ... decode_auto_smollm2_b8.csv)
    python bench/auto_pareto.py --eval bench/results/eval_auto_smollm2_4k.csv \\
        [--eval a later evaluation of some of the same policies, whose rows replace the first's] \\
        --speed bench/results/decode_auto_smollm2_b1.csv --speed bench/results/decode_auto_smollm2_b8.csv \\
        --out bench/results/auto_pareto_smollm2_4k.csv

Each row: a policy at a budget, its accuracy on every task and their mean (the samples pooled), the KV bytes it held
after compression (measured by the evaluation), and its decode tokens/s at each batch size; ``dominated_by`` names
the single policies of the same budget that are at least as accurate and at least as fast at that batch, and more
accurate or faster (none: on the Pareto front), by the median run when the speed runs were repeated (`accel bench
--repeats N`); ``clearly_dominated_by`` asks the same of the other policy's slowest run against this one's fastest
(the runs' spread: on a shared machine the read bandwidth drifts by tens of percent within minutes). Writes the CSV
and one PNG per budget (accuracy against tokens/s, one panel per batch size, bars from the slowest to the fastest
run).
"""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path


def budget_of(spec: str) -> float | None:
    """The budget a policy spec names (``@budget_ratio=``, ``@kv_budget=``, ``@density=``), None for dense."""
    m = re.search(r"@(?:budget_ratio|kv_budget|density)=([0-9.]+)", spec)
    return float(m.group(1)) if m else None


def runs_tok_s(r: dict) -> tuple[float, float]:
    """(slowest, fastest) tokens/s over an `accel bench` row's runs (``step_ms_all`` with --repeats; the row's own
    tokens/s for a single run)."""
    steps = [float(x) for x in (r.get("step_ms_all") or "").split()]
    v = float(r["decode_tok_s"])
    if len(steps) < 2:
        return v, v
    per_step = 1000.0 * int(r["batch"])  # tokens a step makes (one per row) x ms per second
    # the row's own tokens/s inside the range: step_ms_all is rounded to 2 decimals, the median run's step to 3
    return min(v, per_step / max(steps)), max(v, per_step / min(steps))


def dominating(r: dict, rows: list[dict], theirs: str, mine: str) -> str:
    """The single policies of ``r``'s budget at least as accurate as ``r`` and at least as fast (their speed column
    ``theirs`` against ``r``'s column ``mine``), and better in one of the two, space-separated."""
    return " ".join(o["policy"] for o in rows if o is not r and o["budget"] == r["budget"] and o["method"] != "dense"
                    and o["accuracy"] >= r["accuracy"] and o[theirs] >= r[mine]
                    and (o["accuracy"] > r["accuracy"] or o[theirs] > r[mine]))


def load_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None):
    from accel.cli.common import write_csv

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", action="append", required=True,
                    help="summary CSV of `accel eval` (repeatable: a later file's rows replace an earlier one's for "
                         "the same policy and task, as when auto alone is evaluated again with a new profile)")
    ap.add_argument("--speed", action="append", required=True, help="CSV of `accel bench` (one per batch size)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    merged = {}
    for path in args.eval:
        for r in load_rows(path):
            merged[(r["policy"], r["task"], r["context"])] = r
    ev = list(merged.values())
    tasks = sorted({r["task"] for r in ev if r["task"] != "lm"})
    speed = {}  # (policy, batch) -> tokens/s (the median run's, with --repeats)
    spread = {}  # (policy, batch) -> (slowest, fastest) tokens/s over the repeated runs
    batches = []
    for path in args.speed:
        for r in load_rows(path):
            b = int(r["batch"])
            if b not in batches:
                batches.append(b)
            speed[(r["policy"], b)] = float(r["decode_tok_s"])
            spread[(r["policy"], b)] = runs_tok_s(r)
    policies = sorted({r["policy"] for r in ev if r["policy"] != "hf"})
    rows = []
    for pol in policies:
        acc = {r["task"]: r for r in ev if r["policy"] == pol and r["task"] in tasks}
        n = sum(int(acc[t]["n"]) for t in tasks)
        correct = sum(float(acc[t]["accuracy"]) * int(acc[t]["n"]) for t in tasks)
        kv = [float(acc[t]["kv_mb"]) for t in tasks if acc[t].get("kv_mb")]
        row = {"policy": pol, "method": pol.split("@")[0], "budget": budget_of(pol) or 1.0,
               **{f"{t}": round(float(acc[t]["accuracy"]), 4) for t in tasks},
               "correct": int(round(correct)), "n": n, "accuracy": round(correct / n, 4),
               "kv_mb": round(sum(kv) / len(kv), 2) if kv else ""}
        for b in batches:
            if (pol, b) not in speed:
                raise SystemExit(f"{pol} has no tokens/s at batch {b} in {args.speed}")
            row[f"tok_s_b{b}"] = round(speed[(pol, b)], 3)
            lo, hi = spread[(pol, b)]
            row[f"tok_s_b{b}_min"], row[f"tok_s_b{b}_max"] = round(lo, 3), round(hi, 3)
        rows.append(row)
    facts = {k: ev[0][k] for k in ("cpu", "isa", "threads", "torch", "transformers", "accel") if k in ev[0]}
    for r in rows:
        r.update(facts)
    for r in rows:
        for b in batches:
            key = f"tok_s_b{b}"
            if r["method"] == "dense":
                r[f"dominated_by_b{b}"] = ""
                continue
            r[f"dominated_by_b{b}"] = dominating(r, rows, key, key)
            # beyond the runs' spread: the other policy's slowest run at least as fast as this one's fastest
            r[f"clearly_dominated_by_b{b}"] = dominating(r, rows, f"{key}_min", f"{key}_max")
    out = write_csv(args.out, rows)
    draw(rows, batches, out)
    for r in rows:
        if r["method"] == "auto":
            front = all(not r[f"dominated_by_b{b}"] for b in batches)
            clear = [f"b{b} by {r[f'clearly_dominated_by_b{b}']}" for b in batches if r[f"clearly_dominated_by_b{b}"]]
            print(f"{r['policy']}: {r['correct']}/{r['n']} correct, {r['kv_mb']} MB, "
                  + ", ".join(f"{r[f'tok_s_b{b}']} tok/s at b{b}" for b in batches)
                  + ("; on the front at every batch" if front else "; dominated: "
                     + "; ".join(f"b{b} by {r[f'dominated_by_b{b}']}" for b in batches if r[f"dominated_by_b{b}"]))
                  + ("; beyond the runs' spread: " + "; ".join(clear) if clear else
                     "; by no policy beyond the runs' spread" if not front else ""))
    print(f"wrote {out}")


def draw(rows, batches, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in rows if r["method"] == "dense"), None)
    for budget in sorted({r["budget"] for r in rows if r["method"] != "dense"}):
        sel = [r for r in rows if r["budget"] == budget and r["method"] != "dense"]
        fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4), squeeze=False)
        for ax, b in zip(axes[0], batches):
            key = f"tok_s_b{b}"
            for r in sel:
                auto = r["method"] == "auto"
                color = "#d62728" if auto else "#1f77b4"
                if r[f"{key}_min"] != r[f"{key}_max"]:  # repeated runs: the slowest to the fastest
                    ax.errorbar(r[key], r["accuracy"], xerr=[[r[key] - r[f"{key}_min"]], [r[f"{key}_max"] - r[key]]],
                                fmt="none", ecolor=color, alpha=0.5, capsize=2, zorder=2)
                ax.scatter(r[key], r["accuracy"], s=70 if auto else 35, marker="*" if auto else "o", color=color,
                           zorder=3)
                ax.annotate(r["method"], (r[key], r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if dense is not None:
                ax.scatter(dense[key], dense["accuracy"], marker="s", color="k", zorder=3)
                ax.annotate("dense", (dense[key], dense["accuracy"]), fontsize=7, xytext=(3, -9),
                            textcoords="offset points")
            ax.set_xlabel(f"decode tokens/s, batch {b}")
            ax.set_ylabel("accuracy (passkey, niah, RULER niah pooled)")
            ax.grid(alpha=0.3)
        fig.suptitle(f"KV budget {budget:g}: auto (star) against single policies at the same budget", fontsize=10)
        fig.tight_layout()
        fig.savefig(out.with_name(f"{out.stem}_{int(round(budget * 100))}.png"), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
