"""Decode linear (small-M GEMV) micro-benchmark, one thread: accel C++ vs torch.nn.functional.linear
on SmolLM2-135M's weight shapes.

    python bench/bench_linear.py --out bench/results/linear.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bandwidths, best_time, set_threads, write_csv  # noqa: E402

from accel import _ext  # noqa: E402

SHAPES = {"q/o_proj": (576, 576), "k/v_proj": (576, 192), "gate/up_proj": (576, 1536), "down_proj": (1536, 576),
          "lm_head": (576, 49152)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--out", default="bench/results/linear.csv")
    args = ap.parse_args()
    set_threads(1)
    read_bw, copy_bw = bandwidths()
    C = _ext.cpu_ext()
    rows = []
    for name, (K, N) in SHAPES.items():
        nbytes = K * N * 4
        ws = [torch.randn(N, K) for _ in range(max(3, int(300e6 // nbytes)))]
        for M in [int(m) for m in args.rows.split(",")]:
            x = torch.randn(M, K)
            t_a = best_time(lambda w: C.small_m_linear(x, w, None, 1), [(w,) for w in ws])
            t_t = best_time(lambda w: F.linear(x, w), [(w,) for w in ws])
            for prov, t in (("accel_cpp", t_a), ("torch_linear", t_t)):
                rows.append({"op": name, "in": K, "out": N, "rows": M, "provider": prov, "us": round(1e6 * t, 2),
                             "gbs": round(nbytes / t / 1e9, 2), "frac_read_bw": round(nbytes / t / 1e9 / read_bw, 3),
                             "speedup_vs_torch": round(t_t / t, 2), "read_bw_gbs": round(read_bw, 2),
                             "copy_bw_gbs": round(copy_bw, 2)})
            print(f"{name:13s} M={M} accel {nbytes / t_a / 1e9:5.1f} GB/s  torch {nbytes / t_t / 1e9:5.1f} GB/s  "
                  f"x{t_t / t_a:.2f} (read bw {read_bw:.1f})")
    write_csv(rows, args.out)


if __name__ == "__main__":
    main()
