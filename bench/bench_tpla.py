"""TPLA benchmarks (issue 8): the output-error table and decode step time, 2 gloo ranks vs 1 process.

  python bench/bench_tpla.py error  --out bench/results/tpla_error.csv
  python bench/bench_tpla.py decode --contexts 8192,32768 --out bench/results/tpla_decode.csv

``decode`` measures, in one run, on the random ``mid`` DeepSeek-V3 config (accel.tpla.models; no MLA weights
install here) with a synthetic latent cache of each context length: one process with one thread running MLA in
accel's absorbed form (``tpla`` with 1 shard), the same process with 2 simulated TPLA shards, and 2 ranks of
``torch.distributed`` (gloo, one thread each, launched here with torchrun) each holding one shard; with
``--hf`` also unpatched transformers at the shortest context. Reports the median step time of ``--steps`` decode
steps after one warm-up step, the KV bytes and weight bytes per rank.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def measure(mode: str, contexts, steps: int, shards: int = 2):
    """Rows for one execution mode in this process (``distributed`` = this rank)."""
    import accel
    from accel.tpla.bench import time_decode, weight_bytes
    from accel.tpla.models import random_mla, synthetic_cache

    torch.set_num_threads(1)
    model = random_mla("mid")
    rows = []
    if mode == "hf":
        from accel.tpla.bench import cache_bytes, hf_latent_cache

        ctx = contexts[0]
        cache = hf_latent_cache(model, ctx)
        dt = time_decode(model, cache, ctx, max(1, steps // 4))
        kv = cache_bytes(cache)
        return [{"mode": "hf-unpatched", "ranks": 1, "context": ctx, "step_ms": dt * 1e3, "kv_bytes_per_rank": kv,
                 "weight_bytes_per_rank": weight_bytes(model)}]
    if mode == "distributed":
        rank, world = accel.tpla.init_distributed("gloo")
        kw = {"shards": world, "execution": "distributed"}
        name = f"tpla-{world}-ranks"
    elif mode == "mla":
        kw, name, rank = {"shards": 1}, "mla-absorbed-1-process", 0
    else:
        kw, name, rank = {"shards": shards}, f"tpla-{shards}-simulated-1-process", 0
    with accel.patch(model, "tpla", transform="hadamard", **kw) as h:
        for ctx in contexts:
            cache = synthetic_cache(h, ctx)
            if mode == "distributed":
                torch.distributed.barrier()
            dt = time_decode(model, cache, ctx, steps)
            h.cache = cache
            per = h.shard_nbytes()
            rows.append({"mode": name, "ranks": kw["shards"] if mode == "distributed" else 1, "context": ctx,
                         "step_ms": dt * 1e3, "kv_bytes_per_rank": per[0] if mode == "distributed" else sum(per),
                         "weight_bytes_per_rank": weight_bytes(model), "rank": rank})
            del cache
    return rows


def cmd_decode(args):
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    for mode in (["hf"] if args.hf else []) + ["mla", "simulated"]:
        rows += measure(mode, contexts, args.steps)
        print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "python")}
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            __file__, "_rank", "--contexts", args.contexts, "--steps", str(args.steps),
                            "--json", str(out)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stdout[-2000:] + r.stderr[-4000:])
        rows += json.loads(out.read_text())
    base = {r["context"]: r["step_ms"] for r in rows if r["mode"] == "mla-absorbed-1-process"}
    for r in rows:
        r["speedup_vs_mla_1_process"] = base[r["context"]] / r["step_ms"] if r["context"] in base else ""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[-1].keys()))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in rows[-1].keys()})
    for r in rows:
        print(f"{r['mode']:>34} ctx {r['context']:>6}  step {r['step_ms']:8.1f} ms  KV/rank {r['kv_bytes_per_rank'] / 2**20:7.1f} MiB"
              f"  weights/rank {r['weight_bytes_per_rank'] / 2**20:6.1f} MiB  x{r['speedup_vs_mla_1_process'] or 0:.2f}")


def cmd_rank(args):
    rows = measure("distributed", [int(c) for c in args.contexts.split(",")], args.steps)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    if torch.distributed.get_rank() == 0:
        out = []
        for i in range(len(rows)):  # a step ends when the slowest rank ends: report the max over ranks
            per = [g[i] for g in gathered]
            row = dict(per[0])
            row["step_ms"] = max(p["step_ms"] for p in per)
            row.pop("rank", None)
            out.append(row)
        Path(args.json).write_text(json.dumps(out))
    torch.distributed.barrier()  # no rank tears the group down while another still uses it
    torch.distributed.destroy_process_group()


def cmd_error(args):
    from accel.tpla.errors import error_grid

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
    r = sub.add_parser("_rank")
    r.add_argument("--contexts", required=True)
    r.add_argument("--steps", type=int, default=8)
    r.add_argument("--json", required=True)
    args = ap.parse_args()
    {"error": cmd_error, "decode": cmd_decode, "_rank": cmd_rank}[args.cmd](args)


if __name__ == "__main__":
    main()
