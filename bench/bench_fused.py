"""A decode step's cost beyond the bytes it reads: transformers' modules against accel's fused decode layers, in fp32
and bf16.

    python bench/bench_fused.py --contexts 2048,8000 --batch 1 --new-tokens 32 --repeats 3 --dtypes float32,bfloat16

For each context: one real prefill (the Paul Graham essays, cut to the token count) fills accel's cache with the
prompt minus its last token; every run then generates from an independent copy of that cache (``generate()`` with
the full prompt prefills only the last token), so all variants decode over the same keys and values:

  * ``hf``: unpatched transformers (a DynamicCache copy of the same keys and values);
  * ``modules``: accel dense with ``fused_decode=False`` (transformers' modules around accel's attention, the
    decode path before the fused layers);
  * ``layers``: accel dense with the fused decode layers, each layer making its own calls (the cache append and the
    attention between the two fused halves in Python);
  * ``fused``: accel dense as it runs by default: the whole stack of fused layers in one C++ call per step.

With several ``--dtypes`` each is a copy of the model in that dtype, prefilled on its own, and every variant runs in
each (a bf16 row's bytes are its bf16 weights and cache). Runs alternate ``--repeats`` times (every dtype and variant
in turn) and the median step of each is reported, with its speed-up over unpatched transformers in the same dtype
and in fp32. After every run the read bandwidth is measured again (the shared machine drifts by tens of percent within minutes); the bytes
of a step (weights + the KV bytes accel's attention counted; a dense read for ``hf``) at that bandwidth give the
limit, and ``overhead_ms`` is the step's time beyond it. One thread. Writes a CSV and prints a table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("hf", "modules", "layers", "fused")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", default="2048,8000")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16, float16")
    ap.add_argument("--out", default="bench/results/decode_fused_smollm2_b1.csv")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import accel
    from accel import compat
    from accel.cache.accel_cache import AccelCache
    from accel.eval.runner import fork_cache
    from accel.eval.text import text_of_tokens
    from accel.models.loader import load
    from accel.perf import TimingStreamer, kv_bytes_read, measure_read_bandwidth, weight_bytes
    from common import write_csv

    dtypes = [d.strip() for d in args.dtypes.split(",")]
    DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    models = {}
    for d in dtypes:
        models[d], tok = load(args.model, dtype=DT[d])
    rows = []
    for ctx in [int(c) for c in args.contexts.split(",")]:
        enc = tok([text_of_tokens(tok, ctx - 1)] * args.batch, return_tensors="pt", padding=True)
        n_prompt = enc["input_ids"].shape[1]
        bases = {}
        for d, model in models.items():
            t0 = time.perf_counter()
            with torch.no_grad(), accel.patch(model, "dense"):
                bases[d] = AccelCache(model.config, reserve=n_prompt + args.new_tokens)
                model(input_ids=enc["input_ids"][:, :-1], attention_mask=enc["attention_mask"][:, :-1],
                      **compat.cache_kwargs(model, bases[d]), use_cache=True)
            print(f"context {n_prompt} {d}: prefill {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        steps: dict = {(d, v): [] for d in dtypes for v in VARIANTS}
        for rep in range(args.repeats):
            for d, model in models.items():
                wbytes, n_layers = weight_bytes(model), model.config.num_hidden_layers
                for v in VARIANTS:
                    cache = fork_cache(bases[d], for_hf=(v == "hf"))
                    handle = None if v == "hf" else accel.patch(model, "dense", fused_decode=(v != "modules"))
                    if v == "layers":
                        handle.runtime.fused.whole_stack = False
                    st = TimingStreamer()
                    try:
                        with torch.no_grad():
                            model.generate(**enc, max_new_tokens=args.new_tokens, eos_token_id=None,
                                           do_sample=False, pad_token_id=tok.pad_token_id, streamer=st,
                                           **compat.cache_kwargs(model, cache))
                        stats = dict(handle.runtime.stats) if handle is not None else None
                    finally:
                        if handle is not None:
                            handle.remove()
                    del cache
                    bw = measure_read_bandwidth(repeats=3)
                    kv = kv_bytes_read(model, n_prompt + args.new_tokens // 2, args.batch, DT[d].itemsize)
                    if stats and stats["decode_layer_calls"]:
                        kv = stats["kv_read_bytes"] * n_layers / stats["decode_layer_calls"]
                        assert (stats["fused_layer_calls"] > 0) == (v != "modules")
                        assert (stats.get("stack_calls", 0) > 0) == (v == "fused")
                    step = st.decode_s / max(1, st.decode_steps)
                    steps[d, v].append((step, bw, wbytes + kv))
                    print(f"  {d:8s} {v:8s} rep {rep}: {1e3 * step:7.2f} ms/step, read bandwidth {bw:.2f} GB/s",
                          file=sys.stderr)
        for (d, v), runs in steps.items():
            step, bw, byts = sorted(runs)[len(runs) // 2]
            limit = byts / (bw * 1e9)
            rows.append({"model": args.model, "dtype": d, "variant": v, "context": n_prompt, "batch": args.batch,
                         "new_tokens": args.new_tokens, "repeats": args.repeats,
                         "decode_step_ms": round(1e3 * step, 2), "decode_tok_s": round(args.batch / step, 2),
                         "step_ms_all": " ".join(f"{1e3 * s:.1f}" for s, _, _ in runs),
                         "bytes_per_step_mb": round(byts / 1e6, 1), "read_bw_gbs": round(bw, 2),
                         "bw_limit_ms": round(1e3 * limit, 2), "overhead_ms": round(1e3 * (step - limit), 2),
                         "frac_read_bw": round(limit / step, 3)})
        here = [r for r in rows if r["context"] == n_prompt]
        hf = {r["dtype"]: r for r in here if r["variant"] == "hf"}
        for r in here:
            r["speedup_vs_hf"] = round(r["decode_tok_s"] / hf[r["dtype"]]["decode_tok_s"], 3)
            r["speedup_vs_hf_fp32"] = (round(r["decode_tok_s"] / hf["float32"]["decode_tok_s"], 3)
                                       if "float32" in hf else "")
    out = Path(args.out)
    write_csv(rows, out)  # adds the machine facts to every row
    print(f"{'dtype':8s} {'variant':8s} {'ctx':>6s} {'step ms':>8s} {'tok/s':>7s} {'x HF':>6s} {'limit ms':>8s} "
          f"{'extra ms':>8s} {'%BW':>5s}")
    for r in rows:
        print(f"{r['dtype']:8s} {r['variant']:8s} {r['context']:6d} {r['decode_step_ms']:8.2f} {r['decode_tok_s']:7.2f} "
              f"{r['speedup_vs_hf']:6.2f} {r['bw_limit_ms']:8.2f} {r['overhead_ms']:8.2f} {100 * r['frac_read_bw']:5.0f}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
