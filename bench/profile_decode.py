"""cProfile of decode steps only (no prefill, no cache construction): where a step's time goes per function.

The cache is the speed-only synthetic one of ``accel bench --synthetic-kv`` (random K/V for ``context - 1``
prompt tokens), so the profiled ``generate`` runs one one-token prefill and ``steps - 1`` decode steps.

    python bench/profile_decode.py --policy dense --batch 1 --context 8150 --steps 17
    python bench/profile_decode.py --policy hylra --batch 1 --context 8150 --steps 17
    python bench/profile_decode.py --policy hf ...        # unpatched transformers on a DynamicCache
"""
from __future__ import annotations
from accel import compat

import argparse
import cProfile
import pstats
import time

import torch

import accel
from accel.eval.synthetic import synthetic_cache
from accel.cli.common import load_model
from accel.eval.text import text_of_tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policy", default="dense", help="an accel policy spec, or 'hf' for the unpatched model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=8150, help="prompt tokens (prompt + steps must fit the model)")
    ap.add_argument("--steps", type=int, default=17)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sort", default="tottime", help="pstats key: tottime or cumulative")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model, args.dtype)
    enc = tok([text_of_tokens(tok, args.context - 1)] * args.batch, return_tensors="pt", padding=True)
    n = enc["input_ids"].shape[1]
    hf = args.policy == "hf"
    handle = None if hf else accel.patch(model, args.policy, reserve=n + args.steps + 8)

    def generate(k: int, prof: cProfile.Profile | None = None) -> float:
        cache = synthetic_cache(model, args.batch, n - 1, for_hf=hf)
        if prof is not None:
            prof.enable()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=k, eos_token_id=None, do_sample=False, pad_token_id=tok.pad_token_id,
                           **compat.cache_kwargs(model, cache))
        t = time.perf_counter() - t
        if prof is not None:
            prof.disable()
        return t

    generate(2)  # warm-up
    prof = cProfile.Profile()
    t = generate(args.steps, prof)
    print(f"{args.policy}: {args.steps} tokens in {t:.3f} s ({1e3 * t / args.steps:.1f} ms per token, under cProfile)")
    pstats.Stats(prof).sort_stats(args.sort).print_stats(args.top)
    if handle is not None:
        handle.remove()


if __name__ == "__main__":
    main()
