"""Sparse-attention kernels, one thread.

1. Sparse decode: H=8 query / 2 KV heads, contexts 8K and 32K, head_dim 64 and 128, fp32 cache.
   accel C++ decode over S selected tokens per KV head (index lists, no gather) vs torch gather +
   SDPA over the same tokens vs dense SDPA over the whole cache vs accel's dense kernel, all from cold
   caches. Bandwidth is reported against two ceilings: streaming read (what the dense kernel can reach)
   and the read of exactly the same K/V rows of the same cache and nothing else (the C++ probe: what any
   kernel reading those rows can
   reach on this machine).
2. Block-sparse prefill at 8K: per-head sink (64) + window (960) = 1K tokens (1/8 of the full score matrix, 1/4 of
   the causal one), accel C++ vs dense causal SDPA prefill (torch's CPU flash kernel), ``--prefill-runs`` rounds.

    python bench/bench_sparse.py --out bench/results/sparse.csv
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bandwidths, set_threads, write_csv  # noqa: E402

from accel import _ext  # noqa: E402
from accel.perf import cold_call_time, measure_row_read_bandwidth  # noqa: E402
from accel.ops.sparse import sink_window_blocks  # noqa: E402


def decode_rows(C, read_bw, contexts, head_dims, selected):
    """Every call is timed with the K/V cache out of every cache level (median of 15; ``ms``): the K/V
    tensors are flushed line by line before each call, as in a real decode step, where a layer's K/V
    rows were last touched one step ago while the attention code ran for the previous layer just now.
    ``ms_all_cold`` times the same call after streaming 128 MB through the caches (code, allocator and
    framework state cold too), an upper bound that mostly adds a fixed per-call cost."""
    rows = []
    B, H, Hkv = 1, 8, 2
    G = H // Hkv
    for D in head_dims:
        for T in contexts:
            kv_bytes = 2 * B * Hkv * T * D * 4
            k, v = torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
            q = torch.randn(B, H, D)
            full = torch.full((B, Hkv), T, dtype=torch.int32)
            kv2d = torch.cat([k, v], 1).view(-1, D)  # same sizes and row layout as k and v, for the probe
            kv = [k, v]
            dense_sdpa = lambda: F.scaled_dot_product_attention(q.view(B, H, 1, D), k, v, enable_gqa=True)  # noqa: E731
            dense_accel = lambda: C.decode_attention(q, k, v, full, None, None, D ** -0.5, False, 1)  # noqa: E731
            t_dense_sdpa, t_dense_accel = cold_call_time(dense_sdpa, flush=kv), cold_call_time(dense_accel, flush=kv)
            c_dense_sdpa, c_dense_accel = cold_call_time(dense_sdpa), cold_call_time(dense_accel)
            base = {"context": T, "head_dim": D, "heads": H, "kv_heads": Hkv}
            rows.append({**base, "op": "decode", "selected": T, "provider": "torch_sdpa_dense", "ms": 1e3 * t_dense_sdpa,
                         "ms_all_cold": 1e3 * c_dense_sdpa,
                         "gbs": kv_bytes / t_dense_sdpa / 1e9})
            rows.append({**base, "op": "decode", "selected": T, "provider": "accel_dense", "ms": 1e3 * t_dense_accel,
                         "ms_all_cold": 1e3 * c_dense_accel,
                         "gbs": kv_bytes / t_dense_accel / 1e9})
            print(f"D={D} T={T}: accel dense {1e3 * t_dense_accel:.3f} ms ({kv_bytes / t_dense_accel / 1e9:.1f} GB/s, "
                  f"{100 * kv_bytes / t_dense_accel / 1e9 / read_bw:.0f}% of streaming read) | dense sdpa {1e3 * t_dense_sdpa:.3f} ms")
            for S in selected:
                if S >= T:
                    continue
                g = torch.Generator().manual_seed(S)
                idx = torch.stack([torch.randperm(T, generator=g)[:S].sort().values for _ in range(Hkv)]).int().unsqueeze(0)
                ln = torch.full((B, Hkv), S, dtype=torch.int32)
                sel_bytes = 2 * B * Hkv * S * D * 4
                # the ceiling: reading exactly these K and V rows of this cache and nothing else
                kv_rows = torch.cat([(h * T + idx[0, h].long()) for h in range(Hkv)] +
                                    [((Hkv + h) * T + idx[0, h].long()) for h in range(Hkv)])
                scattered_bw = measure_row_read_bandwidth(kv2d, kv_rows, flush_only_buf=True)
                sparse = lambda: C.decode_attention(q, k, v, ln, idx, None, D ** -0.5, False, 1)  # noqa: E731
                t_sparse, c_sparse = cold_call_time(sparse, flush=kv), cold_call_time(sparse)
                il = idx.long()

                def gather_sdpa():
                    kk = torch.gather(k, 2, il.unsqueeze(-1).expand(B, Hkv, S, D))
                    vv = torch.gather(v, 2, il.unsqueeze(-1).expand(B, Hkv, S, D))
                    return F.scaled_dot_product_attention(q.view(B, Hkv, G, D), kk, vv)

                t_gather, c_gather = cold_call_time(gather_sdpa, flush=kv), cold_call_time(gather_sdpa)
                for prov, t, c in (("accel_sparse", t_sparse, c_sparse), ("torch_gather_sdpa", t_gather, c_gather)):
                    rows.append({**base, "op": "decode", "selected": S, "provider": prov, "ms": 1e3 * t, "ms_all_cold": 1e3 * c,
                                 "gbs": sel_bytes / t / 1e9, "speedup_vs_dense_sdpa": t_dense_sdpa / t,
                                 "scattered_read_bw_gbs": round(scattered_bw, 2),
                                 "frac_scattered_bw": round(sel_bytes / t / 1e9 / scattered_bw, 3)})
                print(f"D={D} T={T} S={S}: accel sparse {1e3 * t_sparse:.3f} ms ({sel_bytes / t_sparse / 1e9:.1f} GB/s = "
                      f"{100 * sel_bytes / t_sparse / 1e9 / scattered_bw:.0f}% of scattered-row read {scattered_bw:.1f} GB/s) | "
                      f"gather+sdpa {1e3 * t_gather:.3f} ms | dense sdpa {1e3 * t_dense_sdpa:.3f} ms -> x{t_dense_sdpa / t_sparse:.1f}")
    return rows


def prefill_rows(C, T=8192, sink=64, window=960, D=64, H=8, Hkv=2, runs=3):
    """``runs`` rounds, each timing accel's block-sparse prefill and dense causal SDPA back to back (best of 3
    calls each): the speed-up of every round is reported, so its spread over the run shows how stable it is."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, T, D, generator=g)
    k = torch.randn(1, Hkv, T, D, generator=g)
    v = torch.randn(1, Hkv, T, D, generator=g)
    blocks, counts = sink_window_blocks(H, T, T, sink=sink, window=window)

    def timed(f, reps=3):
        f()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
        return best

    rounds = []
    for _ in range(runs):
        t_sparse = timed(lambda: C.block_sparse_prefill(q, k, v, blocks, counts, D ** -0.5))
        t_dense = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        rounds.append((t_sparse, t_dense))
        print(f"prefill T={T} sink {sink} + window {window}: accel block-sparse {t_sparse:.3f} s vs dense causal SDPA "
              f"{t_dense:.3f} s -> x{t_dense / t_sparse:.2f}")
    t_sparse, t_dense = sorted(rounds, key=lambda r: r[1] / r[0])[len(rounds) // 2]  # the median round
    ups = sorted(d / s for s, d in rounds)
    base = {"op": "prefill", "context": T, "head_dim": D, "heads": H, "kv_heads": Hkv, "selected": sink + window,
            "prefill_runs": runs, "speedup_all_runs": " ".join(f"{u:.2f}" for u in ups)}
    return [{**base, "provider": "accel_block_sparse", "ms": 1e3 * t_sparse, "speedup_vs_dense_sdpa": t_dense / t_sparse},
            {**base, "provider": "torch_sdpa_causal_dense", "ms": 1e3 * t_dense, "speedup_vs_dense_sdpa": 1.0}]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--selected", default="512,2048,4096")
    ap.add_argument("--prefill-runs", type=int, default=3)
    ap.add_argument("--out", default="bench/results/sparse.csv")
    args = ap.parse_args()
    set_threads(1)
    read_bw, copy_bw = bandwidths()
    C = _ext.cpu_ext()
    rows = decode_rows(C, read_bw, [int(x) for x in args.contexts.split(",")], [int(x) for x in args.head_dims.split(",")],
                       [int(x) for x in args.selected.split(",")])
    rows += prefill_rows(C, runs=args.prefill_runs)
    for r in rows:
        r.setdefault("gbs", "")
        r.setdefault("ms_all_cold", "")
        r.setdefault("speedup_vs_dense_sdpa", "")
        r.setdefault("scattered_read_bw_gbs", "")
        r.setdefault("prefill_runs", "")
        r.setdefault("speedup_all_runs", "")
        r.setdefault("frac_scattered_bw", "")
        r["read_bw_gbs"], r["copy_bw_gbs"] = round(read_bw, 2), round(copy_bw, 2)
        r["frac_read_bw"] = round(r["gbs"] / read_bw, 3) if r["gbs"] != "" else ""
        for key in ("ms", "gbs", "speedup_vs_dense_sdpa"):
            if r[key] != "":
                r[key] = round(r[key], 4)
    write_csv(rows, args.out)


if __name__ == "__main__":
    main()
