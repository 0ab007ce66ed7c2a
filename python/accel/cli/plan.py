"""`accel plan`: make a layer plan for a model (HyLRA: profile + DP; DELTA: its default layout), save it
as JSON and draw it as a PNG (which layers are full, which reuse which, the overlap the DP saw)."""
from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from .common import load_model, parse_overrides, setup

logger = logging.getLogger("accel")


def draw_plan(plan, path: str | Path, title: str | None = None) -> None:
    """Layers left to right: full (dark), select (mid), reuse (light) with an arc to the layer whose
    selection it reuses; rollback (most sensitive) layers marked; below, the profiled overlap matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = plan.num_layers
    prov = plan.provenance or {}
    ov = prov.get("similarity_matrix", prov.get("overlap_min_over_heads"))  # older plans: the overlap key
    fig = plt.figure(figsize=(max(8, L * 0.42), 6.5 if ov else 2.8))
    ax = fig.add_axes([0.04, 0.62 if ov else 0.2, 0.92, 0.3 if ov else 0.6])
    colors = {"full": "#1f4e79", "select": "#4f8fc0", "reuse": "#bcd7ee"}
    roll = set(prov.get("rollback_layers", []))
    for i, lp in enumerate(plan.layers):
        ax.add_patch(plt.Rectangle((i, 0), 0.9, 1, color=colors.get(lp.mode, "#999999")))
        ax.text(i + 0.45, 0.5, str(i), ha="center", va="center", fontsize=8,
                color="white" if lp.mode != "reuse" else "black")
        if i in roll:
            ax.text(i + 0.45, -0.25, "R", ha="center", va="center", fontsize=8, color="#b00000")
        if lp.mode == "reuse":
            s = lp.reuse_src
            rad = min(0.6, 2.4 / max(1, i - s))  # arc height ~ rad * distance / 2 stays under ~1.2 layers
            ax.annotate("", xy=(i + 0.45, 1.02), xytext=(s + 0.45, 1.02),
                        arrowprops=dict(arrowstyle="->", color="#555555", lw=0.8, connectionstyle=f"arc3,rad=-{rad}"))
    ax.set_xlim(-0.2, L + 0.2)
    ax.set_ylim(-0.5, 2.6)
    ax.axis("off")
    n = {m: sum(lp.mode == m for lp in plan.layers) for m in ("full", "select", "reuse")}
    fig.suptitle(title or f"{plan.policy} plan: {n['full']} full, {n['select']} select, {n['reuse']} reuse "
                 f"(arrows: anchor -> reusing layer; R = rollback)", fontsize=10)
    if ov:
        import numpy as np

        ax2 = fig.add_axes([0.3, 0.06, 0.4, 0.48])
        im = ax2.imshow(np.array(ov), cmap="viridis", vmin=0, vmax=1)
        metric = prov.get("args", {}).get("metric", "overlap")
        ax2.set_title({"overlap": "profiled top-k overlap |m_i & m_j| / |m_j| (min over KV heads)",
                       "mass": "attention mass of j kept by i's top-k (mean over steps, min over query heads)",
                       "mass_min": "attention mass of j kept by i's top-k (worst step, min over query heads)"}
                      .get(metric, metric), fontsize=8)
        ax2.set_xlabel("layer j (reuser)", fontsize=8)
        ax2.set_ylabel("layer i (anchor)", fontsize=8)
        fig.colorbar(im, ax=ax2, fraction=0.046)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_flux_plan(plan, path: str | Path, title: str | None = None) -> None:
    """Flux's router plan: per layer, the mean training label (KL of the next-token distribution when the layer alone
    runs sparse attention) of each backend, log scale; the layers routed per request are decided at run time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = (plan.provenance or {}).get("mean_label") or {}
    L = plan.num_layers
    routed = (plan.provenance or {}).get("routed_layers") or [i for i, lp in enumerate(plan.layers) if lp.mode == "flux"]
    fig, ax = plt.subplots(figsize=(max(8, L * 0.35), 4.2))
    w = 0.8 / max(1, len(means))
    for j, (b, vals) in enumerate(sorted(means.items())):
        ax.bar([li + j * w for li in routed[:len(vals)]], [max(v, 1e-7) for v in vals], width=w, label=b)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL, this layer alone sparse")
    ax.legend(fontsize=8)
    scores = (plan.provenance or {}).get("heldout_sa_kl") or {}
    sub = "\n".join(f"{b}: router {s['router']:.3g}, static {s['static']:.3g}, oracle {s['oracle']:.3g}, random "
                     f"{s['random']:.3g}" for b, s in sorted(scores.items()))
    ax.set_title(title or "flux router plan: mean training label per layer; held-out KL summed over the SA layers at "
                 f"the target ratio:\n{sub}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_head_plan(plan, path: str | Path, title: str | None = None) -> None:
    """Per-head plans (DuoAttention, MoA, TCA): a layers x KV-heads map of the profiled scores (duo; retrieval heads
    outlined), the spans (moa) or the share of each block kept (tca)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    L = plan.num_layers
    H = max(len(lp.heads or []) for lp in plan.layers)
    grid = np.full((H, L), np.nan)
    is_moa = plan.policy == "moa"
    is_tca = plan.policy == "tca"
    for i, lp in enumerate(plan.layers):
        for h, hp in enumerate(lp.heads or []):
            if is_tca:
                grid[h, i] = hp.budget / plan.params["block"]
            elif hp.score is not None:
                grid[h, i] = hp.score
            elif hp.alpha is not None and hp.beta is not None:
                from ..policies.moa import moa_span

                grid[h, i] = moa_span(hp.alpha, hp.beta, 4096) / 4096
    fig, ax = plt.subplots(figsize=(max(8, L * 0.35), 1.2 + 0.45 * H))
    im = ax.imshow(grid, cmap="magma", aspect="auto")
    for i, lp in enumerate(plan.layers):
        for h, hp in enumerate(lp.heads or []):
            if hp.kind == "retrieval":
                ax.add_patch(plt.Rectangle((i - 0.5, h - 0.5), 1, 1, fill=False, ec="#00c0ff", lw=1.5))
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head")
    ax.set_yticks(range(H))
    n_ret = sum(hp.kind == "retrieval" for lp in plan.layers for hp in (lp.heads or []))
    if is_tca:
        default = title or (f"tca plan: share of each block's {plan.params['block']} tokens a head keeps (tolerance "
                            f"{plan.params.get('tolerance')}; mean {np.nanmean(grid):.2f})")
    elif is_moa:
        default = title or (f"moa plan (density {plan.params.get('density')}): each head's span at 4096 tokens "
                            "as a fraction of the context")
    else:
        what = {"far_mass": "attention mass outside sink + recent", "residual": "streaming-attention output error",
                "relative": "relative streaming-attention output error"}.get(plan.provenance.get("args", {}).get("metric"),
                                                                            "profiler score")
        default = (f"{plan.policy} plan: head score ({what}); "
                   f"outlined: {n_ret} retrieval heads at the plan's default fraction")
    ax.set_title(title or default, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: `accel plan` flags -> calibrator option names (any other option: --set KEY=VALUE)
FLAG_OPTIONS = ("tokens", "n_texts", "steps", "chunk", "preserved_ratio", "sink", "recent", "retrieval_fraction",
                "densities", "lengths", "sparsity", "computed_ratio", "anchor_mode", "data", "metric", "reduce",
                "ppl_texts")
LIST_OPTIONS = {"densities": float, "lengths": int}


def calibration_options(args) -> dict:
    """The calibrator options the user gave as flags; the calibrator owns every default."""
    from ..errors import InputError

    opts = {k: getattr(args, k) for k in FLAG_OPTIONS if getattr(args, k, None) is not None}
    for k, conv in LIST_OPTIONS.items():
        if k in opts:
            try:
                opts[k] = [conv(x) for x in str(opts[k]).split(",") if x.strip()]
            except ValueError:
                raise InputError(f"--{k.replace('_', '-')} takes comma-separated numbers, got {opts[k]!r}") from None
    return opts


def check_request(args):
    """Input errors before the model loads: an unknown policy, options its calibrator does not take. Returns
    ``(calibrator or None, options)``: a calibrator takes the flags and ``--set KEY=VALUE``; a policy without one
    writes its default plan, built with ``--set`` as its options."""
    from ..errors import InputError
    from ..policies.registry import get_calibrator, get_policy_class, list_calibratable, make_policy

    get_policy_class(args.policy)  # one line naming the registered policies
    opts = calibration_options(args)
    extra = parse_overrides(args.set)
    if args.policy not in list_calibratable():
        if opts:
            flags = ", ".join("--" + k.replace("_", "-") for k in sorted(opts))
            raise InputError(f"policy {args.policy!r} has no calibrator, so {flags} {'does' if len(opts) == 1 else 'do'} "
                             f"not apply; it writes its default plan (calibratable: {', '.join(list_calibratable())})")
        make_policy(args.policy, extra)  # its options, checked before the model loads
        return None, extra
    opts.update(extra)
    cal = get_calibrator(args.policy)
    bad = sorted(set(opts) - (set(cal.options) - {"progress"}))  # the command shows its own progress bar
    if bad:
        flags = ", ".join("--" + b.replace("_", "-") if b in FLAG_OPTIONS else b for b in bad)
        raise InputError(f"{flags} {'does' if len(bad) == 1 else 'do'} not apply to {args.policy!r}; its calibration "
                         f"options are {', '.join(cal.options)}")
    return cal, opts


AUTO_FLAGS = ("kv_budget", "speed", "max_ppl_increase", "context", "batch", "cost", "from_plan", "explain")


def check_auto_flags(args) -> dict:
    """``accel plan --policy auto``'s target, checked before the model loads; other policies refuse its flags."""
    from ..errors import InputError

    given = [f for f in AUTO_FLAGS if getattr(args, f, None) not in (None, False)]
    if args.policy != "auto":
        if given:
            flags = ", ".join("--" + ("from" if f == "from_plan" else f.replace("_", "-")) for f in given)
            raise InputError(f"{flags} appl{'ies' if len(given) == 1 else 'y'} to --policy auto only")
        return {}
    if (args.context is not None or args.batch is not None) and args.speed is None:
        raise InputError("--context and --batch set what a --speed target is for; add --speed")
    from ..policies.auto import TARGET_KNOBS, AutoPolicy

    if args.from_plan and args.from_plan != "shipped" and not Path(args.from_plan).is_file():
        raise InputError(f"--from {args.from_plan}: no such plan file (give an auto plan or profile from `accel plan "
                         "--policy auto`, or --from shipped for the profile accel ships for the model)")
    calib = ["--" + k.replace("_", "-") for k in sorted(calibration_options(args))] + (
        ["--set"] if getattr(args, "set", None) else [])
    if args.from_plan and calib:
        raise InputError(f"--from solves a profile already made; calibration options ({', '.join(calib)}) do not "
                         "apply: drop them, or drop --from to calibrate again")
    from ..calibration.auto import DATA, METRICS

    if getattr(args, "data", None) is not None and args.data not in DATA:
        raise InputError(f"--data {args.data} does not apply to auto; its calibration texts are {' or '.join(DATA)}")
    if getattr(args, "metric", None) is not None and args.metric not in METRICS:
        raise InputError(f"--metric {args.metric} does not apply to auto; its damage metrics are "
                         f"{' or '.join(METRICS)}")
    if args.max_ppl_increase is not None and not args.from_plan and getattr(args, "ppl_texts", None) == 0:
        raise InputError("--max-ppl-increase is predicted from the profile's perplexity curve, which --ppl-texts 0 "
                         "leaves out; drop --ppl-texts 0")
    target = {k: getattr(args, k) for k in TARGET_KNOBS if getattr(args, k) is not None}
    pol = AutoPolicy.from_overrides(**target)  # the same one-line checks as accel.patch
    return pol.target()


def run_auto(args, model, tok, cal, opts, target: dict):
    """Calibrate (or read ``--from``), then solve for ``target`` with this machine's cost model when there is one."""
    from ..errors import AccelError
    from ..models.registry import get_adapter
    from ..plan import Plan
    from ..scheduler.cost import cost_model_for
    from ..scheduler.solve import check_for_model, explain, solve_plan

    info = get_adapter(model).info()
    if args.from_plan == "shipped":
        from ..plan.shipped import require_shipped_plan

        profile = require_shipped_plan("auto", info, "a calibration profile")
    elif args.from_plan:
        if opts:
            raise AccelError("--from solves from a profile already made; calibration options do not apply")
        profile = check_for_model(Plan.load(args.from_plan), info)
        profile.validate(num_layers=info.num_layers, num_kv_heads=info.num_kv_heads)
    else:
        profile = cal(model, tok, progress=True, **opts)
    try:
        cost = cost_model_for(model, args.cost)
    except AccelError as exc:
        if "speed" in target or args.cost:
            if "threads=" in str(exc):  # on the command line the thread count is a flag
                raise AccelError(f"{exc}; on the command line pass --threads with the cost model's count") from None
            raise
        cost = None
        logger.info("no cost model for this model and machine (%s): the plan carries no predicted step time", exc)
    plan = solve_plan(profile, target, cost=cost, info=info)
    lines = explain(plan)
    print("\n".join(lines if args.explain else lines[:2 if "step_ms" in plan.params["predicted"] else 1]))
    return plan


def draw_auto_plan(plan, path: str | Path, title: str | None = None) -> None:
    """An auto plan: a layers x KV-heads map of the share of the prompt each head keeps, each compressed layer's rule
    written under it (W: window, S: scored), with the plan's target and predictions in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..policies.auto import head_share

    L, H = plan.num_layers, plan.num_kv_heads
    grid = np.ones((H, L))
    for i, lp in enumerate(plan.layers):
        for h, hp in enumerate(lp.heads or []):
            grid[h, i] = head_share(hp.kind, hp.beta)
    fig, ax = plt.subplots(figsize=(max(8, L * 0.35), 1.6 + 0.45 * H))
    im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    for i, lp in enumerate(plan.layers):
        label = {"window": "W", "scored": "S"}.get((lp.params or {}).get("rule"), "") if lp.mode == "compress" else ""
        ax.text(i, -0.55, label, ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("layer (W: window rule, S: scored rule, blank: kept whole)")
    ax.set_ylabel("KV head")
    ax.set_yticks(range(H))
    p = plan.params.get("predicted", {})
    extra = f", predicted {p['speedup']}x decode" if "speedup" in p else ""
    ax.set_ylim(H - 0.5, -1.1)
    tgt = ", ".join(f"{k} {v}" for k, v in (plan.params.get("target") or {}).items())
    ax.set_title(title or (f"auto plan ({tgt}): share of the prompt each head keeps (mean "
                           f"{p.get('kv_share')}{extra})"), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    from ..plan import Plan

    setup(args)
    target = check_auto_flags(args)
    cal, opts = check_request(args)
    model, tok = load_model(args.model, args.dtype)
    if args.policy == "auto":
        plan = run_auto(args, model, tok, cal, opts, target)
    elif cal is not None:
        plan = cal(model, tok, progress=True, **opts) if "progress" in cal.options else cal(model, tok, **opts)
    else:
        from ..models.registry import get_adapter
        from ..policies.registry import make_policy

        plan = make_policy(args.policy, opts).build_plan(get_adapter(model).info())
    plan.provenance["command"] = "accel " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "accel plan"
    plan.provenance["model"] = args.model
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    Plan.load(out)  # what we wrote reads back and validates
    png = args.png or str(out.with_suffix(".png"))
    if plan.policy == "auto":
        draw_auto_plan(plan, png)
    elif plan.policy == "flux":
        draw_flux_plan(plan, png)
    elif any(lp.heads for lp in plan.layers):
        draw_head_plan(plan, png)
    else:
        draw_plan(plan, png)
    modes = [lp.mode if lp.mode != "reuse" else f"reuse<{lp.reuse_src}" for lp in plan.layers]
    print(f"wrote {out} and {png}")
    print("layers: " + ", ".join(f"{i}:{m}" for i, m in enumerate(modes)))
    return 0
