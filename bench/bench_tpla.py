"""TPLA benchmarks: the output-error table and decode step time, 2 gloo ranks vs 1 process.

  python bench/bench_tpla.py error  --out bench/results/tpla_error.csv
  python bench/bench_tpla.py decode --contexts 8192,32768 --out bench/results/tpla_decode.csv

``decode`` measures, in one run, on the random ``mid`` DeepSeek-V3 config (accel.research.mla_models; no MLA weights
install here) with a synthetic latent cache of each context length, through ``accel bench``: one process with one
thread running MLA in accel's absorbed form (``tpla`` with 1 shard), the same process with 2 simulated TPLA shards,
and 2 ranks of ``torch.distributed`` (gloo, one thread each, launched here with torchrun) each holding one shard
(a step lasts as long as its slowest rank); with ``--hf`` also unpatched transformers at the shortest context.
Reports the median step time of ``--steps`` decode steps after one warm-up step, the KV bytes and weight bytes per
rank.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _accel_bench(args_list, tmp: Path, name: str, ranks: int = 1) -> list[dict]:
    """Run ``accel bench`` on the random mid-size MLA model (one process, or ``ranks`` torchrun ranks with one
    thread each) and return its CSV rows."""
    out = tmp / f"{name}.csv"
    launch = [sys.executable, "-m", "accel"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "accel"]
    cmd = launch + ["bench", "--model", "random-mla-mid", "--synthetic-kv", "--threads", "1", "--out", str(out)] + args_list
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "python")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(" ".join(cmd) + "\n" + r.stdout[-2000:] + r.stderr[-4000:])
    return list(csv.DictReader(out.open()))


def cmd_decode(args):
    """The rows come from ``accel bench`` (``accel.research.tpla_bench``: the same timing in one process and on ranks)."""
    contexts = args.contexts.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.hf:  # unpatched transformers expands every latent every step: seconds per step, fewer steps
            rows += _accel_bench(["--policies", "hf", "--contexts", contexts[0],
                                  "--new-tokens", str(max(1, args.steps // 4))], tmp, "hf")
        rows += _accel_bench(["--policies", "tpla@shards=1,tpla@shards=2", "--contexts", args.contexts,
                              "--new-tokens", str(args.steps)], tmp, "single")
        rows += _accel_bench(["--policies", "tpla", "--tp", "2", "--contexts", args.contexts,
                              "--new-tokens", str(args.steps)], tmp, "tp2", ranks=2)
    names = {"hf": "hf-unpatched", "tpla@shards=1": "mla-absorbed-1-process",
             "tpla@shards=2": "tpla-2-simulated-1-process", "tpla (tp=2)": "tpla-2-ranks"}
    out = [{"mode": names[r["policy"]], "ranks": int(r["ranks"]), "context": int(r["context"]),
            "step_ms": float(r["decode_step_ms"]), "kv_bytes_per_rank": int(r["kv_bytes_per_rank"]),
            "weight_bytes_per_rank": int(r["weight_bytes_per_rank"])} for r in rows]
    base = {r["context"]: r["step_ms"] for r in out if r["mode"] == "mla-absorbed-1-process"}
    for r in out:
        r["speedup_vs_mla_1_process"] = base[r["context"]] / r["step_ms"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0].keys()))
        w.writeheader()
        w.writerows(out)
    for r in out:
        print(f"{r['mode']:>34} ctx {r['context']:>6}  step {r['step_ms']:8.1f} ms  KV/rank {r['kv_bytes_per_rank'] / 2**20:7.1f} MiB"
              f"  weights/rank {r['weight_bytes_per_rank'] / 2**20:6.1f} MiB  x{r['speedup_vs_mla_1_process']:.2f}")


def cmd_error(args):
    from accel.research.tpla_errors import error_grid

    rows = error_grid(seeds=args.seeds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    keys = list(dict.fromkeys((r["shards"], r["queries"], r["query_scale"], r["shard_logit_scale"]) for r in rows))
    names = [r["transform"] for r in rows[:4]]
    print("| g | queries | q scale | shard logit scale | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for k in keys:
        vals = [r["rel_error"] for r in rows if (r["shards"], r["queries"], r["query_scale"], r["shard_logit_scale"]) == k]
        print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4))
        width = 0.2
        for j, name in enumerate(names):
            val = {(r["shards"], r["queries"], r["query_scale"], r["shard_logit_scale"]): r["rel_error"]
                   for r in rows if r["transform"] == name}
            vals = [val[k] for k in keys]
            ax.bar([i + j * width for i in range(len(vals))], vals, width, label=name)
        ax.set_xticks([i + 1.5 * width for i in range(len(keys))])
        ax.set_xticklabels([f"g{k[0]} {k[1][:3]} q{k[2]:g} s{k[3]}" for k in keys], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("relative output error vs MLA")
        ax.set_title("TPLA output error by transform (structured latents)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(str(Path(args.out).with_suffix(".png")), dpi=120)
    except ImportError:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("error")
    e.add_argument("--out", default="bench/results/tpla_error.csv")
    e.add_argument("--seeds", type=int, default=4)
    d = sub.add_parser("decode")
    d.add_argument("--contexts", default="8192,32768")
    d.add_argument("--steps", type=int, default=8)
    d.add_argument("--hf", action="store_true", help="also time unpatched transformers at the shortest context")
    d.add_argument("--out", default="bench/results/tpla_decode.csv")
    args = ap.parse_args()
    {"error": cmd_error, "decode": cmd_decode}[args.cmd](args)


if __name__ == "__main__":
    main()
