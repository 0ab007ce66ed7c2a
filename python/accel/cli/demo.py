"""`accel demo`: the main job. A long-context passkey on the embedded SmolLM2, unpatched vs accel,
printing both answers, prefill time, decode tokens/s and the speed-up."""
from __future__ import annotations

import sys

from .common import BASELINE, load_model, parse_overrides, patch_for, setup, timed_generate


def run(args) -> int:
    from ..eval.passkey import make_passkey, passkey_correct

    setup(args)
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tok = load_model(args.model, args.dtype)
    sample = make_passkey(tok, args.context, depth=args.depth, seed=args.seed)
    print(f"passkey prompt: {sample.n_tokens} tokens, key hidden at depth {sample.depth:.0%}; "
          f"generating {args.max_new_tokens} tokens with each side\n")
    results = {}
    for pol in (BASELINE, args.policy):
        handle = patch_for(model, pol, parse_overrides(args.set), reserve=sample.n_tokens + args.max_new_tokens)
        try:
            print(f"[{pol}] prefill + decode ...", file=sys.stderr)
            texts, st, _ = timed_generate(model, tok, [sample.prompt], args.max_new_tokens, force_length=True)
        finally:
            if handle is not None:
                handle.remove()
        rate = st.decode_steps / st.decode_s
        ok = passkey_correct(texts[0], sample.answer)
        results[pol] = (texts[0], st.prefill_s, rate, ok)
    label = {BASELINE: "transformers (unpatched)", args.policy: f"accel ({args.policy})"}
    print(f"expected pass key: {sample.answer}")
    for pol, (text, pre, rate, ok) in results.items():
        first = text.strip().split("\n")[0][:60]
        print(f"{label[pol]:28s} answer: {first!r:40s} {'CORRECT' if ok else 'wrong'} | prefill {pre:6.1f} s | "
              f"decode {rate:6.2f} tok/s")
    base_rate, acc_rate = results[BASELINE][2], results[args.policy][2]
    print(f"\ndecode speed-up of accel {args.policy} over unpatched transformers: {acc_rate / base_rate:.2f}x "
          f"(context {sample.n_tokens} tokens, {args.dtype}, {__import__('torch').get_num_threads()} thread(s))")
    return 0
