"""torch.compile on a patched model: decode tokens/s compiled vs eager, same cache, same tokens.

    python bench/bench_compile.py --context 4096 --new-tokens 32 --policies dense,hylra

For each policy: patch SmolLM2-135M, fill accel's cache with ``context`` random tokens (speed only: decode cost
does not depend on the cache's content; KV policies compress it to their budgets as ``accel bench --synthetic-kv``
does), then generate ``new-tokens`` greedily, once eagerly and once with
``model.forward = torch.compile(model.forward)`` after a warm-up generation that compiles it (compile time reported
separately); eager and compiled runs alternate ``--repeats`` times and the median of each is reported (single runs
on the shared 2-core machine move by 10-15%). The compiled and eager token sequences must be equal. Unpatched
transformers (eager, one run) is the baseline. Writes a CSV (and prints a table); one thread.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def decode_rate(model, tok, enc, cache_fn, new_tokens: int):
    from accel import compat
    from accel.perf import TimingStreamer

    st = TimingStreamer()
    cache = cache_fn()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, eos_token_id=None, do_sample=False,
                             pad_token_id=tok.pad_token_id, streamer=st, **compat.cache_kwargs(model, cache))
    return st.decode_steps / st.decode_s, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--policies", default="dense,hylra")
    ap.add_argument("--repeats", type=int, default=3, help="eager / compiled runs, alternated; the median is reported")
    ap.add_argument("--out", default="bench/results/compile_smollm2_4k.csv")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import accel
    from accel.eval.synthetic import compress_synthetic, synthetic_cache
    from accel.eval.text import text_of_tokens
    from accel.perf import machine_facts

    model, tok = accel.models.load(args.model)
    prompt = text_of_tokens(tok, args.context - 1)
    enc = tok([prompt], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    rows = []
    rate, _ = decode_rate(model, tok, enc, lambda: synthetic_cache(model, 1, n - 1, for_hf=True), args.new_tokens)
    rows.append({"policy": "hf", "mode": "eager", "decode_tok_s": rate, "compile_s": 0.0, "same_tokens": "",
                 "runs": f"{rate:.2f}"})
    for pol in [p for p in args.policies.split(",") if p]:
        with accel.patch(model, pol, reserve=n + args.new_tokens + 8) as handle:
            def fresh():
                cache = synthetic_cache(model, 1, n - 1, for_hf=False)
                if handle.runtime.kv:  # KV policies: compress the random cache to their budgets, as `accel bench`
                    compress_synthetic(cache, handle)
                return cache
            compiled = torch.compile(model.forward)
            model.forward = compiled
            try:
                t = time.perf_counter()
                decode_rate(model, tok, enc, fresh, args.new_tokens)  # compiles (and recompiles as shapes settle)
                compile_s = time.perf_counter() - t
            finally:
                del model.forward
            rates = {"eager": [], "compiled": []}
            outs = {}
            for _ in range(args.repeats):  # alternate, so drift of the shared machine hits both modes alike
                for mode in ("eager", "compiled"):
                    if mode == "compiled":
                        model.forward = compiled
                    try:
                        r, outs[mode] = decode_rate(model, tok, enc, fresh, args.new_tokens)
                    finally:
                        model.__dict__.pop("forward", None)
                    rates[mode].append(r)
        same = bool(torch.equal(outs["eager"], outs["compiled"]))
        for mode in ("eager", "compiled"):
            rows.append({"policy": pol, "mode": mode, "decode_tok_s": statistics.median(rates[mode]),
                         "compile_s": compile_s if mode == "compiled" else 0.0,
                         "same_tokens": same if mode == "compiled" else "",
                         "runs": " ".join(f"{x:.2f}" for x in rates[mode])})
    facts = machine_facts()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["context", "new_tokens", "model", *facts])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "context": n, "new_tokens": args.new_tokens, "model": args.model, **facts})
    hf = rows[0]["decode_tok_s"]
    print(f"{'policy':10s} {'mode':9s} {'tok/s':>7s} {'vs hf':>6s} {'compile s':>9s} same")
    for r in rows:
        print(f"{r['policy']:10s} {r['mode']:9s} {r['decode_tok_s']:7.2f} {r['decode_tok_s'] / hf:6.2f} "
              f"{r['compile_s']:9.1f} {r['same_tokens']}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
