"""Long generation on a compressed cache: the KV bytes held (and allocated) stay at the budget.

SmolLM2-135M, a real prompt of ``--context`` tokens (the Paul Graham essays), ``--new-tokens`` generated
tokens forced (no EOS stop), for each KV policy; every ``--every`` steps the cache reports the bytes its
kept tokens hold and the bytes it has allocated. Dense is the reference (its cache grows with every
token). Writes CSV + PNG.

    python bench/bench_kv_long_generation.py --context 4096 --new-tokens 2048 \
        --policies dense,snapkv@budget_ratio=0.25,h2o@budget_ratio=0.25,duo@budget_ratio=0.25 \
        --out bench/results/kv_long_generation.csv
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch


class _Probe:
    """A StoppingCriteria that records the cache size every ``every`` steps (never stops)."""

    def __init__(self, handle, every: int):
        self.handle, self.every, self.rows, self.step = handle, every, [], 0

    def __call__(self, input_ids, scores, **kwargs):
        self.step += 1
        if self.step % self.every == 0 or self.step == 1:
            c = self.handle.cache
            self.rows.append((self.step, c.nbytes(), c.allocated_bytes()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def main() -> int:
    import accel
    from accel.cli.common import load_model
    from accel.eval.text import text_of_tokens

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=2048)
    ap.add_argument("--every", type=int, default=64)
    ap.add_argument("--policies", default="dense,snapkv@budget_ratio=0.25,h2o@budget_ratio=0.25,duo@budget_ratio=0.25")
    ap.add_argument("--out", default="bench/results/kv_long_generation.csv")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    ids = tok(text_of_tokens(tok, args.context - 1), return_tensors="pt")["input_ids"][:, : args.context]
    from transformers import StoppingCriteriaList

    rows = []
    for pol in args.policies.split(","):
        with accel.patch(model, pol, reserve=ids.shape[1] + args.new_tokens) as h, torch.no_grad():
            probe = _Probe(h, args.every)
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, stopping_criteria=StoppingCriteriaList([probe]))
            dt = time.perf_counter() - t
            c = h.cache
            probe.rows.append((out.shape[1] - ids.shape[1], c.nbytes(), c.allocated_bytes()))
        for step, held, alloc in probe.rows:
            rows.append({"policy": pol, "context": ids.shape[1], "step": step, "kv_held_mb": round(held / 1e6, 3),
                         "kv_allocated_mb": round(alloc / 1e6, 3), "total_s": round(dt, 1)})
        first, last = probe.rows[0], probe.rows[-1]
        print(f"{pol:28s} held {first[1] / 1e6:8.2f} MB at step {first[0]} -> {last[1] / 1e6:8.2f} MB at step {last[0]}; "
              f"allocated {first[2] / 1e6:8.2f} -> {last[2] / 1e6:8.2f} MB; {dt:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for pol in dict.fromkeys(r["policy"] for r in rows):
        rs = [r for r in rows if r["policy"] == pol]
        ax.plot([r["step"] for r in rs], [r["kv_held_mb"] for r in rs], label=f"{pol} held")
        ax.plot([r["step"] for r in rs], [r["kv_allocated_mb"] for r in rs], ls=":", label=f"{pol} allocated")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache MB")
    ax.set_title(f"SmolLM2-135M, {ids.shape[1]}-token prompt: cache size during generation", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
