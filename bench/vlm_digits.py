"""Train (once, cached) the project-trained digits VLM and measure accuracy against kept visual tokens.

The model is accel's own (``accel.research.digits_vlm``): a CLIP ViT trained from scratch here on scikit-learn's
handwritten digits, LLaVA's projector, and the frozen SmolLM2-135M answering which digit the image shows.
Its numbers are those of a **project-trained** model, not of any published VLM.

    python bench/vlm_digits.py train                      # ~10 min on the 2-core CPU, cached
    python bench/vlm_digits.py curve --out bench/results/vlm_digits_curve.csv
    python bench/vlm_digits.py diagnose --out bench/results/vlm_digits_kept_on_digit.csv

``curve`` writes one row per (policy, kept tokens): accuracy on the held-out digits (first answer
token), plus a PNG of accuracy against kept tokens for every policy. ``diagnose`` writes, per policy and kept
count, the share of kept tokens that lie on the digit (first 60 held-out images).
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch


def main(argv=None):
    import accel
    from accel.research import digits_vlm as D

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train", "curve", "diagnose"])
    ap.add_argument("--retrain", action="store_true", help="train again even if a cached model exists")
    ap.add_argument("--policies", default="fastervlm,flowcut,fastv,randomprune")
    ap.add_argument("--keeps", default=None, help="kept tokens per image (default: all, 1/2, 1/4, ... down to 1)")
    ap.add_argument("--samples", type=int, default=None, help="held-out digits to score (default: all 397)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/vlm_digits_curve.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = D.DigitsConfig()
    t0 = time.time()
    vlm, tok, image_id, record = D.load_or_train(cfg, retrain=args.retrain and args.command == "train", progress=True)
    print(f"digits VLM (project-trained) ready in {time.time() - t0:.0f}s; training record: {json.dumps(record)}")
    if args.command == "train":
        return
    n = cfg.tokens
    if args.command == "diagnose":
        rows = []
        for pol in [p for p in args.policies.split(",") if p]:
            for k in [int(x) for x in (args.keeps or "16,8,4").split(",")]:
                with accel.patch(vlm, pol, keep=k):
                    d = D.kept_on_digit(vlm, tok, image_id, cfg)
                rows.append({"policy": pol, "keep": k, **{a: round(b, 4) for a, b in d.items()}, "images": 60})
                print(f"{pol} keep {k}: {d['on_digit_share']:.3f} of kept tokens on the digit "
                      f"({d['digit_patches_per_image']:.1f} digit patches per image)")
        out = Path(args.out)
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {out}")
        return
    keeps = [int(k) for k in args.keeps.split(",")] if args.keeps else sorted({max(1, n >> i) for i in range(8)}, reverse=True)
    rows = []
    full = D.evaluate(vlm, tok, image_id, cfg, n=args.samples)
    print(f"all {n} tokens: accuracy {full:.3f}", flush=True)
    from tqdm.auto import tqdm

    jobs = [(p, k) for p in args.policies.split(",") if p for k in keeps]
    for pol, k in tqdm(jobs, desc="accuracy vs kept tokens"):
        with accel.patch(vlm, pol, keep=k):
            t = time.time()
            acc = D.evaluate(vlm, tok, image_id, cfg, n=args.samples)
        rows.append({"policy": pol, "keep": k, "tokens": n, "accuracy": round(acc, 4), "full_accuracy": round(full, 4),
                     "samples": args.samples or 397, "seconds": round(time.time() - t, 1),
                     "model": "project-trained digits VLM (CLIP ViT from scratch + SmolLM2-135M frozen)"})
        tqdm.write(f"{pol} keep {k}: accuracy {acc:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for pol in dict.fromkeys(r["policy"] for r in rows):
        pts = [(r["keep"], r["accuracy"]) for r in rows if r["policy"] == pol]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol)
    ax.axhline(full, color="gray", ls="--", lw=1, label=f"all {n} tokens")
    ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens kept per image")
    ax.set_ylabel("accuracy (held-out digits)")
    ax.set_title("project-trained digits VLM: accuracy vs kept tokens", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
