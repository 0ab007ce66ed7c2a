"""Quality of the embedded model in bf16 and fp16 against fp32, all decoding through accel (dense, the fused layers).

    python bench/bench_bf16_quality.py --lm-contexts 2048,4096 --lm-samples 4 --lm-tokens 64 \
        --passkey-contexts 2048,4096 --passkey-samples 6

Copies of the model in each of ``--dtypes`` (fp32, bf16, fp16: the 16-bit ones rounded from the same weights), each
patched with accel's dense policy:

  * ``lm``: for windows of the Paul Graham essays, the prefix is prefilled and the next ``--lm-tokens`` tokens are
    decoded one step at a time with teacher forcing (the decode steps run the fused layers and the 16-bit cache): the
    perplexity of each copy, and each 16-bit copy's top-1 agreement with and KL divergence from the fp32 copy's
    next-token distributions on the same tokens;
  * ``passkey``: accel's passkey samples (the evaluation harness's), greedy, accuracy of each copy.

Writes one CSV row per (task, context, dtype) and prints a table. One thread.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _lm_logps(model, prefix, cont):
    """Teacher-forced decode of ``cont`` after ``prefix`` through accel dense: [len(cont), vocab] log-probs."""
    import accel
    from accel import compat
    from accel.cache.accel_cache import AccelCache

    logps = []
    with torch.no_grad(), accel.patch(model, "dense") as h:
        cache = AccelCache(model.config, reserve=prefix.shape[1] + cont.numel())
        model(input_ids=prefix[:, :-1], use_cache=True, **compat.cache_kwargs(model, cache))
        tok_in = prefix[:, -1:]
        for t in range(cont.numel()):
            out = model(input_ids=tok_in, use_cache=True, **compat.cache_kwargs(model, cache))
            logps.append(torch.log_softmax(out.logits[0, -1].float(), -1))
            tok_in = cont[t:t + 1].view(1, 1)
        fused = h.runtime.stats["fused_layer_calls"]
    assert fused > 0, "the decode steps did not take the fused layers"
    return torch.stack(logps)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lm-contexts", default="2048,4096")
    ap.add_argument("--lm-samples", type=int, default=4)
    ap.add_argument("--lm-tokens", type=int, default=64)
    ap.add_argument("--passkey-contexts", default="2048,4096")
    ap.add_argument("--passkey-samples", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated; float32 first (the reference)")
    ap.add_argument("--out", default="bench/results/bf16_quality_smollm2.csv")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from accel.eval import runner
    from accel.eval.text import essays_text
    from accel.models.loader import converted_path, load
    from common import write_csv

    t0 = time.time()
    models = {}
    DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    names = [d.strip() for d in args.dtypes.split(",")]
    if names[0] != "float32" or any(d not in DT for d in names):
        ap.error(f"--dtypes: float32 first, then any of {sorted(DT)}")
    for name in names:
        models[name], tok = load(args.model, dtype=DT[name])
    rows = []
    text = essays_text()
    for L in [int(c) for c in args.lm_contexts.split(",") if c]:
        logps = {d: [] for d in models}
        conts = []
        for i in range(args.lm_samples):
            start = ((args.seed * 7919 + i) * 104_729) % max(1, len(text) // 2)
            ids = tok(text[start:start + int((L + args.lm_tokens) * 6)], return_tensors="pt")["input_ids"]
            ids = ids[:, :L + args.lm_tokens]
            prefix, cont = ids[:, :L], ids[0, L:]
            conts.append(cont)
            for d, m in models.items():
                logps[d].append(_lm_logps(m, prefix, cont))
            print(f"lm {L}: sample {i + 1}/{args.lm_samples} ({time.time() - t0:.0f} s)", file=sys.stderr)
        cont = torch.cat(conts)
        ref = torch.cat(logps["float32"])
        for d in models:
            lp = torch.cat(logps[d])
            nll = -lp.gather(1, cont.view(-1, 1)).mean().item()
            rows.append({"model": args.model, "task": "lm", "context": L, "dtype": d, "n": args.lm_samples,
                         "tokens_scored": cont.numel(), "ppl": round(math.exp(nll), 4),
                         "top1_agree_vs_fp32": round((lp.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
                         "kl_vs_fp32": f"{(ref.exp() * (ref - lp)).sum(-1).mean().item():.3e}", "accuracy": ""})
    pk_lengths = [int(c) for c in args.passkey_contexts.split(",") if c]
    if pk_lengths and args.passkey_samples > 0:
        tok_path = converted_path(args.model)
        samples = runner.build_samples("passkey", tok, tok_path, pk_lengths, [0.1, 0.3, 0.5, 0.7, 0.9],
                                       args.passkey_samples, args.seed)
        for d, m in models.items():
            res = runner.run_generation(m, tok, samples, ["dense"])
            print(f"passkey {d}: done ({time.time() - t0:.0f} s)", file=sys.stderr)
            for L in pk_lengths:
                got = [r.score for r in res if r.target_len == L]
                rows.append({"model": args.model, "task": "passkey", "context": L, "dtype": d, "n": len(got),
                             "tokens_scored": "", "ppl": "", "top1_agree_vs_fp32": "", "kl_vs_fp32": "",
                             "accuracy": round(sum(got) / len(got), 4)})
    out = Path(args.out)
    write_csv(rows, out)
    print(f"{'task':8s} {'ctx':>6s} {'dtype':9s} {'n':>3s} {'ppl':>9s} {'agree':>7s} {'KL':>10s} {'acc':>6s}")
    for r in rows:
        print(f"{r['task']:8s} {r['context']:6d} {r['dtype']:9s} {r['n']:3d} {str(r['ppl']):>9s} "
              f"{str(r['top1_agree_vs_fp32']):>7s} {str(r['kl_vs_fp32']):>10s} {str(r['accuracy']):>6s}")
    print(f"wrote {out} in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
