"""Decode-attention kernel micro-benchmark (one thread): accel C++ vs torch SDPA vs HF's sdpa path.

For each context and head_dim, the cache has H=9 query heads / 3 KV heads in fp32 laid out like
accel's cache ([B, Hkv, capacity, D] views). "hf" reproduces what transformers' sdpa attention does
at decode (pack the GQA group into the query, call SDPA). Reported: ms per call, GB/s of K/V read,
fraction of the measured single-thread read bandwidth.

    python bench/bench_decode_kernel.py --out bench/results/decode_kernel.csv
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default="bench/results/decode_kernel.csv")
    args = ap.parse_args()
    set_threads(1)
    read_bw, copy_bw = bandwidths()
    C = _ext.cpu_ext()
    dt = getattr(torch, args.dtype)
    rows = []
    B, H, Hkv = 1, 9, 3
    G = H // Hkv
    for D in [int(x) for x in args.head_dims.split(",")]:
        for T in [int(x) for x in args.contexts.split(",")]:
            kv_bytes = 2 * B * Hkv * T * D * torch.finfo(dt).bits // 8
            n = max(3, int(400e6 // kv_bytes))  # distinct caches: > L3, so every call reads DRAM
            caches = [(torch.randn(B, Hkv, T + 64, D).to(dt)[:, :, :T], torch.randn(B, Hkv, T + 64, D).to(dt)[:, :, :T])
                      for _ in range(n)]
            q = torch.randn(B, H, D)
            ln = torch.full((B, Hkv), T, dtype=torch.int32)
            t_cpp = best_time(lambda k, v: C.decode_attention(q, k, v, ln, None, None, D ** -0.5, False, 1), caches)
            qg = q.view(B, Hkv, G, D).to(dt)
            t_sdpa = best_time(lambda k, v: F.scaled_dot_product_attention(qg, k, v), caches)
            q4 = q.view(B, H, 1, D).to(dt)
            t_hf = best_time(lambda k, v: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True), caches)
            for name, t in (("accel_cpp", t_cpp), ("torch_sdpa_packed_gqa", t_sdpa), ("torch_sdpa_enable_gqa", t_hf)):
                rows.append({"kernel": name, "context": T, "head_dim": D, "heads": H, "kv_heads": Hkv, "dtype": args.dtype,
                             "ms": round(1e3 * t, 4), "gbs": round(kv_bytes / t / 1e9, 2),
                             "frac_read_bw": round(kv_bytes / t / 1e9 / read_bw, 3), "read_bw_gbs": round(read_bw, 2),
                             "copy_bw_gbs": round(copy_bw, 2), "speedup_vs_this_sdpa": round(t_hf / t, 2)})
                print(f"D={D:4d} T={T:6d} {name:24s} {1e3 * t:8.3f} ms {kv_bytes / t / 1e9:6.1f} GB/s "
                      f"({100 * kv_bytes / t / 1e9 / read_bw:4.0f}% of read bw {read_bw:.1f})")
    write_csv(rows, args.out)


if __name__ == "__main__":
    main()
