"""GPU benchmark, for a lent CUDA machine (``bash bench/gpu_check.sh`` runs it; CI has no GPU).

Three parts, each timed with CUDA events after warm-up, median of repeats:

1. ``copy``: device-to-device copy bandwidth (bytes read + written), the memory-bound ceiling the decode
   kernels are compared with.
2. ``kernels``: decode attention over a bf16 KV cache (32 query / 8 KV heads, head_dim 128, like Llama-3-8B),
   batch 1 and 8, 8K and 32K tokens: accel's CUDA kernel, accel's Triton kernel, torch SDPA as
   transformers calls it at decode (``enable_gqa``), and the sparse (index-list) decode at 1/8 of the tokens.
   Several caches are rotated so that every call reads device memory, not L2.
3. ``decode``: end-to-end greedy decode tokens/s of a randomly initialised Llama with a 1B-class shape
   (16 layers, hidden 2048, 32/8 heads, head_dim 64) in bf16: transformers unpatched vs accel's dense path
   vs the lossy policies. Random weights: this measures speed only; quality is measured on the real
   checkpoints on the CPU (docs/results.md).

    python bench/bench_gpu.py --out /tmp/gpu_out
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("bench_gpu")


def cuda_time(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds per call of ``fn(i)`` (i = repeat index, for rotating inputs), CUDA events."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = cuda_time(lambda i: y.copy_(x), reps=10)
    return 2 * x.numel() / t / 1e9


def bench_kernels(rows, copy_bw):
    from accel.ops.attention import decode_attention

    H, Hkv, D = 32, 8, 128
    dt = torch.bfloat16
    for B in (1, 8):
        for T in (8192, 32768):
            kv_bytes = 2 * B * Hkv * T * D * 2
            n = max(2, math.ceil(512e6 / kv_bytes))
            caches = [(torch.randn(B, Hkv, T, D, device="cuda", dtype=dt), torch.randn(B, Hkv, T, D, device="cuda", dtype=dt))
                      for _ in range(n)]
            q = torch.randn(B, H, D, device="cuda")
            ln = torch.full((B, Hkv), T, dtype=torch.int32, device="cuda")
            S = T // 8
            idx = torch.stack([torch.randperm(T, device="cuda")[:S].sort().values for _ in range(B * Hkv)]).view(B, Hkv, S).int()
            ln_s = torch.full((B, Hkv), S, dtype=torch.int32, device="cuda")
            q4 = q.view(B, H, 1, D).to(dt)
            cases = {
                "accel_cuda": (lambda i: decode_attention(q, *caches[i % n], ln, backend="cuda"), kv_bytes),
                "accel_triton": (lambda i: decode_attention(q, *caches[i % n], ln, backend="triton"), kv_bytes),
                "torch_sdpa_enable_gqa(hf)": (lambda i: F.scaled_dot_product_attention(q4, *caches[i % n], enable_gqa=True), kv_bytes),
                "accel_cuda_sparse_1/8": (lambda i: decode_attention(q, *caches[i % n], ln_s, indices=idx, backend="cuda"), kv_bytes // 8),
                "accel_triton_sparse_1/8": (lambda i: decode_attention(q, *caches[i % n], ln_s, indices=idx, backend="triton"), kv_bytes // 8),
            }
            base = None
            for name, (fn, nbytes) in cases.items():
                try:
                    t = cuda_time(fn)
                except Exception as exc:  # a backend that fails is reported, the others still run
                    log.warning("%s B=%d T=%d failed: %s", name, B, T, exc)
                    rows.append({"part": "kernels", "name": name, "batch": B, "context": T, "error": f"{type(exc).__name__}: {exc}"[:200]})
                    continue
                if name.startswith("torch_sdpa"):
                    base = t
                rows.append({"part": "kernels", "name": name, "batch": B, "context": T, "ms": round(1e3 * t, 4),
                             "gbs": round(nbytes / t / 1e9, 1), "frac_copy_bw": round(nbytes / t / 1e9 / copy_bw, 3)})
            for r in rows:
                if r.get("part") == "kernels" and r["batch"] == B and r["context"] == T and "ms" in r and base:
                    r["speedup_vs_sdpa_dense"] = round(1e3 * base / r["ms"], 2)
            del caches
            torch.cuda.empty_cache()


def hand_plan(n_layers: int, n_kv: int):
    """A HyLRA layer plan written by hand for the random model (no calibration is meaningful on random
    weights): the first two layers full, then select / reuse / reuse, reusing the last select layer."""
    from accel.plan import LayerPlan, Plan

    layers, last = [], 0
    for i in range(n_layers):
        if i < 2:
            layers.append(LayerPlan(mode="full"))
            last = i
        elif (i - 2) % 3 == 0:
            layers.append(LayerPlan(mode="select"))
            last = i
        else:
            layers.append(LayerPlan(mode="reuse", reuse_src=last))
    return Plan(policy="hylra", num_layers=n_layers, num_kv_heads=n_kv, layers=layers)


def bench_decode(rows, new_tokens: int, quick: bool, deadline: float):
    import transformers as T

    import accel

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=16384,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    m = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).to("cuda").eval()
    policies = [("hf", None, {}), ("dense", "dense", {}), ("hylra", "hylra", {"plan": hand_plan(16, 8), "topk_ratio": 0.125}),
                ("recycled", "recycled", {"topk_ratio": 0.125}),
                ("delta", "delta", {"full_layers": [0, 1], "delta_layers": [2, 8], "topk_ratio": 0.125}),
                ("streaming@0.25", "streaming", {"budget_ratio": 0.25}), ("snapkv@0.25", "snapkv", {"budget_ratio": 0.25}),
                ("h2o@0.25", "h2o", {"budget_ratio": 0.25})]
    settings = [(1, 8192), (8, 4096)] if not quick else [(1, 2048)]
    for B, L in settings:
        ids = torch.randint(3, 32000, (B, L), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        base_hf = base_dense = None
        for label, policy, kw in policies:
            if time.perf_counter() > deadline:
                rows.append({"part": "decode", "name": label, "batch": B, "context": L, "error": "skipped: --time-budget spent"})
                continue

            def run(n):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                assert out.shape[1] == L + n
                return time.perf_counter() - t0
            try:
                h = accel.patch(m, policy, **kw) if policy else None
                try:
                    run(4)  # warm-up: kernels compiled / autotuned, allocator primed
                    t1 = min(run(1) for _ in range(2))
                    tn = min(run(new_tokens + 1) for _ in range(2))
                finally:
                    if h is not None:
                        h.remove()
            except Exception as exc:
                log.warning("%s B=%d L=%d failed: %s", label, B, L, exc)
                rows.append({"part": "decode", "name": label, "batch": B, "context": L, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            per_tok = (tn - t1) / new_tokens
            row = {"part": "decode", "name": label, "batch": B, "context": L, "ms": round(1e3 * per_tok, 3),
                   "tok_s": round(B / per_tok, 1), "prefill_s": round(t1, 3)}
            if label == "hf":
                base_hf = per_tok
            if label == "dense":
                base_dense = per_tok
            if base_hf:
                row["speedup_vs_hf"] = round(base_hf / per_tok, 2)
            if base_dense:
                row["speedup_vs_accel_dense"] = round(base_dense / per_tok, 2)
            rows.append(row)
            log.info("%s", row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gpu_out")
    ap.add_argument("--parts", default="copy,kernels,decode")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds; decode cases past it are skipped")
    ap.add_argument("--quick", action="store_true", help="small decode setting (a smoke run)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    assert torch.cuda.is_available(), "bench_gpu.py needs a CUDA device"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    deadline = time.perf_counter() + args.time_budget
    rows = []
    copy_bw = copy_bandwidth()
    rows.append({"part": "copy", "name": "d2d_copy", "gbs": round(copy_bw, 1), "device": torch.cuda.get_device_name()})
    if "kernels" in parts:
        bench_kernels(rows, copy_bw)
    if "decode" in parts:
        bench_decode(rows, args.new_tokens, args.quick, deadline)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / "bench_gpu.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(" ".join(f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
