"""Markdown table of lossy policies against dense from `accel eval` CSVs (and optionally `accel bench` CSVs):
per policy and context, correct samples per task (k/n), perplexity and its change against dense, top-1
agreement with dense, and decode speed.

    python bench/make_policy_table.py --eval bench/results/eval_reuse_smollm2.csv bench/results/eval_reuse_smollm2_8k.csv \
        --lm bench/results/eval_reuse_smollm2_lm.csv --speed bench/results/decode_reuse_smollm2_b1.csv

`--wide` prints one row per policy instead (columns: each context's tasks and perplexity, then decode tokens/s
per batch and the KV bytes held against dense); with several CSVs holding the same (policy, context, task), the
one named last wins, so a re-measured policy replaces its older rows. `--lm` then takes several CSVs too.
"""
from __future__ import annotations

import argparse
import csv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", nargs="+", required=True)
    ap.add_argument("--lm", nargs="*", default=[])
    ap.add_argument("--speed", nargs="*", default=[])
    ap.add_argument("--slack", type=int, default=1, help="samples a policy may lose against dense for a check mark")
    ap.add_argument("--wide", action="store_true", help="one row per policy, contexts side by side")
    ap.add_argument("--drop-option", action="append", default=[],
                    help="policy option left out of the row label (e.g. max_new_tokens, which moa runs set per task)")
    args = ap.parse_args()
    acc: dict = {}
    tasks: list[str] = []
    label = lambda p: "@".join(x for x in p.split("@") if x.split("=")[0] not in args.drop_option)
    for path in args.eval:
        for r in csv.DictReader(open(path)):
            r["policy"] = label(r["policy"])
            if r["task"] == "lm":
                continue
            k = round(float(r["accuracy"]) * int(r["n"]))
            acc[(r["policy"], int(r["context"]), r["task"])] = (k, int(r["n"]))
            if r["task"] not in tasks:
                tasks.append(r["task"])
    lm = {}
    for path in args.lm:
        for r in csv.DictReader(open(path)):
            r["policy"] = label(r["policy"])
            lm[(r["policy"], int(r["context"]))] = (float(r["ppl"]), float(r["top1_agree"]), int(r["n"]))
    speed = {}
    for path in args.speed:
        for r in csv.DictReader(open(path)):
            r["policy"] = label(r["policy"])
            speed[(r["policy"], int(r["batch"]))] = r
    pols = sorted({k[0] for k in acc} | {k[0] for k in lm}, key=_policy_order)
    ctxs = sorted({k[1] for k in acc} | {k[1] for k in lm})
    if args.wide:  # a policy measured only for speed still gets its row
        pols = sorted(set(pols) | {k[0] for k in speed}, key=_policy_order)
        _wide(pols, ctxs, tasks, acc, lm, speed, args.slack)
        return
    head = "| policy | context | " + " | ".join(tasks) + " | perplexity (vs dense) | top-1 agree |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for c in ctxs:
        for p in pols:
            cells = []
            for t in tasks:
                v = acc.get((p, c, t))
                d = acc.get(("dense", c, t))
                if v is None:
                    cells.append("")
                    continue
                mark = "" if d is None or p == "dense" else (" ✓" if v[0] >= d[0] - args.slack else " ✗")
                cells.append(f"{v[0]}/{v[1]}{mark}")
            ppl = lm.get((p, c))
            dppl = lm.get(("dense", c))
            if ppl:
                rel = "" if p in ("dense", "hf") or not dppl else f" ({100 * (ppl[0] / dppl[0] - 1):+.1f}%)"
                cells += [f"{ppl[0]:.2f}{rel}", f"{ppl[1]:.3f}"]
            else:
                cells += ["", ""]
            name = "HF unpatched" if p == "hf" else p
            print(f"| {name} | {c} | " + " | ".join(cells) + " |")
    if speed:
        print()
        print("| policy | batch | context | step ms | tokens/s | vs HF | vs accel dense | KV MB read per step | KV MB held |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (p, b), r in sorted(speed.items(), key=lambda kv: (kv[0][1], kv[0][0] != "hf", kv[0][0] != "dense", kv[0][0])):
            name = "HF unpatched" if p == "hf" else p
            print(f"| {name} | {b} | {r['context']} | {float(r['decode_step_ms']):.1f} | {float(r['decode_tok_s']):.2f} | "
                  f"{float(r['speedup_vs_hf']):.2f}x | {float(r['speedup_vs_accel_dense']) if r['speedup_vs_accel_dense'] else float('nan'):.2f}x | "
                  f"{r.get('kv_read_per_step_mb', '')} | {r.get('kv_held_mb', '')} |")


def _policy_order(p: str):
    """hf, dense, then by policy name and falling budget (the number after the first '=')."""
    name, _, rest = p.partition("@")
    try:
        budget = -float(rest.split("=")[1].split("@")[0])
    except (IndexError, ValueError):
        budget = 0.0
    return (p != "hf", p != "dense", budget, name, p)


def _held_mb(row) -> float:
    return float(row.get("kv_held_mb") or "nan")


def _wide(pols, ctxs, tasks, acc, lm, speed, slack):
    short = {"passkey": "passkey", "niah": "NIAH", "ruler_niah_single_1": "RULER"}
    cols, head = [], []
    tasks = sorted(tasks, key=lambda t: (list(short).index(t) if t in short else len(short), t))
    for c in ctxs:
        for t in tasks:
            if any(k[1] == c and k[2] == t for k in acc):
                cols.append((c, t))
                head.append(f"{c // 1024}K {short.get(t, t)}")
        if any(k[1] == c for k in lm):
            cols.append((c, "lm"))
            head.append(f"{c // 1024}K ppl")
    batches = sorted({b for (_, b) in speed})
    head += [f"b{b} tok/s (vs dense)" for b in batches]
    if batches:
        head.append("KV held (of dense)")
    print("| policy | " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(head))
    for p in pols:
        cells = []
        for c, t in cols:
            if t == "lm":
                v, d = lm.get((p, c)), lm.get(("dense", c))
                rel = "" if v is None or p in ("dense", "hf") or d is None else f" ({100 * (v[0] / d[0] - 1):+.1f}%)"
                cells.append("-" if v is None else f"{v[0]:.2f}{rel}")
                continue
            v, d = acc.get((p, c, t)), acc.get(("dense", c, t))
            if v is None:
                cells.append("-")
                continue
            mark = "" if d is None or p in ("dense", "hf") else (" ✓" if v[0] >= d[0] - slack else " ✗")
            cells.append(f"{v[0]}/{v[1]}{mark}")
        for b in batches:
            r, d = speed.get((p, b)), speed.get(("dense", b))
            tok = None if r is None else float(r["decode_tok_s"])
            rel = "" if tok is None or d is None else f" ({tok / float(d['decode_tok_s']):.2f}x)"
            cells.append("-" if tok is None else f"{tok:.1f}{rel}")
        if batches:
            r, d = speed.get((p, batches[0])), speed.get(("dense", batches[0]))
            cells.append("-" if r is None or d is None else f"{100 * _held_mb(r) / _held_mb(d):.1f}%")
        name = "HF unpatched" if p == "hf" else p
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
