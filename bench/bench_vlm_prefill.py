"""Prefill speed and memory of visual-token pruning at LLaVA-1.5's shape.

A ``LlavaForConditionalGeneration`` with 576 visual tokens per image (336 px, 14 px patches) and the real
SmolLM2-135M as its language model; the vision tower and projector have random weights (no VLM weights
install offline; speed does not depend on them). For each policy and kept-token count it measures, in one
run on an idle machine:

* ``prefill_s``: one forward over the prompt with the image (tower + projector + LLM prefill), median of
  ``--repeats``;
* ``llm_s``: the part of it spent in the language model (forward hooks around it);
* ``peak_mb``: peak CPU memory allocated during that forward (torch profiler, ``profile_memory``);
* ``kv_mb``: the LLM's KV cache after prefill.

Ratios are against keeping all 576 tokens. ``--tower vit-l`` is LLaVA-1.5's CLIP ViT-L/14-336 shape
(24 layers, width 1024, 0.3B parameters: on this CPU it costs more than the 135M LLM, unlike LLaVA-1.5-7B
where the LLM is 23x the tower); ``--tower small`` (6 layers, width 384) keeps LLaVA's proportion of tower
to LLM closer. Both are reported.

    python bench/bench_vlm_prefill.py --tower vit-l --out bench/results/vlm_prefill_vitl.csv
"""
from __future__ import annotations
from accel import compat

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOWERS = {
    "vit-l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6),
}


def build(tower: str):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from accel.models import load
    from accel.research.digits_vlm import IMAGE_TOKEN

    lm, tok = load("smollm2-135m")
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    torch.manual_seed(0)
    vc = CLIPVisionConfig(image_size=336, patch_size=14, num_channels=3, **TOWERS[tower])
    cfg = LlavaConfig(vision_config=vc, text_config=lm.config, image_token_id=image_id, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      tie_word_embeddings=lm.config.tie_word_embeddings)
    vlm = LlavaForConditionalGeneration(cfg)
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.weight = vlm.model.language_model.embed_tokens.weight
    vlm.set_attn_implementation("sdpa")
    vlm.eval()
    pre = tok("USER: ", add_special_tokens=False)["input_ids"]
    post = tok("\nDescribe the image in detail. ASSISTANT:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([pre + [image_id] * 576 + post])
    pv = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    return vlm, ids, pv


def peak_allocated_mb(fn) -> float:
    """Peak of the running sum of CPU allocations minus frees seen by the torch profiler during ``fn``
    (each event's own allocations, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak / 2**20


def measure(vlm, ids, pv, repeats: int) -> dict:
    lm = vlm.model.language_model
    marks = {}
    h1 = lm.register_forward_pre_hook(lambda m, a: marks.__setitem__("t0", time.perf_counter()))
    h2 = lm.register_forward_hook(lambda m, a, o: marks.__setitem__("t1", time.perf_counter()))
    out = {}
    try:
        def run():
            with torch.no_grad():
                return vlm(input_ids=ids, pixel_values=pv, logits_to_keep=1, use_cache=True)

        res = run()  # warm-up
        kv = compat.output_cache(res)
        out["kv_mb"] = sum(t.numel() * t.element_size() for layer in kv.layers for t in (layer.keys, layer.values)) / 2**20
        out["lm_tokens"] = kv.get_seq_length()
        tot, llm = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            tot.append(time.perf_counter() - t)
            llm.append(marks["t1"] - marks["t0"])
        out["prefill_s"] = statistics.median(tot)
        out["llm_s"] = statistics.median(llm)
        out["peak_mb"] = peak_allocated_mb(run)
    finally:
        h1.remove()
        h2.remove()
    return out


def main(argv=None):
    import accel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tower", choices=sorted(TOWERS), default="vit-l")
    ap.add_argument("--policies", default="fastervlm,flowcut,fastv,randomprune")
    ap.add_argument("--keeps", default="144,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/vlm_prefill.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    vlm, ids, pv = build(args.tower)
    rows = []
    base = measure(vlm, ids, pv, args.repeats)
    rows.append({"policy": "all tokens (unpatched)", "keep": 576, **base})
    print(f"all 576: prefill {base['prefill_s']:.3f}s (LLM {base['llm_s']:.3f}s) peak {base['peak_mb']:.0f} MB", flush=True)
    for pol in [p for p in args.policies.split(",") if p]:
        for k in [int(x) for x in args.keeps.split(",")]:
            with accel.patch(vlm, pol, keep=k):
                r = measure(vlm, ids, pv, args.repeats)
            rows.append({"policy": pol, "keep": k, **r})
            print(f"{pol} keep {k}: prefill {r['prefill_s']:.3f}s ({base['prefill_s'] / r['prefill_s']:.2f}x) "
                  f"LLM {r['llm_s']:.3f}s ({base['llm_s'] / r['llm_s']:.2f}x) peak {r['peak_mb']:.0f} MB", flush=True)
    for r in rows:
        r["prefill_speedup"] = base["prefill_s"] / r["prefill_s"]
        r["llm_speedup"] = base["llm_s"] / r["llm_s"]
        r["peak_ratio"] = r["peak_mb"] / base["peak_mb"]
        r.update(tower=args.tower, threads=args.threads, torch=torch.__version__)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.6))
        labels = [f"{r['policy'].split(' ')[0]}\n{r['keep']}" for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["prefill_s"] for r in rows], 0.4, label="VLM prefill (tower + LLM)")
        ax.bar([i + 0.2 for i in x], [r["llm_s"] for r in rows], 0.4, label="LLM part")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("seconds")
        ax.set_title(f"prefill, 576 visual tokens, {args.tower} tower (random) + SmolLM2-135M, {args.threads} thread")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:  # pragma: no cover
        pass
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
