"""Markdown table of lossy policies against dense from `accel eval` CSVs (and optionally `accel bench` CSVs):
per policy and context, correct samples per task (k/n), perplexity and its change against dense, top-1
agreement with dense, and decode speed.

    python bench/make_policy_table.py --eval bench/results/eval_reuse_smollm2.csv bench/results/eval_reuse_smollm2_8k.csv \
        --lm bench/results/eval_reuse_smollm2_lm.csv --speed bench/results/decode_reuse_smollm2_b1.csv
"""
from __future__ import annotations

import argparse
import csv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", nargs="+", required=True)
    ap.add_argument("--lm", default=None)
    ap.add_argument("--speed", nargs="*", default=[])
    ap.add_argument("--slack", type=int, default=1, help="samples a policy may lose against dense for a check mark")
    args = ap.parse_args()
    acc: dict = {}
    tasks: list[str] = []
    for path in args.eval:
        for r in csv.DictReader(open(path)):
            if r["task"] == "lm":
                continue
            k = round(float(r["accuracy"]) * int(r["n"]))
            acc[(r["policy"], int(r["context"]), r["task"])] = (k, int(r["n"]))
            if r["task"] not in tasks:
                tasks.append(r["task"])
    lm = {}
    if args.lm:
        for r in csv.DictReader(open(args.lm)):
            lm[(r["policy"], int(r["context"]))] = (float(r["ppl"]), float(r["top1_agree"]), int(r["n"]))
    speed = {}
    for path in args.speed:
        for r in csv.DictReader(open(path)):
            speed[(r["policy"], int(r["batch"]))] = r
    pols = sorted({k[0] for k in acc}, key=lambda p: (p != "hf", p != "dense", p))
    ctxs = sorted({k[1] for k in acc})
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


if __name__ == "__main__":
    main()
