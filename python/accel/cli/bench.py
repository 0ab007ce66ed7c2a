"""`accel bench`: prefill latency and decode tokens/s against context length, for the unpatched
HF model and accel policies in one run, with the achieved fraction of the memory-bandwidth limit.

Every row of the CSV carries the machine facts. Prompts are real text (the Paul Graham essays)
cut to the exact token count; generation is forced to ``--new-tokens`` tokens.

Per row: the bytes a decode step reads (weights + the KV bytes accel's attention counted), the read bandwidth
measured right after that row's run (shared machines drift by tens of percent within minutes), the time those
bytes take at that bandwidth (``bw_limit_ms``) and what the step costs beyond it (``overhead_ms``), and the decode
path (``fused``: accel's fused decode layers; ``modules``: transformers' modules).

Baselines: ``hf`` (unpatched transformers, always run), ``hf-compile`` (transformers' own fastest path: a static
cache and ``torch.compile`` of the forward, warmed up before the timed run), and with ``--anchors DIR`` the
runtimes a user would pick instead, run by ``DIR/run_anchors.sh`` when they are built (rows ``anchor:...``).
"""
from __future__ import annotations
from .. import compat

import sys
import time
from pathlib import Path

import torch

from ..errors import AccelError
from .common import (BASELINE, check_policy_specs, int_list, load_model, parse_overrides, patch_for, setup,
                     split_policies, write_csv)

#: transformers' own fastest decode: static cache + torch.compile of the forward
HF_COMPILE = "hf-compile"


def _kv_held(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def run(args) -> int:
    from tqdm import tqdm

    from ..eval.text import text_of_tokens
    from ..eval.synthetic import compress_synthetic, synthetic_cache
    from ..perf import PeakRSS, TimingStreamer, kv_bytes_read, machine_facts, measure_copy_bandwidth, measure_read_bandwidth, weight_bytes

    setup(args)
    # input errors before the model loads
    contexts = int_list(args.contexts, "--contexts")
    batches = int_list(args.batch, "--batch")
    int_list(str(args.new_tokens), "--new-tokens")
    repeats = int(getattr(args, "repeats", 1))
    if repeats < 1:
        raise AccelError(f"--repeats {repeats}: give a count of at least 1")
    overrides = parse_overrides(args.set)
    check_policy_specs([p for p in split_policies(args.policies) if p != HF_COMPILE], overrides)
    if args.anchors and not (Path(args.anchors) / "run_anchors.sh").is_file():
        raise AccelError(f"--anchors {args.anchors!r}: no run_anchors.sh there; give the folder that holds the anchor "
                         "scripts (run_anchors.sh, setup.sh)")
    distinct = getattr(args, "prompts", "same") == "distinct"
    if distinct and args.synthetic_kv:
        raise AccelError("--prompts distinct gives each row its own prompt, which --synthetic-kv replaces with random "
                         "K/V: drop one of them")
    if args.synthetic_kv and HF_COMPILE in split_policies(args.policies):
        raise AccelError("hf-compile decodes on transformers' own static cache, which --synthetic-kv does not fill: "
                         "drop one of them")
    model, tok = load_model(args.model, args.dtype)
    from ..tpla.adapters import supported_mla_types

    if getattr(model.config, "model_type", None) in supported_mla_types():
        return _run_mla(args, model)
    if int(getattr(args, "tp", 1) or 1) > 1:
        raise AccelError("accel bench --tp times tensor-parallel TPLA on MLA models (DeepSeek-V2/V3, e.g. --model "
                         "random-mla-mid); other models run tensor-parallel with accel generate --tp")
    policies = [BASELINE] + [p for p in split_policies(args.policies) if p != BASELINE]
    anchor_rows, anchor_note = (_run_anchors(args.anchors, contexts, batches, args.new_tokens, repeats)
                                if args.anchors else ([], None))
    facts = machine_facts()
    read_bw = measure_read_bandwidth()
    copy_bw = measure_copy_bandwidth()
    wbytes = weight_bytes(model)
    from ..models.registry import get_adapter

    n_layers = get_adapter(model).info().num_layers
    dbytes = next(model.parameters()).element_size()
    print(f"bandwidth: read {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s (1 process, {facts['threads']} threads); "
          f"weights {wbytes / 1e6:.0f} MB", file=sys.stderr)
    rows = []
    # with --repeats the whole grid runs again, so each policy's runs are spread over the session (the machine drifts)
    runs = [(c, b, p) for _ in range(repeats) for c in contexts for b in batches for p in policies]
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    if args.synthetic_kv:
        print("speed-only run: the KV cache is filled with random keys/values instead of running the prefill "
              "(decode speed does not depend on the content for these policies); prefill_s is not measured",
              file=sys.stderr)
    for ctx, batch, pol in tqdm(runs, desc="bench", unit="run"):
        # prompt + generated tokens must fit the context window; the context reported is the prompt's
        n_ctx = min(ctx, limit - args.new_tokens)
        if distinct:
            enc = _distinct_prompts(tok, n_ctx - 1, batch)
        else:
            prompt = text_of_tokens(tok, n_ctx - 1)  # +BOS where the tokenizer adds one
            enc = tok([prompt] * batch, return_tensors="pt", padding=True)
        n_prompt = enc["input_ids"].shape[1]
        cache = synthetic_cache(model, batch, n_prompt - 1, for_hf=(pol == BASELINE)) if args.synthetic_kv else None
        # exactly --new-tokens steps with no end-of-sequence check: min_new_tokens would add two scans of the vocabulary
        # per step (transformers' MinLength processors, ~0.4 ms on SmolLM2) that runtimes without them do not pay
        gen = dict(max_new_tokens=args.new_tokens, eos_token_id=None, do_sample=False,
                   pad_token_id=tok.pad_token_id, return_dict_in_generate=True)
        handle = None
        had_forward, prev_forward = "forward" in model.__dict__, model.__dict__.get("forward")
        try:
            if pol == HF_COMPILE:
                gen["cache_implementation"] = "static"
                print(f"hf-compile: compiling transformers' forward for {n_prompt} + {args.new_tokens} tokens "
                      "(one untimed generation; minutes on a CPU)", file=sys.stderr)
                model.forward = torch.compile(type(model).forward.__get__(model))
                with torch.no_grad():  # compile every graph of the timed run (same shapes) outside it
                    model.generate(**enc, **gen)
            else:
                handle = patch_for(model, pol, overrides if pol != BASELINE else None,
                                   reserve=n_prompt + args.new_tokens)
            if cache is not None and handle is not None and handle.runtime.kv:
                compress_synthetic(cache, handle)
            st = TimingStreamer()
            with torch.no_grad(), PeakRSS() as mem:
                out = model.generate(**enc, streamer=st, **gen, **compat.cache_kwargs(model, cache))
            held = _kv_held(compat.output_cache(out))
            stats = dict(handle.runtime.stats) if handle is not None else None
            del out, cache
        finally:
            if handle is not None:
                handle.remove()
            if pol == HF_COMPILE:
                if had_forward:
                    model.forward = prev_forward
                else:
                    model.__dict__.pop("forward", None)
                torch._dynamo.reset()
        run_bw = measure_read_bandwidth(repeats=3)
        step_s = st.decode_s / max(1, st.decode_steps)
        mid_ctx = n_prompt + args.new_tokens // 2
        kv_read = kv_bytes_read(model, mid_ctx, batch, dbytes)  # a dense step's KV read (HF reads at least this)
        if stats and stats["decode_layer_calls"]:
            # what accel's attention actually read, per step (sparse policies read less than dense)
            kv_read = stats["kv_read_bytes"] * n_layers / stats["decode_layer_calls"]
        byts = wbytes + kv_read
        if stats is None:
            path = "hf-compiled" if pol == HF_COMPILE else "hf"
        else:
            path = "fused" if stats.get("fused_layer_calls") else "modules"
        limit_ms = 1e3 * byts / (run_bw * 1e9)
        rows.append({
            "model": args.model, "policy": pol, "context": n_prompt, "context_requested": ctx, "batch": batch,
            "new_tokens": args.new_tokens, "decode_path": path,
            "prefill_s": round(st.prefill_s, 3) if not args.synthetic_kv else "",
            "decode_step_ms": round(1e3 * step_s, 3),
            "decode_tok_s": round(batch / step_s, 3), "bytes_per_step_mb": round(byts / 1e6, 1),
            "kv_read_per_step_mb": round(kv_read / 1e6, 1),
            "achieved_gbs": round(byts / step_s / 1e9, 2), "frac_read_bw": round(byts / step_s / 1e9 / run_bw, 3),
            "frac_copy_bw": round(byts / step_s / 1e9 / copy_bw, 3),
            "bw_limit_ms": round(limit_ms, 2), "overhead_ms": round(1e3 * step_s - limit_ms, 2),
            "read_bw_gbs": round(run_bw, 2), "read_bw_start_gbs": round(read_bw, 2), "copy_bw_gbs": round(copy_bw, 2),
            "kv_held_mb": round(held / 1e6, 2),
            "peak_rss_mb": round(mem.peak / 1e6, 1), "rss_growth_mb": round((mem.peak - mem.start) / 1e6, 1),
            "dtype": args.dtype, "synthetic_kv": bool(args.synthetic_kv),
            "prompts": "distinct" if distinct else "same", **facts,
        })
        time.sleep(0.1)
    rows = _median_runs(rows, repeats)
    base = {(r["context"], r["batch"]): r["decode_tok_s"] for r in rows if r["policy"] == BASELINE}
    dense = {(r["context"], r["batch"]): r["decode_tok_s"] for r in rows if r["policy"] == "dense"}
    best_anchor: dict = {}
    for a in anchor_rows:
        key = (a["context_requested"], a["batch"])
        best_anchor[key] = max(best_anchor.get(key, 0.0), a["decode_tok_s"])
    for r in rows:
        b = base.get((r["context"], r["batch"]))
        r["speedup_vs_hf"] = round(r["decode_tok_s"] / b, 3) if b else ""
        d = dense.get((r["context"], r["batch"]))
        r["speedup_vs_accel_dense"] = round(r["decode_tok_s"] / d, 3) if d else ""
        a = best_anchor.get((r["context_requested"], r["batch"]))
        r["speedup_vs_best_anchor"] = round(r["decode_tok_s"] / a, 3) if a else ""
    if anchor_note:
        print(anchor_note, file=sys.stderr)
    rows += [{**{k: "" for k in rows[0]}, **a} for a in anchor_rows]
    out = write_csv(args.out, rows)
    _print_table(rows)
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


def _median_runs(rows: list[dict], repeats: int) -> list[dict]:
    """One row per (requested context, batch, policy): the run with the median decode step (the upper of the two middle ones
    for an even count), with ``repeats`` and every run's step time (``step_ms_all``, in run order) added; the
    prefill time is that run's own."""
    groups: dict = {}
    for r in rows:
        # the requested context: two requests clipped to one prompt length (the model's window) stay two rows
        groups.setdefault((r["context_requested"], r["batch"], r["policy"]), []).append(r)
    out = []
    for runs in groups.values():
        med = sorted(runs, key=lambda r: r["decode_step_ms"])[len(runs) // 2]
        out.append({**med, "repeats": repeats, "step_ms_all": " ".join(f"{r['decode_step_ms']:.2f}" for r in runs)})
    return out


def _run_anchors(script_dir: str, contexts: list[int], batches: list[int], new_tokens: int, repeats: int = 1):
    """Run ``script_dir/run_anchors.sh`` (the CPU anchor runtimes: llama.cpp, vLLM, OpenVINO GenAI; built by
    ``script_dir/setup.sh`` under ``$ANCHORS_DIR``, default ``~/.cache/accel-anchors``) on this run's grid: batch 1
    at every context, the first batch above 1 at every context. Returns (rows, note): the parsed CSV rows as bench
    rows, and a one-line reason when nothing ran (no script, nothing built, a failed run). Never a dependency of
    the package: nothing here is imported, only the script is run."""
    import os
    import subprocess

    script = Path(script_dir) / "run_anchors.sh"
    if not script.is_file():
        return [], f"anchors skipped: {script} does not exist (--anchors takes the folder holding run_anchors.sh)"
    built = Path(os.environ.get("ANCHORS_DIR", Path.home() / ".cache" / "accel-anchors"))
    if not built.is_dir():
        return [], (f"anchors skipped: nothing built under {built} (ANCHORS_DIR); build them with "
                    f"`bash {Path(script_dir) / 'setup.sh'}`")
    env = dict(os.environ, NGEN=str(new_tokens), CTX_B1=" ".join(map(str, contexts)) if 1 in batches else "")
    if repeats > 1 and "REPS" not in os.environ:
        env["REPS"] = str(repeats)  # llama-bench -r: its rows are the mean of that many runs
    big = [b for b in batches if b > 1]
    env.update({"B8": str(big[0]), "CTX_B8": " ".join(map(str, contexts))} if big else {"CTX_B8": ""})
    print(f"anchors: running {script} (batch 1: {env['CTX_B1'] or '-'}; batch {env.get('B8', '-')}: "
          f"{env['CTX_B8'] or '-'})", file=sys.stderr)
    try:
        r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=4 * 3600)
    except subprocess.TimeoutExpired:
        return [], f"anchors skipped: {script} ran past 4 hours"
    # the script runs its own default batch-8 grid when given none: keep this run's batches only
    rows = [row for row in parse_anchor_csv(r.stdout) if row["batch"] in batches]
    if not rows:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        return [], f"anchors skipped: {script} gave no rows (exit {r.returncode}: {tail[0]})"
    return rows, None


def parse_anchor_csv(text: str) -> list[dict]:
    """Rows of ``run_anchors.sh``'s CSV (``runtime,weights_dtype,kv_dtype,batch,context,decode_tok_s``; ``#``
    lines are comments) as bench rows named ``anchor:<runtime> <weights>/<kv>``."""
    out = []
    import math

    for line in text.splitlines():
        line = line.strip()
        parts = [p.strip() for p in line.split(",")]
        if not line or line.startswith("#") or len(parts) < 6 or parts[0] == "runtime":
            continue
        try:
            batch, ctx, tps = int(parts[3]), int(parts[4]), float(parts[5])
        except ValueError:
            continue
        if not (math.isfinite(tps) and tps > 0 and batch > 0):
            continue  # a failed measurement, not a rate
        out.append({"policy": f"anchor:{parts[0]} {parts[1]}/{parts[2]}", "context": ctx, "context_requested": ctx,
                    "batch": batch, "decode_tok_s": round(tps, 3), "decode_step_ms": round(1e3 * batch / tps, 3),
                    "decode_path": "anchor"})
    return out


def _distinct_prompts(tok, n_tokens: int, batch: int) -> dict:
    """``batch`` prompts of the same token count from passages spread over the essays (row i starts i / batch of the
    way in), stacked without padding: {"input_ids", "attention_mask"}."""
    from ..eval.text import essays_text, text_of_tokens

    span = len(essays_text())
    rows = [tok(text_of_tokens(tok, n_tokens, offset_chars=(i * span) // max(batch, 1)), return_tensors="pt")["input_ids"][0]
            for i in range(batch)]
    n = min(len(r) for r in rows)
    ids = torch.stack([r[:n] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _print_table(rows):
    w = max([10] + [len(str(r["policy"])) for r in rows])  # the policy column fits the longest spec
    hdr = f"{'policy':{w}s} {'ctx':>6s} {'B':>2s} {'prefill s':>9s} {'step ms':>8s} {'tok/s':>8s} {'x HF':>6s} {'GB/s':>6s} {'%BW':>5s} {'KV MB':>8s} {'extra ms':>8s}"
    print(hdr)
    for r in rows:
        if r.get("decode_path") == "anchor":
            print(f"{r['policy']:{w}s} {r['context']:6d} {r['batch']:2d} {'-':>9s} {r['decode_step_ms']:8.2f} "
                  f"{r['decode_tok_s']:8.2f}")
            continue
        pre = f"{r['prefill_s']:9.2f}" if r["prefill_s"] != "" else f"{'-':>9s}"
        print(f"{r['policy']:{w}s} {r['context']:6d} {r['batch']:2d} {pre} {r['decode_step_ms']:8.2f} "
              f"{r['decode_tok_s']:8.2f} {r['speedup_vs_hf']!s:>6s} {r['achieved_gbs']:6.2f} "
              f"{100 * r['frac_read_bw']:5.0f} {r['kv_held_mb']:8.1f} {r['overhead_ms']:8.1f}")


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for pol in sorted({r["policy"] for r in rows}):
        for b in sorted({r["batch"] for r in rows}):
            rs = sorted([r for r in rows if r["policy"] == pol and r["batch"] == b], key=lambda r: r["context"])
            if not rs:
                continue
            lab = f"{pol} (batch {b})"
            style = dict(marker="x", linestyle="--") if rs[0].get("decode_path") == "anchor" else dict(marker="o")
            axes[0].plot([r["context"] for r in rs], [r["decode_tok_s"] for r in rs], label=lab, **style)
            bw = [r for r in rs if r["frac_read_bw"] != ""]
            if bw:
                axes[1].plot([r["context"] for r in bw], [100 * r["frac_read_bw"] for r in bw], label=lab, **style)
    for ax, yl in zip(axes, ["decode tokens/s", "% of measured read bandwidth"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend()
    r0 = rows[0]
    fig.suptitle(f"{r0['model']} decode{' (synthetic KV)' if r0['synthetic_kv'] else ''}, {r0['dtype']}, {r0['threads']} thread(s), {r0['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_mla(args, model) -> int:
    """MLA models (DeepSeek-V2/V3): decode step time over a synthetic latent cache for each policy and
    context, in this process or, with ``--tp N`` under torchrun, on N ranks (the step time of a rank group is
    its slowest rank's). The unpatched baseline runs only when ``hf`` is listed: it expands the whole latent
    cache into per-head keys and values every step (seconds per step at 32K)."""
    from ..errors import AccelError
    from ..research.tpla_bench import cache_bytes, hf_latent_cache, time_decode, weight_bytes
    from ..research.mla_models import synthetic_cache
    from .common import tp_setup

    if not args.synthetic_kv:
        raise AccelError("accel bench on an MLA model times decode over a synthetic latent cache: add --synthetic-kv")
    policies = split_policies(args.policies)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in str(args.batch).split(",")]
    tp = int(getattr(args, "tp", 1) or 1)
    rank = 0
    rows = []
    for pol in policies:
        overrides = parse_overrides(args.set)
        if tp > 1:
            if pol == BASELINE:
                raise AccelError("--tp runs tpla on every rank; drop 'hf' from --policies (run it without --tp)")
            if pol.split("@")[0] != "tpla":
                raise AccelError(f"--tp {tp} on an MLA model runs tensor-parallel TPLA: use --policies tpla (got "
                                 f"{pol!r})")
            rank = tp_setup(args, pol, overrides)
        for ctx in contexts:
            for batch in batches:
                handle = patch_for(model, pol, overrides if pol != BASELINE else None)
                try:
                    cache = hf_latent_cache(model, ctx, batch) if handle is None else synthetic_cache(handle, ctx, batch)
                    if tp > 1:
                        torch.distributed.barrier()
                    step = time_decode(model, cache, ctx, args.new_tokens, batch)
                    if handle is not None:
                        handle.cache = cache
                        per = handle.shard_nbytes()
                        kv = per[0] if tp > 1 else sum(per)
                    else:
                        kv = cache_bytes(cache)
                    wb = weight_bytes(model)
                finally:
                    if handle is not None:
                        handle.remove()
                    cache = None
                if tp > 1:  # a step ends when the slowest rank ends
                    t = torch.tensor([step])
                    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                    step = float(t)
                rows.append({"model": args.model, "policy": pol if tp == 1 else f"{pol} (tp={tp})", "context": ctx,
                             "batch": batch, "ranks": tp, "decode_step_ms": round(1e3 * step, 3),
                             "decode_tok_s": round(batch / step, 3), "kv_bytes_per_rank": kv,
                             "weight_bytes_per_rank": wb, "threads_per_rank": torch.get_num_threads(),
                             "synthetic_kv": True})
    if tp > 1:
        torch.distributed.barrier()  # no rank leaves (and tears the group down) while another still works
        torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    out = write_csv(args.out, rows)
    for r in rows:
        print(f"{r['policy']:>28} ctx {r['context']:>6} batch {r['batch']:>2}: {r['decode_step_ms']:9.1f} ms/step  "
              f"KV/rank {r['kv_bytes_per_rank'] / 2**20:8.1f} MiB  weights/rank {r['weight_bytes_per_rank'] / 2**20:7.1f} MiB")
    print(f"wrote {out}", file=sys.stderr)
    return 0
