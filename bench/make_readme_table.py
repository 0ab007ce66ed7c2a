"""Headline table for the README from the result CSVs: per policy and context, mean accuracy over the
generation tasks (with the tasks listed), perplexity, decode tokens/s, speed-up vs HF, KV bytes held.

    python bench/make_readme_table.py --eval bench/results/eval_smollm2.csv bench/results/eval_smollm2_long.csv \
        --speed bench/results/decode_smollm2_b1.csv
"""
from __future__ import annotations

import argparse
import csv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", nargs="+", required=True)
    ap.add_argument("--speed", required=True)
    args = ap.parse_args()
    acc: dict[tuple[str, int], list[float]] = {}
    ppl: dict[tuple[str, int], float] = {}
    tasks = set()
    for path in args.eval:
        for r in csv.DictReader(open(path)):
            key = (r["policy"], int(r["context"]))
            if r["task"] == "lm":
                ppl[key] = float(r["ppl"])
            else:
                acc.setdefault(key, []).append(float(r["accuracy"]))
                tasks.add(r["task"])
    speed = {(r["policy"], int(r["context"])): r for r in csv.DictReader(open(args.speed))}

    def nearest(pol, ctx):
        cands = [k for k in speed if k[0] == pol]
        return speed[min(cands, key=lambda k: abs(k[1] - ctx))] if cands else None

    print("| policy | context | mean accuracy | perplexity | decode tok/s (batch 1) | vs HF | KV held MB |")
    print("|---|---|---|---|---|---|---|")
    for pol, ctx in sorted(set(acc) | set(ppl), key=lambda k: (k[1], k[0] != "hf", k[0])):
        a = acc.get((pol, ctx))
        s = nearest(pol, ctx)
        name = "HF unpatched" if pol == "hf" else f"accel {pol}"
        print(f"| {name} | {ctx} | {sum(a) / len(a):.3f} ({len(a)} tasks) | {ppl.get((pol, ctx), float('nan')):.3f} | "
              f"{float(s['decode_tok_s']):.1f} @ {s['context']} | {float(s['speedup_vs_hf']):.2f}x | {float(s['kv_held_mb']):.0f} |"
              if a and s else f"| {name} | {ctx} | - | {ppl.get((pol, ctx), float('nan')):.3f} | - | - | - |")
    print(f"\ntasks averaged: {', '.join(sorted(tasks))}")


if __name__ == "__main__":
    main()
