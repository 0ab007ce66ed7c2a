"""Writes docs/results.md and the policy table of README.md from the CSV files in bench/results/.

    python bench/make_results.py           # write both
    python bench/make_results.py --check   # exit 1 if either differs from what would be written

Every number on docs/results.md and in the README's policy table comes from a CSV here; nothing is typed in by
hand. Each table names its CSV, the command that produced it (looked up in bench/README.md's index, which must
list every result file) and the machine facts the CSV carries. Standard library only.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BENCH_README = ROOT / "bench" / "README.md"
RESULTS_MD = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
TABLE_START = "<!-- policy-table:start -->"
TABLE_END = "<!-- policy-table:end -->"

#: The day each CSV was committed (`git log -1 --format=%cs -- bench/results/NAME`). The CSVs carry no date of
#: their own; this is the closest record of when they were measured. Add a line when a CSV is added or rerun.
COMMITTED = {
    "decode_anchors_smollm2_b1.csv": "2026-12-04",
    "decode_anchors_smollm2_b8.csv": "2026-12-04",
    "decode_anchors_smollm2_b1_bf16.csv": "2026-12-04",
    "decode_anchors_smollm2_b1_runtimes.csv": "2026-12-04",
    "decode_anchors_smollm2_b8_bf16.csv": "2026-12-04",
    "decode_kvpolicies_smollm2_b1_bf16.csv": "2026-12-05",
    "decode_kvpolicies_smollm2_b1_fp32.csv": "2026-12-07",
    "bf16_quality_smollm2.csv": "2026-12-07",
    "decode_fused_smollm2_b1.csv": "2026-12-07",
    "decode_anchors_smollm2_b1_bf16_dense.csv": "2026-12-04",
    "decode_anchors_smollm2_b1_bf16_8k.csv": "2026-12-04",
    "decode_anchors_smollm2_b1_fp32_dense.csv": "2026-12-05",
    "decode_anchors_smollm2_b1_fp16_dense.csv": "2026-12-05",
    "decode_anchors_smollm2_b1_fp32_8k.csv": "2026-12-05",
    "decode_policies_smollm2_b1.csv": "2026-12-04",
    "decode_quest_smollm2_b1.csv": "2026-12-06",
    "decode_quest_smollm2_b1_bf16.csv": "2026-12-06",
    "eval_quest_smollm2_2k.csv": "2026-12-06",
    "eval_quest_smollm2_4k.csv": "2026-12-06",
    "eval_quest_smollm2_4k_lm.csv": "2026-12-06",
    "eval_quest_agg_smollm2_4k.csv": "2026-12-06",
    "eval_quest_none_smollm2_2k.csv": "2026-12-06",
    "eval_quest_none_smollm2_4k.csv": "2026-12-06",
    "eval_quest_none_smollm2_4k_lm.csv": "2026-12-06",
    "eval_quest_none_smollm2_8k.csv": "2026-12-06",
    "decode_quest_none_smollm2_b1.csv": "2026-12-06",
    "decode_quest_smollm2_b8.csv": "2026-12-06",
    "eval_quest_pages_smollm2_8k.csv": "2026-12-06",
    "eval_hip_smollm2_4k.csv": "2026-12-05",
    "eval_hip_smollm2_2k.csv": "2026-12-05",
    "eval_hip_smollm2_4k_lm.csv": "2026-12-05",
    "eval_hip_smollm2_8k.csv": "2026-12-06",
    "decode_hip_smollm2_b1.csv": "2026-12-06",
    "eval_hip_repkeys_smollm2_2k.csv": "2026-12-06",
    "eval_hip_refresh_smollm2_2k.csv": "2026-12-07",
    "eval_hip_gemma3_2k.csv": "2026-12-07",
    "decode_hip_refresh_smollm2_b1.csv": "2026-12-07",
    "decode_hip_smollm2_b8.csv": "2026-12-07",
    "eval_tca_smollm2_2k.csv": "2026-12-06",
    "eval_tca_smollm2_4k.csv": "2026-12-06",
    "eval_tca_smollm2_4k_lm.csv": "2026-12-06",
    "eval_tca_smollm2_8k.csv": "2026-12-06",
    "decode_tca_smollm2_b1.csv": "2026-12-06",
    "decode_tca_smollm2_b8.csv": "2026-12-06",
    "decode_sparse_smollm2_b8.csv": "2026-12-05",
    "eval_flux_smollm2_2k.csv": "2026-12-05",
    "eval_flux_smollm2_4k.csv": "2026-12-05",
    "eval_flux_smollm2_4k_lm.csv": "2026-12-05",
    "eval_flux_pages4_smollm2_4k.csv": "2026-12-06",
    "decode_flux_smollm2_b8_distinct.csv": "2026-12-06",
    "eval_flux_pages4_none_smollm2_4k.csv": "2026-12-06",
    "eval_flux_hylra_smollm2_2k_60.csv": "2026-12-07",
    "eval_flux_pages4_smollm2_2k_60.csv": "2026-12-07",
    "decode_flux_smollm2_b1.csv": "2026-12-05",
    "decode_flux_smollm2_b8.csv": "2026-12-05",
    "eval_sparse_smollm2_8k.csv": "2026-12-05",
    "flux_router_heldout.csv": "2026-12-05",
    "compile_smollm2_4k.csv": "2026-12-07",
    "decode_delta_smollm2_b1.csv": "2026-11-24",
    "decode_delta_smollm2_b8.csv": "2026-11-24",
    "decode_hylra_smollm2_b1.csv": "2026-11-24",
    "decode_hylra_smollm2_b8.csv": "2026-11-24",
    "decode_kernel.csv": "2026-11-23",
    "decode_kv_smollm2_b1.csv": "2026-11-24",
    "decode_kv_smollm2_b1_budgets.csv": "2026-11-27",
    "decode_kv_smollm2_b8.csv": "2026-11-24",
    "decode_kv_smollm2_b8_budgets.csv": "2026-11-27",
    "decode_reuse_smollm2_b1.csv": "2026-11-24",
    "decode_reuse_smollm2_b1_s12.csv": "2026-11-28",
    "decode_reuse_smollm2_b8.csv": "2026-11-24",
    "decode_reuse_smollm2_b8_s12.csv": "2026-11-28",
    "decode_reuse_smollm2_b8_s12_oldlinear.csv": "2026-11-28",
    "decode_smollm2_b1.csv": "2026-11-23",
    "decode_smollm2_throughput.csv": "2026-11-23",
    "eval_delta_smollm2.csv": "2026-11-24",
    "eval_delta_smollm2_8k.csv": "2026-11-24",
    "eval_delta_smollm2_lm.csv": "2026-11-24",
    "eval_hylra_smollm2.csv": "2026-11-24",
    "eval_hylra_smollm2_4k_lm6.csv": "2026-11-28",
    "eval_hylra_smollm2_8k.csv": "2026-11-24",
    "eval_hylra_smollm2_lm.csv": "2026-11-24",
    "eval_kv_smollm2_4k_10.csv": "2026-11-24",
    "eval_kv_smollm2_4k_25.csv": "2026-11-24",
    "eval_kv_smollm2_4k_25_duo.csv": "2026-11-24",
    "eval_kv_smollm2_4k_25_duo_middle.csv": "2026-11-24",
    "eval_kv_smollm2_4k_25_duo_windows.csv": "2026-11-24",
    "eval_kv_smollm2_4k_25_ruler.csv": "2026-11-24",
    "eval_kv_smollm2_4k_25_seed1.csv": "2026-11-25",
    "eval_kv_smollm2_4k_25b.csv": "2026-11-24",
    "eval_kv_smollm2_4k_50.csv": "2026-11-24",
    "eval_kv_smollm2_4k_base_50.csv": "2026-11-27",
    "eval_kv_smollm2_4k_base_lm.csv": "2026-11-27",
    "eval_kv_smollm2_4k_base_ruler.csv": "2026-11-28",
    "eval_kv_smollm2_4k_duo.csv": "2026-11-24",
    "eval_kv_smollm2_4k_duo_default.csv": "2026-11-25",
    "eval_kv_smollm2_4k_duo_default_lm.csv": "2026-11-27",
    "eval_kv_smollm2_4k_duo_default_ruler.csv": "2026-11-27",
    "eval_kv_smollm2_4k_lm_50_10.csv": "2026-11-24",
    "eval_kv_smollm2_4k_ruler_50_10.csv": "2026-11-24",
    "eval_kv_smollm2_8k_25.csv": "2026-11-24",
    "eval_kv_smollm2_8k_25_duo.csv": "2026-11-24",
    "eval_kv_smollm2_8k_50_10.csv": "2026-11-24",
    "eval_kv_smollm2_8k_base_lm.csv": "2026-11-27",
    "eval_kv_smollm2_8k_base_niah_10.csv": "2026-11-28",
    "eval_kv_smollm2_8k_base_niah_25.csv": "2026-11-28",
    "eval_kv_smollm2_8k_base_niah_50.csv": "2026-11-28",
    "eval_kv_smollm2_8k_base_passkey.csv": "2026-11-28",
    "eval_kv_smollm2_8k_base_ruler_a.csv": "2026-11-28",
    "eval_kv_smollm2_8k_base_ruler_b.csv": "2026-11-28",
    "eval_kv_smollm2_8k_duo_50_10.csv": "2026-11-27",
    "eval_kv_smollm2_8k_lm.csv": "2026-11-27",
    "eval_kv_smollm2_8k_ruler.csv": "2026-11-27",
    "eval_kv_smollm2_lm.csv": "2026-11-24",
    "eval_recycled_threshold_smollm2_4k_lm.csv": "2026-11-28",
    "eval_reuse_smollm2.csv": "2026-11-24",
    "eval_reuse_smollm2_8k.csv": "2026-11-24",
    "eval_reuse_smollm2_lm.csv": "2026-11-24",
    "eval_smollm2.csv": "2026-11-23",
    "cost_model_check.csv": "2026-12-07",
    "cost_model_smollm2.csv": "2026-12-07",
    "auto_pareto_smollm2_4k.csv": "2026-12-07",
    "eval_auto_smollm2_4k.csv": "2026-12-07",
    "eval_auto_smollm2_4k_lm.csv": "2026-12-07",
    "auto_ppl_smollm2_4k.csv": "2026-12-07",
    "eval_auto_retrieval_smollm2_4k.csv": "2026-12-07",
    "eval_auto_retrieval_smollm2_4k_lm.csv": "2026-12-07",
    "eval_auto_gemma3_4k.csv": "2026-12-07",
    "decode_auto_gemma3_b1.csv": "2026-12-07",
    "decode_auto_gemma3_b8.csv": "2026-12-07",
    "auto_pareto_gemma3_4k.csv": "2026-12-07",
    "auto_ppl_gemma3_4k.csv": "2026-12-07",
    "decode_auto_smollm2_b1.csv": "2026-12-07",
    "decode_auto_smollm2_b8.csv": "2026-12-07",
    "cost_model_auto.csv": "2026-12-07",
    "cost_model_auto_first.csv": "2026-12-07",
    "cost_model_smollm2_b.csv": "2026-12-07",
    "eval_auto_smollm2_8k.csv": "2026-12-07",
    "decode_auto_smollm2_8k_b1.csv": "2026-12-07",
    "decode_auto_smollm2_8k_b8.csv": "2026-12-07",
    "auto_pareto_smollm2_8k.csv": "2026-12-07",
    "cost_model_smollm2_amd.csv": "2026-12-07",
    "cost_model_auto_amd.csv": "2026-12-07",
    "cost_model_auto_amd_8k.csv": "2026-12-07",
    "cost_model_auto_amd_free.csv": "2026-12-07",
    "eval_auto_speed_smollm2_8k.csv": "2026-12-07",
    "eval_smollm2_long.csv": "2026-11-23",
    "eval_smollm2_ruler.csv": "2026-11-23",
    "kv_long_generation.csv": "2026-11-27",
    "linear.csv": "2026-11-28",
    "sparse.csv": "2026-12-07",
    "tpla_decode.csv": "2026-11-24",
    "tpla_error.csv": "2026-11-24",
    "vlm_digits_curve.csv": "2026-11-24",
    "vlm_digits_kept_on_digit.csv": "2026-11-24",
    "vlm_clutter_ceiling.csv": "2026-12-07",
    "vlm_clutter_curve.csv": "2026-12-06",
    "vlm_clutter_lm_tuning.csv": "2026-12-07",
    "vlm_clutter_on_target.csv": "2026-12-06",
    "vlm_clutter_see.csv": "2026-12-06",
    "vlm_prefill_small.csv": "2026-11-24",
    "vlm_prefill_vitl.csv": "2026-11-24",
}
#: The project machine changed: runs committed before this day had an AVX-512 EPYC, later ones an AVX2-only EPYC (until
#: CSVs recorded the ISA themselves, column `isa`; the machine of 2026-12-04's later runs is AVX-512 again).
AVX2_SINCE = "2026-11-27"

# ------------------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------------------
_CACHE: dict[str, list[dict]] = {}
_USED: list[str] = []


#: runs made while quest's default was one page set per KV head (``agg="max"``; the default became every query head's
#: own pages, ``agg="none"``, on 2026-12-06): their quest rows are read under that explicit spec, so every table names
#: what ran
QUEST_AGG_MAX_RUNS = {"decode_kvpolicies_smollm2_b1_bf16.csv", "decode_quest_smollm2_b1.csv",
                      "decode_quest_smollm2_b1_bf16.csv", "decode_sparse_smollm2_b8.csv", "eval_quest_agg_smollm2_4k.csv",
                      "eval_quest_pages_smollm2_8k.csv", "eval_quest_smollm2_2k.csv", "eval_quest_smollm2_4k.csv",
                      "eval_quest_smollm2_4k_lm.csv", "eval_sparse_smollm2_8k.csv"}


def quest_agg_explicit(p: str) -> str:
    """A quest spec of a run in QUEST_AGG_MAX_RUNS with its aggregation spelled out (``quest@page_size=16`` ->
    ``quest@page_size=16@agg=max``)."""
    parts = p.split("@")
    if parts[0] != "quest" or any(x.startswith("agg=") for x in parts[1:]):
        return p
    return p + "@agg=max"


#: runs made with the TCA plan shipped before 2026-12-06 (the redundancy of a key against its own block's mean unit
#: key, tolerance 0.25); the plan now shipped scores keys against the window after their block: their tca rows are
#: labelled with the plan they ran
TCA_COSINE_RUNS = {"decode_sparse_smollm2_b8.csv", "eval_sparse_smollm2_8k.csv"}


def tca_plan_explicit(p: str) -> str:
    """A tca spec of a run in TCA_COSINE_RUNS labelled with the plan it ran (its options kept after the label)."""
    parts = p.split("@")
    if parts[0] != "tca":
        return p
    tol = next((x.split("=", 1)[1] for x in parts[1:] if x.startswith("tolerance=")), "0.25")
    rest = "".join("@" + x for x in parts[1:] if not x.startswith("tolerance="))
    return f"tca (earlier plan: own-block cosine, tolerance {tol}){rest}"


def load(name: str) -> list[dict]:
    if name not in _CACHE:
        with open(RESULTS / name, newline="") as f:
            rows = list(csv.DictReader(f))
        if name in TCA_COSINE_RUNS:
            for r in rows:
                if "policy" in r:
                    r["policy"] = tca_plan_explicit(r["policy"])
        if name in QUEST_AGG_MAX_RUNS:
            for r in rows:
                if "policy" in r:
                    r["policy"] = quest_agg_explicit(r["policy"])
        elif {"quest", "quest@agg=none"} <= {r.get("policy") for r in rows}:
            raise SystemExit(f"make_results: {name} holds quest and quest@agg=none rows, so its quest rows ran agg=max; "
                             "add it to QUEST_AGG_MAX_RUNS")
        _CACHE[name] = rows
    return _CACHE[name]


def _bench_index() -> list[tuple[str, str]]:
    """(command cell, output-files cell) of every row of bench/README.md's index table."""
    rows, header = [], None
    for line in BENCH_README.read_text().splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if header is None:
            header = cells
            continue
        if len(cells) == len(header):
            d = dict(zip(header, cells))
            rows.append((d.get("command", ""), d.get("output files", "")))
    return rows


def command_for(name: str) -> str:
    hits = [cmd for cmd, outs in _bench_index() if f"`{name}`" in outs]
    if not hits:
        raise SystemExit(f"make_results: bench/README.md documents no command that writes {name}; add one")
    return "; ".join(hits)


def _one(rows, col) -> str:
    vals = sorted({r[col] for r in rows if r.get(col)})
    return " / ".join(vals)


def machine(name: str) -> str:
    rows = load(name)
    cols = rows[0].keys() if rows else []
    parts = []
    if "cpu" in cols:
        if "isa" in cols:  # recorded by the run itself (accel.perf.machine_facts) since 2026-12-04
            isa = {"AVX512": "AVX-512", "AVX2": "AVX2 only"}.get(_one(rows, "isa"), _one(rows, "isa"))
        else:
            isa = "AVX2 only" if COMMITTED[name] >= AVX2_SINCE else "AVX-512"
        parts.append(f"{_one(rows, 'cpu')} ({isa})")
    else:
        parts.append("CPU not recorded in the CSV")
    if "threads" in cols:
        t = _one(rows, "threads")
        parts.append(f"{t} thread" + ("" if t == "1" else "s"))
    for col in ("torch", "transformers", "accel"):
        if col in cols:
            parts.append(f"{col} {_one(rows, col)}")
    if "read_bw_gbs" in cols:
        bw = sorted({float(r["read_bw_gbs"]) for r in rows if r.get("read_bw_gbs")})
        rng = f"{bw[0]:g}" if len(bw) == 1 else f"{bw[0]:g}-{bw[-1]:g}"
        parts.append(f"read bandwidth {rng} GB/s measured in the run")
    return ", ".join(parts)


def sources(*names: str) -> list[str]:
    out = []
    for n in names:
        _USED.append(n)
        out.append(f"* `bench/results/{n}`, from {command_for(n)}. Machine: {machine(n)}. Committed {COMMITTED[n]}.")
    return ["Source" + ("s" if len(names) > 1 else "") + ":", ""] + out + [""]


def table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def f(x, nd=2) -> str:
    try:
        return f"{float(x):.{nd}f}"
    except (TypeError, ValueError):
        return "-"


def ratio(x, nd=2) -> str:
    return "-" if x in (None, "") else f"{float(x):.{nd}f}x"


def pct(x, nd=0) -> str:
    return "-" if x in (None, "") else f"{100 * float(x):.{nd}f}%"


def display(p: str) -> str:
    return {"hf": "HF unpatched", "hf-unpatched": "HF unpatched"}.get(p, p)


# ------------------------------------------------------------------------------------------------------------
# accuracy / perplexity bookkeeping shared by several sections
# ------------------------------------------------------------------------------------------------------------
def drop_option(p: str, opt: str = "max_new_tokens") -> str:
    return "@".join(x for x in p.split("@") if x.split("=")[0] != opt)


class Quality:
    """Correct samples per (policy, context, task) and perplexity per (policy, context); a later CSV's row
    replaces an earlier one (so a re-measured policy shows its newest run)."""

    def __init__(self):
        self.acc: dict = {}
        self.lm: dict = {}
        self.tasks: list[str] = []

    def add(self, name: str, label=lambda p: p, only=None):
        for r in load(name):
            p = label(r["policy"])
            if p is None or (only and r["policy"] not in only):
                continue
            c = int(r["context"])
            if r["task"] == "lm":
                self.lm[(p, c)] = (float(r["ppl"]), float(r["top1_agree"]) if r.get("top1_agree") else None, int(r["n"]))
            else:
                n = int(r["n"])
                self.acc[(p, c, r["task"])] = (round(float(r["accuracy"]) * n), n)
                if r["task"] not in self.tasks:
                    self.tasks.append(r["task"])
        return self

    def cell(self, p, c, t, slack=None, ref="dense"):
        v = self.acc.get((p, c, t))
        if v is None:
            return "-"
        d = self.acc.get((ref, c, t))
        mark = ""
        if slack is not None and d is not None and p not in (ref, "hf"):
            mark = " ✓" if v[0] >= d[0] - slack else " ✗"
        return f"{v[0]}/{v[1]}{mark}"

    def ppl(self, p, c, ref="dense"):
        v = self.lm.get((p, c))
        if v is None:
            return "-"
        d = self.lm.get((ref, c))
        rel = "" if p in (ref, "hf") or d is None else f" ({100 * (v[0] / d[0] - 1):+.1f}%)"
        return f"{v[0]:.2f}{rel}"


def policy_order(p: str):
    """hf, dense, then falling budget (the number after the first '='), then name."""
    name, _, rest = p.partition("@")
    try:
        budget = -float(rest.split("=")[1].split("@")[0])
    except (IndexError, ValueError):
        budget = 0.0
    return (p != "hf", p != "dense", budget, name, p)


# ------------------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------------------
def sec_headline() -> list[str]:
    evals = ["eval_smollm2.csv", "eval_smollm2_long.csv", "eval_smollm2_ruler.csv"]
    acc, ppl, tasks = {}, {}, set()
    for n in evals:
        for r in load(n):
            k = (r["policy"], int(r["context"]))
            if r["task"] == "lm":
                ppl[k] = float(r["ppl"])
            else:
                acc.setdefault(k, []).append(float(r["accuracy"]))
                tasks.add(r["task"])
    speed = {(r["policy"], int(r["context"])): r for r in load("decode_smollm2_b1.csv")}

    def nearest(pol, ctx):
        c = [k for k in speed if k[0] == pol]
        return speed[min(c, key=lambda k: abs(k[1] - ctx))] if c else None

    rows = []
    for pol, ctx in sorted(set(acc) | set(ppl), key=lambda k: (k[1], k[0] != "hf", k[0])):
        a, s = acc.get((pol, ctx)), nearest(pol, ctx)
        name = "HF unpatched" if pol == "hf" else f"accel {pol}"
        rows.append([name, ctx, f"{sum(a) / len(a):.3f} ({len(a)} tasks)" if a else "-",
                     f(ppl.get((pol, ctx)), 3), f"{float(s['decode_tok_s']):.1f} @ {s['context']}" if s else "-",
                     ratio(s["speedup_vs_hf"]) if s else "-", f(s["kv_held_mb"], 0) if s else "-"])
    same, total, _, _ = _headline_same()
    ev = [r for n in evals for r in load(n)]
    out = ["## Accuracy and speed of accel dense against unpatched transformers", "",
           f"SmolLM2-135M, fp32, plain completion prompts, {_one(ev, 'n')} samples per task and length "
           f"(seed {_one(ev, 'seed')}). Accuracy is the mean "
           "over the generation tasks of each run; perplexity comes from the `lm` task; the speed columns are the "
           "batch-1 decode row of the next section at the nearest context.", ""]
    out += table(["policy", "context", "mean accuracy", "perplexity", "decode tok/s (batch 1)", "vs HF", "KV held MB"], rows)
    out += [f"Tasks averaged: {', '.join(sorted(tasks))}.", "",
            f"accel dense predicted exactly what unpatched transformers predicted on {same} of {total} samples of the "
            f"generation tasks (from the `_samples.csv` files next to each CSV).", ""]
    return out + sources(*evals)


def _decode_rows(name, cols):
    return [[c(r) for c in cols] for r in load(name)]


def sec_decode() -> list[str]:
    out = ["## End-to-end decode, batch 1, against unpatched transformers", "",
           f"Real prompts, {_one(load('decode_smollm2_b1.csv'), 'new_tokens')} generated tokens. Bytes read per step = fp32 weights plus the KV cache at the mid-point "
           "of the generated tokens; the bandwidth shares are against the read and copy bandwidth measured in the same "
           "run.", ""]
    out += table(["policy", "context", "prefill s", "decode step ms", "tokens/s", "vs HF", "GB/s read per step",
                  "% of read bw", "% of copy bw", "KV held MB"],
                 _decode_rows("decode_smollm2_b1.csv", [
                     lambda r: display(r["policy"]) if r["policy"] == "hf" else f"accel {r['policy']}",
                     lambda r: r["context"], lambda r: f(r["prefill_s"], 1), lambda r: f(r["decode_step_ms"], 1),
                     lambda r: f(r["decode_tok_s"], 1), lambda r: ratio(r["speedup_vs_hf"]),
                     lambda r: f(r["achieved_gbs"], 1), lambda r: pct(r["frac_read_bw"]),
                     lambda r: pct(r["frac_copy_bw"]), lambda r: f(r["kv_held_mb"], 0)]))
    out += ["![decode tokens/s and bandwidth](../bench/results/decode_smollm2_b1.png)", ""]
    return out + sources("decode_smollm2_b1.csv")


def predicted_step(rows: list[dict]):
    """For the rows of one run: a function giving the step time a policy row's bytes predict (its bytes at the
    bandwidth measured with it + the dense step's time beyond its own bytes at that context), None for rows without
    a dense row at their context."""
    dense_over = {r["context"]: float(r["overhead_ms"]) for r in rows if r["policy"] == "dense"}

    def pred(r):
        return float(r["bw_limit_ms"]) + dense_over[r["context"]] if r["context"] in dense_over else None

    return pred


def follow_the_bytes(rows: list[dict], name: str | None) -> list[str]:
    """A table of each policy's step against what its bytes predict (``predicted_step``)."""
    pred = predicted_step(rows)
    out = ["Whether a policy's step follows the bytes it reads: its bytes (weights + the KV it read) at the bandwidth "
           "measured with it, plus what the dense step took beyond its own bytes at that context (\"predicted\").", ""]
    body = [[display(r["policy"]), r["context"], f(r["decode_step_ms"], 1), f(r["kv_read_per_step_mb"], 1),
             f(pred(r), 1), ratio(float(r["decode_step_ms"]) / pred(r))]
            for r in rows if r["decode_path"] != "anchor" and r["policy"] not in ("hf", "dense") and pred(r)]
    out += table(["policy", "context", "step ms", "KV read MB/step", "predicted ms", "step / predicted"], body)
    return out + (sources(name) if name else [""])


def anchor_section(name: str, intro: str | None = None, batch: bool = False, extra: bool = False,
                   runs: bool = False) -> list[str]:
    """``intro`` (a paragraph), then the table of accel's rows and the anchors' of one ``accel bench --anchors`` CSV
    and its source line (``batch``: a batch column; ``extra``: the KV read per step and the ratio to accel dense;
    ``runs``: a ``--repeats`` run's step beyond the bytes, share of the read bandwidth and every run's step)."""
    rows = load(name)
    head = ["runtime / policy", "context"] + (["batch"] if batch else []) + ["tokens/s", "step ms"]
    head += (["KV read MB/step", "vs accel dense"] if extra else []) + ["vs the fastest anchor"]
    head += ["beyond the bytes ms", "% of read bw", "all runs (ms)"] if runs else []
    body = []
    for r in rows:
        ours = r["decode_path"] != "anchor"
        row = [display(r["policy"]).replace("anchor:", ""), r["context_requested"]] + ([r["batch"]] if batch else [])
        row += [f(r["decode_tok_s"], 2), f(r["decode_step_ms"], 1)]
        if extra:
            row += [f(r.get("kv_read_per_step_mb") or None, 1) if ours else "-",
                    ratio(r.get("speedup_vs_accel_dense") or None) if ours else "-"]
        row.append(ratio(r.get("speedup_vs_best_anchor") or None) if ours else "-")
        if runs:
            row += ([f(r["overhead_ms"], 1), pct(r["frac_read_bw"]), r["step_ms_all"]] if ours else ["-", "-", "-"])
        body.append(row)
    return ([intro, ""] if intro else []) + table(head, body) + sources(name)


def sec_step() -> list[str]:
    fr = load("decode_fused_smollm2_b1.csv")
    r0 = fr[0]
    out = ["## The decode step against the bytes it reads", "",
           "What a batch-1 decode step costs beyond reading its bytes (the weights + the KV bytes the attention read, in "
           "the row's dtype) at the read bandwidth measured right after the run: transformers' modules around accel's "
           "attention (`modules`, `fused_decode=False`), accel's fused decode layers one by one (`layers`, the cache "
           "append and the attention in Python between each layer's two fused calls) and the whole stack in one C++ call "
           "(`fused`, the default for the dense policy), with unpatched transformers in the same dtype for scale (\"vs HF\"; \"vs HF fp32\": against unpatched transformers "
           "in fp32). bf16 rows are a bf16 copy of the model (bf16 weights and cache). Real prefill (one per context and "
           f"dtype, every run decodes from a copy of the same cache), {r0['new_tokens']} new tokens, {r0['repeats']} runs "
           "per variant alternated, median reported (all runs in the last column).", ""]
    out += table(["dtype", "variant", "context", "step ms", "tokens/s", "vs HF", "vs HF fp32", "bytes-limit ms",
                  "beyond the bytes ms", "% of read bw", "read GB/s", "all runs (ms)"],
                 [[r.get("dtype", "float32"), r["variant"], r["context"], f(r["decode_step_ms"], 1),
                   f(r["decode_tok_s"], 2), ratio(r["speedup_vs_hf"]), ratio(r.get("speedup_vs_hf_fp32") or None),
                   f(r["bw_limit_ms"], 1), f(r["overhead_ms"], 1), pct(r["frac_read_bw"]), f(r["read_bw_gbs"], 1),
                   r["step_ms_all"]] for r in fr])
    out += sources("decode_fused_smollm2_b1.csv")
    q = load("bf16_quality_smollm2.csv")
    out += ["Quality of the same model in bf16 (and fp16, where the run has it) against fp32, all through accel dense "
            "(the decode steps on the fused layers): perplexity of teacher-forced decode steps after a prefix of the "
            "essays, each 16-bit copy's top-1 agreement with and KL divergence from the fp32 copy's next-token "
            "distributions, and passkey accuracy (`bench/bench_bf16_quality.py`).", ""]
    out += table(["task", "context", "dtype", "samples", "tokens scored", "perplexity", "top-1 agree vs fp32",
                  "KL vs fp32", "accuracy"],
                 [[r["task"], r["context"], r["dtype"], r["n"], r["tokens_scored"] or "-", f(r["ppl"] or None, 3),
                   r["top1_agree_vs_fp32"] or "-", r["kl_vs_fp32"] or "-", r["accuracy"] or "-"] for r in q])
    out += sources("bf16_quality_smollm2.csv")
    out += ["accel dense against llama.cpp at equal precision, batch 1, three runs each (`accel bench --repeats 3 "
            "--anchors`: the grid ran three times with unpatched transformers and accel dense alternated, each row is "
            "its median run, every run in the last column; llama.cpp's llama-bench rows are the mean of three runs, its "
            "F32/F32 rows one llama-batched-bench run). bf16: a bf16 copy of the model against llama.cpp with F16 "
            "weights and KV; fp32 against F32 weights with F32 and F16 KV (\"vs the fastest anchor\": the fastest "
            "llama.cpp row of the table at that context). fp16: an fp16 copy of the model against llama.cpp with F16 "
            "weights and KV, the same precision on both sides.", ""]
    for name in ("decode_anchors_smollm2_b1_bf16_dense.csv", "decode_anchors_smollm2_b1_fp16_dense.csv",
                 "decode_anchors_smollm2_b1_fp32_dense.csv"):
        out += anchor_section(name, runs=True)
    out += anchor_section(
        "decode_anchors_smollm2_b1.csv",
        "Against the runtimes a CPU user would pick instead (`accel bench --anchors`, llama.cpp built by "
        "`../shared/anchors/setup.sh` from the same packaged GGUF, one thread; its F32/F32 rows come from "
        "llama-batched-bench, the others from llama-bench; each with flash attention on and off): "
        "decode tokens/s at batch 1 in one run, accel dense fp32 beside them (\"vs the fastest anchor\": against "
        "the fastest llama.cpp row at that context, any precision). This run forced its step count with "
        "`min_new_tokens`, which adds two scans of the vocabulary a step (~0.4 ms) to the accel and HF rows only; "
        "the bf16 and three-runtime tables below do not.")
    out += anchor_section(
        "decode_anchors_smollm2_b1_bf16.csv",
        "The same in bf16 (`accel bench --dtype bfloat16 --anchors`, one run): accel's policies on a bf16 copy of "
        "the model (bf16 weights and cache) beside llama.cpp's rows, whose F16/F16 ones are the equal-width "
        "comparison (16-bit weights and KV; fp16 keeps more mantissa bits than bf16, bf16 more range). \"vs the "
        "fastest anchor\" is against the fastest llama.cpp row at that context, any precision (Q4_1 included).",
        extra=True)
    out += follow_the_bytes(load("decode_anchors_smollm2_b1_bf16.csv"), None)  # the table above, same source
    out += anchor_section(
        "decode_anchors_smollm2_b1_bf16_8k.csv",
        "The same policies at 8K again after the kernels' row requests (the dense notes), one run, against llama.cpp "
        "with F16 and Q4_1 weights and an F16 cache:", extra=True)
    out += anchor_section(
        "decode_anchors_smollm2_b1_fp32_8k.csv",
        "The same policies at 8K in fp32 (fp32 weights and cache), one run, against llama.cpp with F32 weights and an "
        "F32 or F16 cache:", extra=True)
    kvp = load("decode_kvpolicies_smollm2_b1_bf16.csv")
    out += ["The other KV policies the same way at 8K (`accel bench --dtype bfloat16`, default budgets, one run):", ""]
    out += follow_the_bytes(kvp, "decode_kvpolicies_smollm2_b1_bf16.csv")
    kvf = load("decode_kvpolicies_smollm2_b1_fp32.csv")
    dn = next(r for r in kvf if r["policy"] == "dense")
    out += ["The KV policies, hylra and quest at 8K in fp32 after a real prefill, after the attention kernel's "
            "requests of both streams (the dense notes), one run: accel dense "
            f"{f(dn['decode_step_ms'], 1)} ms a step, {f(dn['overhead_ms'], 1)} ms beyond its bytes, "
            f"{pct(dn['frac_read_bw'])} of the read bandwidth measured with it.", ""]
    out += follow_the_bytes(kvf, "decode_kvpolicies_smollm2_b1_fp32.csv")
    out += anchor_section(
        "decode_anchors_smollm2_b1_runtimes.csv",
        "In fp32 against all three anchor runtimes (llama.cpp with F32 weights, vLLM's CPU build and OpenVINO GenAI "
        "with paged attention, fp32; llama.cpp with F32 weights and an F32 or F16 KV cache; one compute thread each; "
        "`run_anchors.sh` with `RUNTIMES=\"llamacpp vllm openvino\"`), one run; the f32/f32 rows are the "
        "equal-precision comparison, and \"vs the fastest anchor\" is against the fastest row at that context, F16 "
        "KV included.")
    out += anchor_section(
        "decode_anchors_smollm2_b8.csv",
        "The same at batch 8 (8 sequences of the prompt decoded together; tokens/s counts all of them), in one run; "
        "here every llama.cpp row comes from llama-batched-bench (one measurement each):", batch=True)
    out += anchor_section(
        "decode_anchors_smollm2_b8_bf16.csv",
        "Batch 8 in bf16 against llama.cpp with F16 weights and KV (the equal-width comparison) and with F32 weights "
        "and KV (`accel bench --dtype bfloat16 --batch 8 --anchors`, one run; the run above forced its step count "
        "with `min_new_tokens`, this one did not):", batch=True)
    pr = load("decode_policies_smollm2_b1.csv")
    pred = predicted_step(pr)
    rows = []
    for r in pr:
        rows.append([display(r["policy"]), r["context"], r["decode_path"], f(r["prefill_s"], 1),
                     f(r["decode_step_ms"], 1), f(r["decode_tok_s"], 2), ratio(r["speedup_vs_hf"]),
                     ratio(r["speedup_vs_accel_dense"]), f(r["kv_read_per_step_mb"], 0), f(r["bw_limit_ms"], 1),
                     f(r["overhead_ms"], 1),
                     ratio(float(r["decode_step_ms"]) / pred(r)) if pred(r) and r["policy"] not in ("hf", "hf-compile")
                     else "-"])
    out += ["Policies after a real prefill (`accel bench` without `--synthetic-kv`), one run each. \"vs bytes + dense "
            "overhead\" is the step time over (the policy's bytes at the measured bandwidth + the dense step's time "
            "beyond its bytes): 1.00x means the policy's step follows the bytes it reads. `hf-compile` is transformers' "
            "static cache with `torch.compile` of the forward (compiled before the timed run).", ""]
    out += table(["policy", "context", "decode path", "prefill s", "step ms", "tokens/s", "vs HF", "vs accel dense",
                  "KV MB read per step", "bytes-limit ms", "beyond the bytes ms", "vs bytes + dense overhead"], rows)
    return out + sources("decode_policies_smollm2_b1.csv")


def sec_throughput() -> list[str]:
    rows = sorted(load("decode_smollm2_throughput.csv"),
                  key=lambda r: (int(r["context"]), int(r["batch"]), r["policy"] != "hf"))
    out = ["## Throughput at batch 1 and 8 (synthetic KV)", "",
           "Speed only: the cache is filled with random keys and values instead of running the prefill (decode speed "
           "does not depend on the content for dense attention). Tokens/s counts all sequences of the batch.", ""]
    out += table(["policy", "context", "batch", "step ms", "tokens/s", "vs HF", "% of read bw", "KV held MB", "peak RSS MB"],
                 [[display(r["policy"]) if r["policy"] == "hf" else f"accel {r['policy']}", r["context"], r["batch"],
                   f(r["decode_step_ms"], 1), f(r["decode_tok_s"], 1), ratio(r["speedup_vs_hf"]),
                   pct(r["frac_read_bw"]), f(r["kv_held_mb"], 0), f(r["peak_rss_mb"], 0)] for r in rows])
    return out + sources("decode_smollm2_throughput.csv")


def sec_kernels() -> list[str]:
    dk = load("decode_kernel.csv")
    out = ["## Kernels", "", "### Decode attention kernel alone (C++ against torch SDPA)", "",
           f"{_one(dk, 'heads')} query and {_one(dk, 'kv_heads')} KV heads, fp32, K/V views of larger buffers, working set larger than the caches.", ""]
    by = {}
    for r in load("decode_kernel.csv"):
        by.setdefault((int(r["head_dim"]), int(r["context"])), {})[r["kernel"]] = r
    rows = []
    for (hd, ctx), k in sorted(by.items()):
        a = k["accel_cpp"]
        cells = [hd, ctx, f"{float(a['ms']):g} ms, {float(a['gbs']):g} GB/s"]
        for prov in ("torch_sdpa_packed_gqa", "torch_sdpa_enable_gqa"):
            t = k.get(prov)
            cells.append("-" if t is None else f"{float(t['ms']):g} ms ({float(t['ms']) / float(a['ms']):.1f}x slower)")
        cells.append(pct(a["frac_read_bw"]))
        rows.append(cells)
    out += table(["head_dim", "context", "accel C++", "torch SDPA (GQA packed)", "torch SDPA (enable_gqa)",
                  "accel % of read bw"], rows)
    out += sources("decode_kernel.csv")

    out += ["### Sparse decode and block-sparse prefill", "",
            f"{_one(load('sparse.csv'), 'heads')} query and {_one(load('sparse.csv'), 'kv_heads')} KV heads, fp32. Sparse decode reads S sorted random token positions per KV head in place "
            "through the index list. Each call is timed with the K/V flushed from every cache level just before it "
            "(median); in brackets, the same call after streaming a large buffer through the caches (everything cold). "
            "The same-rows ceiling is a C++ probe that only sums the same rows of the same buffer.", ""]
    dec = [r for r in load("sparse.csv") if r["op"] == "decode"]
    by = {}
    for r in dec:
        by.setdefault((int(r["head_dim"]), int(r["context"])), {}).setdefault(r["provider"], {})[int(r["selected"])] = r
    rows = []
    for (hd, ctx), p in sorted(by.items()):
        dense = next(iter(p["torch_sdpa_dense"].values()))
        for sel, a in sorted(p.get("accel_sparse", {}).items()):
            g = p.get("torch_gather_sdpa", {}).get(sel)
            rows.append([hd, ctx, sel, f"{float(a['ms']):.3f} ({float(a['ms_all_cold']):.3f})",
                         f"{float(a['gbs']):.1f} ({pct(a['frac_scattered_bw'])} of {float(a['scattered_read_bw_gbs']):g}; "
                         f"{pct(a['frac_read_bw'])})", f(g["ms"] if g else None, 3), f(dense["ms"], 3),
                         ratio(a["speedup_vs_dense_sdpa"], 1)])
    out += table(["head_dim", "context", "selected", "accel sparse ms (all caches cold)",
                  "GB/s (% of same-rows read GB/s; % of streaming read)", "torch gather+SDPA ms", "dense SDPA ms",
                  "speed-up vs dense SDPA"], rows)
    pre = [r for r in load("sparse.csv") if r["op"] == "prefill"]
    out += table(["prefill", "context", "head_dim", "tokens per head (sink + window)", "seconds",
                  "speed-up (median round)", "speed-up, every round"],
                 [[r["provider"], r["context"], r["head_dim"], r["selected"], f(float(r["ms"]) / 1000, 3),
                   ratio(r["speedup_vs_dense_sdpa"]),
                   r.get("speedup_all_runs") or "-" if r["provider"] != "torch_sdpa_causal_dense" else "-"]
                  for r in pre])
    out += sources("sparse.csv")
    return out


def sec_linear() -> list[str]:
    by = {}
    for r in load("linear.csv"):
        by.setdefault((r["op"], r["in"], r["out"], int(r["rows"])), {})[r["provider"]] = r
    rows = []
    for (op, i, o, m), p in by.items():
        a, t = p["accel_cpp"], p["torch_linear"]
        rows.append([f"{op} ({i}→{o})", m, f(a["gbs"]), f(t["gbs"]), pct(a["frac_read_bw"]), ratio(a["speedup_vs_torch"])])
    out = ["## Decode linear (GEMV) kernel alone", "",
           "SmolLM2-135M's weight shapes, one thread; rows = sequences in the batch.", ""]
    out += table(["op", "rows", "accel GB/s", "torch GB/s", "accel % of read bw", "speed-up"], rows)
    return out + sources("linear.csv")


def _speed_table(names, held=False, rel_dense=True) -> list[str]:
    rows = []
    for n in names:
        for r in load(n):
            rows.append([display(r["policy"]), r["batch"], r["context"], f(r["decode_step_ms"], 1), f(r["decode_tok_s"]),
                         ratio(r["speedup_vs_hf"]), ratio(r["speedup_vs_accel_dense"]) if rel_dense else "-",
                         f(r.get("kv_read_per_step_mb"), 1), f(r["kv_held_mb"], 1)])
    return table(["policy", "batch", "context", "step ms", "tokens/s", "vs HF", "vs accel dense",
                  "KV MB read per step", "KV MB held"], rows)


def _reuse_quality() -> Quality:
    q = Quality()
    relabel_reuse = {"hf": "hf", "dense": "dense", "delta": "delta (paper layout)", "hylra": "hylra (first plan)",
                     "recycled": "recycled"}
    for n in ("eval_reuse_smollm2.csv", "eval_reuse_smollm2_8k.csv", "eval_reuse_smollm2_lm.csv"):
        q.add(n, lambda p: relabel_reuse.get(p))
    for n in ("eval_delta_smollm2.csv", "eval_delta_smollm2_8k.csv", "eval_delta_smollm2_lm.csv"):
        q.add(n, lambda p: "delta (calibrated layout)" if p == "delta" else None)
    for n in ("eval_hylra_smollm2.csv", "eval_hylra_smollm2_8k.csv", "eval_hylra_smollm2_lm.csv"):
        q.add(n, lambda p: "hylra (current plan)" if p == "hylra" else None)
    for n in QUEST_EVAL:
        q.add(n, quest_label)
    q.add(QUEST_AGG, lambda p: f"quest (query heads by {p.split('=')[1]})" if p in ("quest@agg=mean", "quest@agg=sum")
          else None)
    for n in QUEST_NONE:
        q.add(n, quest_label)
    q.add(SPARSE_8K, quest_label)
    for n in ("eval_hip_smollm2_2k.csv", "eval_hip_smollm2_4k.csv", "eval_hip_smollm2_4k_lm.csv",
              "eval_hip_smollm2_8k.csv"):
        q.add(n, lambda p: "hip" if p == "hip" else None)
    q.add(HIP_REPKEYS, lambda p: HIP_REPKEYS_LABELS.get(p))
    return q


HIP_REPKEYS = "eval_hip_repkeys_smollm2_2k.csv"  # HiP children scored by several keys (the run also holds dense, hip)
HIP_REPKEYS_LABELS = {"hip@rep_keys=4": "hip (4 middle keys per child)", "hip@rep_keys=16": "hip (16 middle keys per child)",
                      "hip@representative=first@rep_keys=4": "hip (first 4 keys per child)"}
# HiP's branch estimate and its refresh against the exhaustive search, NIAH at 2K (the runs share the samples)
HIP_REFRESH = "eval_hip_refresh_smollm2_2k.csv"
HIP_GEMMA = "eval_hip_gemma3_2k.csv"
HIP_SPEED = "decode_hip_refresh_smollm2_b1.csv"  # after the search's touch pass and selection (2026-12-07)
HIP_SPEED_B8 = "decode_hip_smollm2_b8.csv"
HIP_SEARCHES = {"": "one middle key per child (default)", "rep_keys=4": "4 middle keys per child",
                "rep_keys=16": "16 middle keys per child", "representative=max": "every key of the child (exhaustive)"}
HIP_SCHEDULES = {"": "full search every 8 steps, 2 finest levels refined between (default)",
                 "refresh=1": "full search every step", "refine_levels=3": "full search every 8 steps, 3 finest levels refined between"}


def _hip_split(p: str):
    """(search key, schedule key) of a hip policy spec, or None for other policies."""
    parts = p.split("@")
    if parts[0] != "hip":
        return None
    sched = [x for x in parts[1:] if x.split("=")[0] in ("refresh", "refine_levels")]
    search = [x for x in parts[1:] if x not in sched]
    return "@".join(search), "@".join(sched)


def _hip_estimate() -> list[str]:
    cells: dict = {}
    for n in ("eval_hip_smollm2_2k.csv", HIP_REPKEYS, HIP_REFRESH):
        for r in load(n):
            k = _hip_split(r["policy"])
            if k is None and r["policy"] in ("hf", "dense"):
                k = ("dense", "")
            if r["task"] == "niah" and int(r["context"]) == 2048 and k is not None:
                v = f"{round(float(r['accuracy']) * int(r['n']))}/{r['n']}"
                if cells.get(k, v) != v:  # a row in two runs (dense, the default): the same samples, the same count
                    raise SystemExit(f"make_results: {r['policy']} NIAH at 2K is {v} in {n}, {cells[k]} elsewhere")
                cells[k] = v
    dense = cells.pop(("dense", ""))
    rows = [[HIP_SEARCHES[sk]] + [cells.get((sk, sc), "-") for sc in HIP_SCHEDULES] for sk in HIP_SEARCHES]
    out = ["### HiP: its branch estimate and its refresh against the exhaustive search", "",
           f"NIAH at 2K, 20 samples (dense {dense}, the same samples), top-k 1/8: each child scored by its middle key "
           "(the default), by several keys around it, or by every key (`representative=max`: the search then returns "
           "the exact top key blocks), with the mask searched every 8 steps (the default) or at every step. The "
           "exhaustive rows run the torch search (not timed here); the others the C++ one.", ""]
    out += table(["children scored by"] + list(HIP_SCHEDULES.values()), rows)
    out += sources("eval_hip_smollm2_2k.csv", HIP_REPKEYS, HIP_REFRESH)
    out += ["What a step costs at 8K (real prefill, batch 1, fp32, after the search's touch pass and selection; the "
            "grid three times, interleaved, the median run), the default against 16 keys per child searched at every "
            "step (the row that reaches dense's NIAH above); hip's KV MB read include the key rows its search scored:",
            ""]
    out += _speed_table([HIP_SPEED])
    out += sources(HIP_SPEED)
    out += ["The same at 4K, batch 8 (every row the same prompt), one run:", ""]
    out += _speed_table([HIP_SPEED_B8])
    out += sources(HIP_SPEED_B8)
    g = {r["policy"]: f"{round(float(r['accuracy']) * int(r['n']))}/{r['n']}" for r in load(HIP_GEMMA)
         if r["task"] == "niah"}
    out += ["The same on Gemma-3-270m (its global layers; the sliding-window layers decode densely), NIAH at 2K:", ""]
    out += table(["policy", "niah"], [[display(p), g[p]] for p in sorted(g, key=lambda p: (p != "hf", p))])
    return out + sources(HIP_GEMMA)


ONE_SET = "one page set per KV head"  # quest agg="max": the former default
QUEST_SHARED = f"quest ({ONE_SET})"
REUSE_ORDER = ["hf", "dense", "delta (paper layout)", "delta (calibrated layout)", "hylra (first plan)",
               "hylra (current plan)", "recycled", "quest", QUEST_SHARED, f"quest (pages of 2, {ONE_SET})",
               f"quest (pages of 8, {ONE_SET})", f"quest (pages of 16, {ONE_SET})",
               "quest (query heads by mean)", "quest (query heads by sum)", "hip", *HIP_REPKEYS_LABELS.values()]
# the default quest (every query head its own pages, agg="none") and the former default (agg="max") in one run per
# length (the runs also hold dense and hf, taken from their own files)
QUEST_NONE = ("eval_quest_none_smollm2_2k.csv", "eval_quest_none_smollm2_4k.csv", "eval_quest_none_smollm2_4k_lm.csv",
              "eval_quest_none_smollm2_8k.csv")
QUEST_AGG = "eval_quest_agg_smollm2_4k.csv"  # GQA aggregation of a KV head's query heads' page bounds
QUEST_EVAL = ("eval_quest_smollm2_2k.csv", "eval_quest_smollm2_4k.csv", "eval_quest_smollm2_4k_lm.csv",
              "eval_quest_pages_smollm2_8k.csv")


def quest_label(p: str):
    """quest's rows under one name per page size and aggregation: the default (every query head its own pages, pages
    of 4) is "quest", ``agg=max`` (one page set per KV head, from the group's largest bound) QUEST_SHARED, other page
    sizes "quest (pages of N[, one page set per KV head])"; other variants, dense and hf: None (their own rows)."""
    opts = dict(x.split("=", 1) for x in p.split("@")[1:]) if p.split("@")[0] == "quest" else None
    if opts is None or set(opts) - {"page_size", "agg"} or opts.get("agg", "none") not in ("none", "max"):
        return None
    pages, shared = opts.get("page_size", "4"), opts.get("agg") == "max"
    if pages == "4":
        return QUEST_SHARED if shared else "quest"
    return f"quest (pages of {pages}, {ONE_SET})" if shared else f"quest (pages of {pages})"


def sec_reuse() -> list[str]:
    q = _reuse_quality()
    tasks = ["passkey", "niah", "ruler_niah_single_1"]
    rows = []
    for c in sorted({k[1] for k in q.acc}):
        for p in REUSE_ORDER:
            v = q.lm.get((p, c))
            if p.startswith(("quest (", "hip (")) and v is None and not any(k[:2] == (p, c) for k in q.acc):
                continue  # a variant shows only where it was measured
            rows.append([display(p), c] + [q.cell(p, c, t, slack=1) for t in tasks]
                        + [q.ppl(p, c), f(v[1], 3) if v and v[1] is not None else "-"])
    out = ["## Sparse-attention policies: hylra, delta, recycled, quest, hip", "",
           "### Quality on SmolLM2-135M", "",
           "Default top-k, plain prompts, the same samples for every policy (seed "
           f"{_one(load('eval_reuse_smollm2.csv'), 'seed')}; the sample count is the n of each k/n cell); perplexity "
           f"from {_one(load('eval_reuse_smollm2_lm.csv'), 'n')} samples of teacher-forced tokens after the prefix. "
           "✓ = within one sample of dense. "
           "\"first plan\" is the HyLRA plan shipped before the retrieval-aware calibration; \"paper layout\" is DELTA's "
           "layer layout scaled to the model's depth (see [hylra](methods/hylra.md) and [delta](methods/delta.md)).", ""]
    out += table(["policy", "context"] + tasks + ["perplexity (vs dense)", "top-1 agree"], rows)
    out += sources("eval_reuse_smollm2.csv", "eval_reuse_smollm2_8k.csv", "eval_reuse_smollm2_lm.csv",
                   "eval_hylra_smollm2.csv", "eval_hylra_smollm2_8k.csv", "eval_hylra_smollm2_lm.csv",
                   "eval_delta_smollm2.csv", "eval_delta_smollm2_8k.csv", "eval_delta_smollm2_lm.csv",
                   *QUEST_EVAL, QUEST_AGG, *QUEST_NONE, SPARSE_8K,
                   "eval_hip_smollm2_2k.csv", "eval_hip_smollm2_4k.csv", "eval_hip_smollm2_4k_lm.csv",
                   "eval_hip_smollm2_8k.csv", HIP_REPKEYS)
    q6 = Quality().add("eval_hylra_smollm2_4k_lm6.csv")
    out += ["### hylra perplexity at 4K on 6 samples", ""]
    out += table(["policy", "context", "samples", "perplexity (vs dense)", "top-1 agree"],
                 [[display(p), c, q6.lm[(p, c)][2], q6.ppl(p, c), f(q6.lm[(p, c)][1], 3)]
                  for p, c in sorted(q6.lm, key=lambda k: policy_order(k[0]))])
    out += sources("eval_hylra_smollm2_4k_lm6.csv")
    qr = Quality().add("eval_recycled_threshold_smollm2_4k_lm.csv")
    out += ["### Recycled Attention: perplexity against its drift threshold", "",
            "`recycled` without options runs the default threshold.", ""]
    out += table(["policy", "context", "perplexity (vs dense)", "top-1 agree"],
                 [[display(p), c, qr.ppl(p, c), f(qr.lm[(p, c)][1], 3)] for p, c in sorted(qr.lm, key=lambda k: policy_order(k[0]))])
    out += sources("eval_recycled_threshold_smollm2_4k_lm.csv")
    out += ["### Decode speed", "",
            "Synthetic KV, fp32, one run each; batch 1 at 8K and batch 8 at 4K. \"KV MB read per step\" is "
            "what each policy's attention read; \"KV MB held\" what the cache holds.", "",
            "On the AVX2-only machine with the current small-M linear kernel:", ""]
    out += _speed_table(["decode_reuse_smollm2_b1_s12.csv", "decode_reuse_smollm2_b8_s12.csv"])
    out += sources("decode_reuse_smollm2_b1_s12.csv", "decode_reuse_smollm2_b8_s12.csv")
    out += ["Real 8K prefill (not synthetic KV), batch 1, fp32: quest with one page set per KV head (`agg=max`, the "
            "default until 2026-12-06; pages of 4, and of 16) against hylra and dense, one run:", ""]
    out += _speed_table(["decode_quest_smollm2_b1.csv"])
    out += sources("decode_quest_smollm2_b1.csv")
    out += ["quest (every query head selects its own pages and a group reads their union once, the paper's selection "
            "and the default) against one page set per KV head (`quest@agg=max`) and dense, real 8K prefill, batch 1, "
            "fp32, one run, on another machine (an Intel Xeon with AVX-512, against the AMD EPYC of the table above), "
            "and the same at 4K, batch 8, each row of the batch its own passage of the essays "
            "(`--prompts distinct`):", ""]
    out += _speed_table(["decode_quest_none_smollm2_b1.csv", "decode_quest_smollm2_b8.csv"])
    out += sources("decode_quest_none_smollm2_b1.csv", "decode_quest_smollm2_b8.csv")
    out += ["The same in bf16 (a bf16 copy of the model), with bfloat16 page summaries "
            "(`quest@summary_dtype=bfloat16`), one run:", ""]
    out += _speed_table(["decode_quest_smollm2_b1_bf16.csv"])
    out += sources("decode_quest_smollm2_b1_bf16.csv")
    out += ["Real 8K prefill, batch 1: hip (one middle key per child, and 4 or 16: `hip@rep_keys=N`) against quest "
            "and dense, one run on the Intel Xeon machine, before the search's touch pass and selection (the current "
            "figures close this section); hip's KV MB read include the key rows its search scored:", ""]
    out += _speed_table(["decode_hip_smollm2_b1.csv"])
    out += sources("decode_hip_smollm2_b1.csv")
    out += ["Real 4K prefill, batch 8 (every row the same prompt), on the AVX-512 machine, one run: hip, quest with "
            "pages of 16 and one page set per KV head, and tca with the plan shipped before 2026-12-06 (hip's KV MB "
            "count the attended rows only, not the search's):", ""]
    out += _speed_table(["decode_sparse_smollm2_b8.csv"])
    out += sources("decode_sparse_smollm2_b8.csv")
    out += ["The same batch-8 run on a build of the previous small-M linear kernel:", ""]
    out += _speed_table(["decode_reuse_smollm2_b8_s12_oldlinear.csv"])
    out += sources("decode_reuse_smollm2_b8_s12_oldlinear.csv")
    out += ["On the AVX-512 machine, the current hylra plan and hylra over a snapkv-compressed cache:", ""]
    out += _speed_table(["decode_hylra_smollm2_b1.csv", "decode_hylra_smollm2_b8.csv"])
    out += sources("decode_hylra_smollm2_b1.csv", "decode_hylra_smollm2_b8.csv")
    out += ["On the AVX-512 machine, delta with its calibrated layout:", ""]
    out += _speed_table(["decode_delta_smollm2_b1.csv", "decode_delta_smollm2_b8.csv"])
    out += sources("decode_delta_smollm2_b1.csv", "decode_delta_smollm2_b8.csv")
    out += ["On the AVX-512 machine, with the first hylra plan and delta's paper layout:", ""]
    out += _speed_table(["decode_reuse_smollm2_b1.csv", "decode_reuse_smollm2_b8.csv"])
    out += sources("decode_reuse_smollm2_b1.csv", "decode_reuse_smollm2_b8.csv")
    out += _hip_estimate()
    return out


#: CSVs of the KV-compression table, oldest first: a later file's row replaces an earlier one's for the same policy,
#: context and task (the duo rows of the early files are earlier duo plans / defaults)
KV_EVAL = ["eval_kv_smollm2_4k_25.csv", "eval_kv_smollm2_4k_25b.csv", "eval_kv_smollm2_4k_50.csv",
           "eval_kv_smollm2_4k_10.csv", "eval_kv_smollm2_4k_25_ruler.csv", "eval_kv_smollm2_4k_ruler_50_10.csv",
           "eval_kv_smollm2_8k_25.csv", "eval_kv_smollm2_8k_50_10.csv", "eval_kv_smollm2_8k_25_duo.csv",
           "eval_kv_smollm2_4k_duo_default.csv", "eval_kv_smollm2_4k_duo_default_ruler.csv",
           "eval_kv_smollm2_8k_duo_50_10.csv", "eval_kv_smollm2_8k_ruler.csv", "eval_kv_smollm2_4k_base_50.csv",
           "eval_kv_smollm2_4k_base_ruler.csv", "eval_kv_smollm2_8k_base_passkey.csv",
           "eval_kv_smollm2_8k_base_niah_50.csv", "eval_kv_smollm2_8k_base_niah_25.csv",
           "eval_kv_smollm2_8k_base_niah_10.csv", "eval_kv_smollm2_8k_base_ruler_a.csv",
           "eval_kv_smollm2_8k_base_ruler_b.csv"]
KV_LM = ["eval_kv_smollm2_lm.csv", "eval_kv_smollm2_4k_lm_50_10.csv", "eval_kv_smollm2_4k_duo_default_lm.csv",
         "eval_kv_smollm2_4k_base_lm.csv", "eval_kv_smollm2_8k_lm.csv", "eval_kv_smollm2_8k_base_lm.csv"]
KV_SPEED = {1: "decode_kv_smollm2_b1_budgets.csv", 8: "decode_kv_smollm2_b8_budgets.csv"}
KV_TASKS = [("passkey", "passkey"), ("niah", "NIAH"), ("ruler_niah_single_1", "RULER")]


def kv_quality() -> Quality:
    q = Quality()
    for n in KV_EVAL + KV_LM:
        q.add(n, drop_option)
    return q


def kv_speed() -> dict:
    return {(drop_option(r["policy"]), b): r for b, n in KV_SPEED.items() for r in load(n)}


def _context_rows(q: "Quality", tasks: list[str], first=("dense",)) -> list[list]:
    """One row per context and policy measured there (``first`` policies leading, then by name): each task's k/n
    with ✓ / ✗ within one sample of dense, and the perplexity."""
    pols = sorted({k[0] for k in q.acc if k[0] != "hf"}, key=lambda p: ([p != f for f in first], p))
    rows = []
    for c in sorted({k[1] for k in q.acc} | {k[1] for k in q.lm}):
        for p in pols:
            if not any(k[0] == p and k[1] == c for k in list(q.acc) + list(q.lm)):
                continue
            rows.append([display(p), c] + [q.cell(p, c, t, slack=1) if (p, c, t) in q.acc else "-" for t in tasks]
                        + [q.ppl(p, c) if (p, c) in q.lm else "-"])
    return rows


TCA_EVAL = ("eval_tca_smollm2_2k.csv", "eval_tca_smollm2_4k.csv", "eval_tca_smollm2_4k_lm.csv",
            "eval_tca_smollm2_8k.csv")
TCA_SPEED = ("decode_tca_smollm2_b1.csv", "decode_tca_smollm2_b8.csv")


def sec_tca() -> list[str]:
    q = Quality()
    for n in TCA_EVAL:
        q.add(n)
    tasks = ["passkey", "niah", "ruler_niah_single_1"]
    rows = _context_rows(q, tasks)
    out = ["## TCA-Attention: calibrated per-head quotas", "",
           "The shipped SmolLM2-135M plan (`accel plan --policy tca`; quotas in "
           "[plan_smollm2-135m_tca.png](../bench/results/plan_smollm2-135m_tca.png)): each key scored against the "
           "window after its block, tolerance 0.37, blocks keep 47% of their tokens; `tca@tolerance=0.25` re-picks "
           "the same plan's quotas (64%). Default options, the same samples as the other policies. ✓ = within one "
           "sample of dense.", ""]
    out += table(["policy", "context"] + tasks + ["perplexity (vs dense)"], rows)
    out += sources(*TCA_EVAL)
    out += ["Decode after a real prefill, one run each (\"KV MB held\": the cache's kept bytes; at batch 8 every row "
            "its own prompt, `--prompts distinct`):", ""]
    out += _speed_table(list(TCA_SPEED))
    out += sources(*TCA_SPEED)
    return out


FLUX_EVAL = ("eval_flux_smollm2_2k.csv", "eval_flux_smollm2_4k.csv", "eval_flux_smollm2_4k_lm.csv")
FLUX_SPEED = ("decode_flux_smollm2_b1.csv", "decode_flux_smollm2_b8.csv")
FLUX_DISTINCT = "decode_flux_smollm2_b8_distinct.csv"  # rows routed differently: the mixed-route path
# the quest backend with pages of 4 (the quest policy's default) and per-query-head pages; one policy per run, the
# runs' HF rows equal the committed dense ones
FLUX_PAGES = ("eval_flux_pages4_smollm2_4k.csv", "eval_flux_pages4_none_smollm2_4k.csv")
SPARSE_8K = "eval_sparse_smollm2_8k.csv"
# 60 samples per task at 2K: flux and hylra in one run, the pages-of-4 backend in another (the same samples; each
# run's HF row is the same unpatched model on them)
FLUX_60 = ("eval_flux_hylra_smollm2_2k_60.csv", "eval_flux_pages4_smollm2_2k_60.csv")
FLUX_HELDOUT = "flux_router_heldout.csv"


def paired_answers(names, task: str) -> dict:
    """{policy: {sample idx: answered}} of ``task`` from the per-sample CSVs of runs on the same samples."""
    out: dict = {}
    for n in names:
        for r in load(n.replace(".csv", "_samples.csv")):
            if r["task"] == task:
                d, k = out.setdefault(r["policy"], {}), (r["target_len"], r["idx"])
                ok = float(r["score"]) >= 1
                if d.get(k, ok) != ok:  # a policy in two runs (the HF baseline): the same samples, the same answers
                    raise SystemExit(f"make_results: {r['policy']} answers {task} sample {k} differently in {n}; the "
                                     "paired runs must share their samples")
                d[k] = ok
    return out


def _flux_60() -> list[str]:
    tasks = ("passkey", "niah")
    ans = {t: paired_answers(FLUX_60, t) for t in tasks}
    pols = ["hf", "hylra"] + sorted({p for t in tasks for p in ans[t]} - {"hf", "hylra"})

    def vs(t, p, ref):
        a, b = ans[t].get(p), ans[t].get(ref)
        if a is None or b is None or p == ref:
            return "-"
        return f"+{sum(a[s] and not b[s] for s in a)} / -{sum(b[s] and not a[s] for s in a)}"

    rows = []
    for p in pols:
        row = [display(p)]
        for t in tasks:
            a = ans[t].get(p)
            row.append(f"{sum(a.values())}/{len(a)}" if a else "-")
        for t in tasks:
            row += [vs(t, p, "hf") if p != "hf" else "-", vs(t, p, "hylra") if p not in ("hf", "hylra") else "-"]
        rows.append(row)
    out = ["### flux against hylra on 60 samples at 2K", "",
           "The same comparison on three times the samples (passkey and NIAH at 2K, seed 0, so the first 20 are the "
           "table's above), with each policy's answers paired sample by sample: \"+a / -b\" counts the samples only "
           "the policy answers (a) and only the reference answers (b). The pages-of-4 rows ran passkey only.", ""]
    out += table(["policy", "passkey", "niah", "passkey vs dense (HF unpatched)", "passkey vs hylra",
                  "niah vs dense (HF unpatched)", "niah vs hylra"], rows)
    return out + sources(*FLUX_60)


def sec_flux() -> list[str]:
    q = Quality()
    for n in FLUX_EVAL:
        q.add(n)
    for n in FLUX_PAGES:
        q.add(n, lambda p: None if p == "hf" else p)
    tasks = ["passkey", "niah", "ruler_niah_single_1"]
    rows = _context_rows(q, tasks, first=("dense", "hylra"))
    out = ["## Flux Attention: a trained layer router", "",
           "The shipped SmolLM2-135M router (`accel plan --policy flux`; per-layer training labels in "
           "[plan_smollm2-135m_flux.png](../bench/results/plan_smollm2-135m_flux.png)) at its default full-layer ratio "
           "of 1/3 (10 of 30 layers full per request) and an SA budget of 1/8 of the context, next to hylra's shipped "
           "plan (10 full layers) and duo at 1/8, the same samples. `flux@routing=static`: the same 10 layers for every "
           "request (the router's training order, no context). `flux@page_size=4` (`@agg=none`): the quest backend "
           "with the quest policy's pages of 4 (and every query head selecting its own pages), separate runs on the "
           "Intel Xeon machine on the same samples. ✓ = within one sample of dense.", ""]
    out += table(["policy", "context"] + tasks + ["perplexity (vs dense)"], rows)
    out += sources(*FLUX_EVAL, *FLUX_PAGES)
    out += _flux_60()
    out += ["Decode after a real prefill, one run each (\"KV MB read per step\": the runtime's own count):", ""]
    out += _speed_table(list(FLUX_SPEED))
    out += sources(*FLUX_SPEED)
    out += ["Batch 8 with every row its own prompt (`accel bench --prompts distinct`: a passage each from a different "
            "part of the essays), on the Intel Xeon machine, one run. The router routed the rows differently on 11 of "
            "the 30 layers (checked on the same prompts), so no step ran in the one-call C++ stack: the layers ran one "
            "by one, the rows of a mixed layer in one sparse call with the full-attention rows selecting every "
            "position.", ""]
    out += _speed_table([FLUX_DISTINCT])
    out += sources(FLUX_DISTINCT)
    out += ["The shipped router on 12 requests it never saw (the trainer's request series continued): the KL of the "
            "next-token distribution summed over the layers each rule sends to sparse attention at 10 full layers "
            "(lower is better), the router's rank correlation with the labels, and how many of its 10 full layers per "
            "request differ from the static order's:", ""]
    out += table(["backend", "requests", "router", "static order", "oracle", "random", "rank corr.", "layers off static"],
                 [[r["backend"], r["requests"], r["kl_router"], r["kl_static"], r["kl_oracle"], r["kl_random"],
                   r["spearman"], r["layers_off_static_per_request"]] for r in load(FLUX_HELDOUT)])
    out += sources(FLUX_HELDOUT)
    q8 = Quality()
    q8.add(SPARSE_8K)
    pols = sorted({k[0] for k in q8.acc if k[0] != "hf"}, key=lambda p: (p != "dense", p))
    out += ["### The sparse-attention policies at 8K", "",
            "Each policy at its default budget (1/8 of the context; tca: its shipped quotas; duo at 1/8), the same "
            "samples, one run. ✓ = within one sample of dense.", ""]
    out += table(["policy"] + tasks, [[display(p)] + [q8.cell(p, 8192, t, slack=1) for t in tasks] for p in pols])
    out += sources(SPARSE_8K)
    return out


def sec_kv() -> list[str]:
    q, speed = kv_quality(), kv_speed()
    pols = sorted({k[0] for k in q.acc} | {k[0] for k in q.lm} | {k[0] for k in speed}, key=policy_order)
    pols = [p for p in pols if p.count("@") <= 1]  # variants with more options are in the duo section
    ctxs = sorted({k[1] for k in q.acc})
    head, rows = [], []
    for c in ctxs:
        head += [f"{c // 1024}K {lab}" for _, lab in KV_TASKS] + [f"{c // 1024}K ppl"]
    head += ["b1 tok/s (vs dense)", "b8 tok/s (vs dense)", "KV held (of dense)"]
    for p in pols:
        cells = []
        for c in ctxs:
            cells += [q.cell(p, c, t, slack=2) for t, _ in KV_TASKS] + [q.ppl(p, c)]
        for b in (1, 8):
            r, d = speed.get((p, b)), speed.get(("dense", b))
            cells.append("-" if r is None else f"{float(r['decode_tok_s']):.1f} ({float(r['decode_tok_s']) / float(d['decode_tok_s']):.2f}x)")
        r, d = speed.get((p, 1)), speed.get(("dense", 1))
        cells.append("-" if r is None else f"{100 * float(r['kv_held_mb']) / float(d['kv_held_mb']):.1f}%")
        rows.append([display(p)] + cells)
    out = ["## KV-cache compression by budget", "",
           "### Quality, speed and bytes at 50%, 25% and 10%, 4K and 8K", "",
           "One row per policy and budget with the current defaults. Quality: `accel eval`, one run each, the same "
           f"samples for every policy in a column (seed {_one([r for n in KV_EVAL for r in load(n)], 'seed')}; the "
           "sample count is the n of each k/n cell); RULER is `ruler_niah_single_1`; perplexity from "
           f"{_one([r for n in KV_LM for r in load(n)], 'n')} samples of teacher-forced tokens after the prefix. "
           "✓ = within two samples of "
           "dense; `-` = not measured. Speed: `accel bench --synthetic-kv` (the random cache is compressed with each "
           "policy's own budgets), batch 1 at 8K and batch 8 at 4K. \"KV held\" is what the cache reports at batch 1 / 8K "
           "against dense. MoA's `max_new_tokens` option (which sizes its caches per task) is left out of the labels. "
           "Where several CSVs measured the same policy, context and task, the newest is shown.", ""]
    out += table(["policy"] + head, rows)
    out += sources(*KV_EVAL, *KV_LM, *KV_SPEED.values())

    out += ["### Decode speed and bytes per budget", ""]
    for b, n in KV_SPEED.items():
        rs = sorted(load(n), key=lambda r: policy_order(r["policy"]))
        out += table(["policy", "batch", "context", "step ms", "tokens/s", "vs HF", "vs accel dense", "KV MB read per step", "KV MB held"],
                     [[display(r["policy"]), r["batch"], r["context"], f(r["decode_step_ms"], 1), f(r["decode_tok_s"]),
                       ratio(r["speedup_vs_hf"]), ratio(r["speedup_vs_accel_dense"]), f(r["kv_read_per_step_mb"], 1),
                       f(r["kv_held_mb"], 1)] for r in rs])
    out += sources(*KV_SPEED.values())
    out += ["An earlier run at 25% only, on the AVX-512 machine (duo with the plan of that time):", ""]
    out += _speed_table(["decode_kv_smollm2_b1.csv", "decode_kv_smollm2_b8.csv"])
    out += sources("decode_kv_smollm2_b1.csv", "decode_kv_smollm2_b8.csv")

    rows = []
    lg = load("kv_long_generation.csv")
    for p in sorted({r["policy"] for r in lg}, key=policy_order):
        rs = sorted((r for r in lg if r["policy"] == p), key=lambda r: int(r["step"]))
        a, z = rs[0], rs[-1]
        alloc = sorted({r["kv_allocated_mb"] for r in rs}, key=float)
        rows.append([display(p), a["context"], f"{float(a['kv_held_mb']):.2f} @ {a['step']}",
                     f"{float(z['kv_held_mb']):.2f} @ {z['step']}",
                     " → ".join(f"{float(x):.2f}" for x in alloc)])
    out += ["### Long generation at constant size", "",
            "A real prompt, generation forced to the full length, cache bytes reported at regular steps. "
            "\"allocated\" lists the distinct values seen (one value = no growth, no re-allocation).", ""]
    out += table(["policy", "prompt tokens", "KV held MB @ step", "KV held MB @ last step", "KV allocated MB"], rows)
    out += ["![KV bytes during a long generation](../bench/results/kv_long_generation.png)", ""]
    out += sources("kv_long_generation.csv")
    return out


def _acc_table(names, tasks, label=lambda p: p) -> list[str]:
    q = Quality()
    for n in names:
        q.add(n, label)
    ctx = sorted({k[1] for k in q.acc})
    pols = sorted({k[0] for k in q.acc}, key=policy_order)
    head = [f"{c // 1024}K {t}" for c in ctx for t in tasks if any(k[1] == c and k[2] == t for k in q.acc)]
    cols = [(c, t) for c in ctx for t in tasks if any(k[1] == c and k[2] == t for k in q.acc)]
    return table(["policy"] + head, [[display(p)] + [q.cell(p, c, t) for c, t in cols] for p in pols])


def sec_duo() -> list[str]:
    out = ["### How duo's defaults were chosen", "",
           "Budget 25% throughout. The duo rows of these CSVs are the plan or defaults named above each table; a `duo@...` label "
           "without options means the default of the day, not today's (see [duo](methods/duo.md)).", "",
           "Head plan scored by relative output error (duo row of this CSV; the other rows are the current policies):", ""]
    out += _acc_table(["eval_kv_smollm2_4k_25.csv"], ["passkey", "niah"], lambda p: p if p in ("hf", "dense") or p.startswith("duo") else None)
    out += sources("eval_kv_smollm2_4k_25.csv")
    out += ["Head plan scored by the error written into the residual stream:", ""]
    out += _acc_table(["eval_kv_smollm2_4k_25_duo.csv"], ["passkey", "niah"])
    out += sources("eval_kv_smollm2_4k_25_duo.csv")
    out += ["Head plan scored by attention mass outside the streaming window (the shipped plan), streaming heads "
            "of sinks + recent tokens as published:", ""]
    out += _acc_table(["eval_kv_smollm2_4k_duo.csv"], ["passkey", "niah"])
    out += sources("eval_kv_smollm2_4k_duo.csv")
    out += ["Smaller published-style streaming windows (no middle tokens):", ""]
    out += _acc_table(["eval_kv_smollm2_4k_25_duo_windows.csv"], ["passkey", "niah"])
    out += sources("eval_kv_smollm2_4k_25_duo_windows.csv")
    out += ["Streaming heads with SnapKV-scored middle tokens against the published form (which row the default "
            "`stream_share` corresponds to is explained on the duo page):", ""]
    out += _acc_table(["eval_kv_smollm2_4k_25_duo_middle.csv"], ["passkey", "niah"])
    out += sources("eval_kv_smollm2_4k_25_duo_middle.csv")
    out += ["The same comparison at 8K (plain `duo@budget_ratio=0.25` is the current default):", ""]
    out += _acc_table(["eval_kv_smollm2_8k_25_duo.csv"], ["passkey", "niah"])
    out += sources("eval_kv_smollm2_8k_25_duo.csv")
    out += ["On fresh samples (seed 1; the default was chosen on seed 0):", ""]
    out += _acc_table(["eval_kv_smollm2_4k_25_seed1.csv"], ["passkey", "niah"])
    out += sources("eval_kv_smollm2_4k_25_seed1.csv")
    return out


def sec_vlm() -> list[str]:
    cur = load("vlm_digits_curve.csv")
    pols = list(dict.fromkeys(r["policy"] for r in cur))
    keeps = sorted({int(r["keep"]) for r in cur}, reverse=True)
    acc = {(r["policy"], int(r["keep"])): r for r in cur}
    out = ["## Visual-token pruning", "",
           f"### Accuracy against kept visual tokens, {cur[0]['model']}", "",
           f"Not a published VLM: the project-trained digits VLM (see [fastervlm](methods/fastervlm.md)). "
           f"{cur[0]['samples']} held-out digits, first answer token, one run.", ""]
    out += table([f"kept of {cur[0]['tokens']}"] + pols, [[k] + [f(acc[(p, k)]["accuracy"], 3) if (p, k) in acc else "-" for p in pols] for k in keeps])
    out += ["![accuracy vs kept tokens](../bench/results/vlm_digits_curve.png)", ""]
    out += sources("vlm_digits_curve.csv")
    kod = load("vlm_digits_kept_on_digit.csv")
    kk = sorted({int(r["keep"]) for r in kod}, reverse=True)
    d = {(r["policy"], int(r["keep"])): r for r in kod}
    kp = list(dict.fromkeys(r["policy"] for r in kod))
    out += ["Share of the kept tokens that lie on the digit's patches "
            f"({kod[0]['images']} held-out images, {kod[0]['digit_patches_per_image']} digit patches per image on average):", ""]
    out += table(["kept"] + kp, [[k] + [pct(d[(p, k)]["on_digit_share"]) for p in kp] for k in kk])
    out += sources("vlm_digits_kept_on_digit.csv")
    n_all = next(r["keep"] for r in load("vlm_prefill_vitl.csv") if r["policy"].startswith("all"))
    out += [f"### Prefill at LLaVA-1.5's shape ({n_all} visual tokens)", "",
            "SmolLM2-135M with its real weights as the LLM, random vision weights, batch 1, fp32, median of repeated runs. \"LLM s\" is "
            "the time inside the language model; peak = peak CPU memory allocated during the forward.", ""]
    rows = []
    for n, tower in (("vlm_prefill_vitl.csv", "CLIP ViT-L/14-336 shape"), ("vlm_prefill_small.csv", "small")):
        for r in load(n):
            rows.append([tower, r["policy"], r["keep"], f(r["prefill_s"]), ratio(r["prefill_speedup"]), f(r["llm_s"], 3),
                         ratio(r["llm_speedup"]), f(r["peak_mb"], 1), f(r["kv_mb"], 1)])
    out += table(["tower", "policy", "kept", "VLM prefill s", "vs all", "LLM s", "vs all", "peak MB", "LLM KV MB"], rows)
    out += sources("vlm_prefill_vitl.csv", "vlm_prefill_small.csv")
    return out


CLUTTER_KEEP = 16  # the kept count the policy table quotes


def see_within_one_point():
    """SGL's early exit at the threshold with the most exits whose accuracy stays within 1 point of the large model
    alone (the row, and the large model's row)."""
    see = load("vlm_clutter_see.csv")
    base = next(r for r in see if r["setting"] == "large model alone")
    ok = [r for r in see if r["setting"] == "sgl" and float(r["accuracy"]) >= float(base["accuracy"]) - 0.01]
    return (max(ok, key=lambda r: (float(r["exit_rate"]), -float(r["threshold"]))) if ok else None), base


def sec_vlm_clutter() -> list[str]:
    cur = load("vlm_clutter_curve.csv")
    full = {r["policy"]: r for r in cur if r["policy"].endswith("all tokens")}
    pols = list(dict.fromkeys(r["policy"] for r in cur if not r["policy"].endswith("all tokens")))
    keeps = sorted({int(r["keep"]) for r in cur if not r["policy"].endswith("all tokens")}, reverse=True)
    acc = {(r["policy"], int(r["keep"])): r for r in cur}
    n_tok = cur[0]["tokens"]
    large, small = full["large model, all tokens"], full["small model, all tokens"]
    out = ["## Visual-token pruning on cluttered digits", "",
           f"### Accuracy against kept visual tokens, {cur[0]['model']}", "",
           "Not a published VLM: accel's project-trained pair (see [sgl](methods/sgl.md#the-project-trained-cluttered-digits-pair)). "
           "Four coloured digits per image, a question about one of them (by colour or position); only the asked "
           f"digit's 16 of the {n_tok} visual tokens hold the answer. {cur[0]['questions']} held-out questions, the "
           f"large model's first answer token, one run. All {n_tok} tokens: large model {f(large['accuracy'], 3)}, "
           f"small model {f(small['accuracy'], 3)} (chance 0.1). `sgl` is guided by the small model.", ""]
    out += table([f"kept of {n_tok}"] + pols,
                 [[k] + [f(acc[(p, k)]["accuracy"], 3) if (p, k) in acc else "-" for p in pols] for k in keeps])
    out += ["![accuracy vs kept tokens](../bench/results/vlm_clutter_curve.png)", ""]
    out += sources("vlm_clutter_curve.csv")
    on = load("vlm_clutter_on_target.csv")
    pol_rows = [r for r in on if not r.get("accuracy")]
    ref_rows = [r for r in on if r.get("accuracy")]
    out += ["Where the kept tokens lie: the share of them on the asked digit (its 16 tokens are 16% of the image), and "
            "the share of questions that keep two or more of the asked digit's tokens:", ""]
    out += table(["policy", "kept", "kept tokens on the asked digit", "questions keeping 2+ of its tokens",
                  "accuracy (above)"],
                 [[r["policy"], r["keep"], pct(r["on_asked_digit_share"]), pct(r["two_or_more_on_asked_digit"]),
                   f(acc[(r["policy"], int(r["keep"]))]["accuracy"], 3) if (r["policy"], int(r["keep"])) in acc else "-"]
                  for r in pol_rows])
    out += ["Where the large model reads the answer (the unpatched model fed only the marked image tokens, at their "
            "original positions):", ""]
    out += table(["image tokens fed", "accuracy"], [[r["policy"], f(r["accuracy"], 3)] for r in ref_rows])
    out += sources("vlm_clutter_on_target.csv")
    ceil = load("vlm_clutter_ceiling.csv")
    out += ["Does the question pick the digit? The VLMs (an answer that is not a digit counts as wrong) against a "
            "uniform pick among the image's four digits, and the frozen language models asked the same questions, "
            "zero-shot, with the image's four digits written out for them as text (colour, position and digit each), "
            "their choice among the ten digits:", ""]
    out += table(["answered by", "from", "accuracy", "by colour", "by position", "answer is a digit in the image"],
                 [[r["source"], r["input"] or "-", f(r["accuracy"], 3),
                   f(r["accuracy_colour"], 3) if r["accuracy_colour"] else "-",
                   f(r["accuracy_position"], 3) if r["accuracy_position"] else "-",
                   pct(r["answer_is_a_digit_in_the_image"])] for r in ceil])
    out += sources("vlm_clutter_ceiling.csv")
    tun = load("vlm_clutter_lm_tuning.csv")
    out += ["Training the language model too (stage C: low-rank adapters on its attention projections, after stage B "
            f"aligned the projector; the small model of the pair, {tun[0]['questions']} held-out questions). The last "
            "train loss is the mean of the last 10 steps of stage B for the frozen model and of stage C for the tuned "
            "one; training seconds: stages A and B for the frozen model, stage C alone for the tuned one:", ""]
    out += table(["model", "accuracy", "by colour", "by position", "uniform pick among four", "last train loss",
                  "train s"],
                 [[r["model"], f(r["accuracy"], 3), f(r["accuracy_colour"], 3), f(r["accuracy_position"], 3),
                   f(r["uniform_pick_among_four"], 3), f(r["train_loss_last"], 3), f(r["train_seconds"], 0)]
                  for r in tun])
    out += sources("vlm_clutter_lm_tuning.csv")
    see = load("vlm_clutter_see.csv")
    best, base = see_within_one_point()
    out += ["### SGL's early exit (SEE)", "",
            "The small model answers every question first; at a threshold, the questions whose answer it gave with at "
            "least that probability (its answer token's) take its answer and the large model does not run. Time per "
            "answer includes the small model. The pruning beside it keeps every token.", ""]
    out += table(["setting", "threshold", "answered by the small model", "accuracy", "ms per answer", "vs large alone"],
                 [[r["setting"], r["threshold"] or "-", pct(r["exit_rate"], 1), f(r["accuracy"], 3),
                   f(r["ms_per_answer"], 1), ratio(r["speedup"])] for r in see])
    if best is not None:
        out += [f"Within 1 point of the large model alone ({f(base['accuracy'], 3)}): threshold {best['threshold']}, "
                f"{pct(best['exit_rate'], 1)} of the questions answered by the small model alone, accuracy "
                f"{f(best['accuracy'], 3)}, {ratio(best['speedup'])} end to end.", ""]
    else:
        out += [f"No threshold measured keeps the accuracy within 1 point of the large model alone "
                f"({f(base['accuracy'], 3)}).", ""]
    out += ["![early exit](../bench/results/vlm_clutter_see.png)", ""]
    out += sources("vlm_clutter_see.csv")
    return out


def sec_cost_model() -> list[str]:
    chk = load("cost_model_check.csv")
    cal = load("cost_model_smollm2.csv")
    errs = [abs(float(r["error"])) for r in chk]
    within = sum(e <= 0.15 for e in errs)
    worst = max(chk, key=lambda r: abs(float(r["error"])))
    points = list(dict.fromkeys((int(r["batch"]), int(r["context"])) for r in chk))
    pols = list(dict.fromkeys(r["policy"] for r in chk))
    by = {(r["policy"], int(r["batch"]), int(r["context"])): r for r in chk}
    # the calibration's passes over the same runs: the machine's own run-to-run spread (max/min - 1 per point)
    pts: dict = {}
    for r in cal:
        pts.setdefault((r["batch"], r["policy"], r["modes"], r["overrides"], r["context"]), []).append(float(r["step_ms"]))
    spread = sorted(max(v) / min(v) - 1 for v in pts.values() if len(v) > 1)
    passes = max(len(v) for v in pts.values())
    fit_err = max(abs(float(r["error"])) for r in cal)
    med = sorted(errs)[len(errs) // 2]
    interp = " and ".join(sorted({r["batch"] for r in chk if r["interpolated_batch"] == "True"}, key=int)) or "none"
    out = ["## The decode cost model", "",
           f"`accel calibrate-cost` fitted on {chk[0]['model']} ({len(cal)} timed runs: the design of "
           f"[docs/cost-model.md](cost-model.md) {passes} times, batch sizes " + ", ".join(sorted({r['batch'] for r in cal}, key=int))
           + "), then every policy below predicted and measured at contexts the calibration never ran, one run each "
           f"(batch sizes {interp} interpolated between measured ones): **{within} of {len(chk)} predictions within 15% "
           f"of the measured step** (median error "
           f"{pct(med, 1)}; worst {worst['policy']} at batch {worst['batch']}, context {worst['context']}: predicted "
           f"{f(worst['predicted_ms'], 1)} ms, measured {f(worst['step_ms'], 1)}). The machine's own run-to-run spread: "
           f"the slowest of the calibration's {passes} runs of the same point is {pct(spread[len(spread) // 2], 1)} "
           f"slower than the fastest (median over {len(spread)} points), up to {pct(spread[-1], 0)}; the worst single "
           f"calibration run is {pct(fit_err, 1)} off the fit (which takes each point's median). "
           "Each cell is predicted / measured decode step (ms) and the error.", ""]
    out += table(["policy"] + [f"batch {b}, {c} tokens" for b, c in points],
                 [[p] + [(f"{f(by[(p, b, c)]['predicted_ms'], 1)} / {f(by[(p, b, c)]['step_ms'], 1)} "
                          f"({float(by[(p, b, c)]['error']) * 100:+.0f}%)") if (p, b, c) in by else "-"
                         for b, c in points] for p in pols])
    out += ["![predicted vs measured](../bench/results/cost_model_check.png)", ""]
    out += sources("cost_model_check.csv", "cost_model_smollm2.csv")
    return out


#: the retrieval tasks' names in the auto tables
TASK_LABEL = {"passkey": "passkey", "niah": "NIAH", "ruler_niah_single_1": "RULER niah"}
AUTO_PARETO = "auto_pareto_smollm2_4k.csv"
#: evaluation summaries of the auto comparison: a later file's rows replace an earlier one's (auto evaluated again)
AUTO_EVAL = ("eval_auto_smollm2_4k.csv", "eval_auto_retrieval_smollm2_4k.csv")
AUTO_LM = ("eval_auto_smollm2_4k_lm.csv", "eval_auto_retrieval_smollm2_4k_lm.csv")
AUTO_SPEED = ("decode_auto_smollm2_b1.csv", "decode_auto_smollm2_b8.csv")
AUTO_GEMMA = ("auto_pareto_gemma3_4k.csv", ("eval_auto_gemma3_4k.csv",), (),
              ("decode_auto_gemma3_b1.csv", "decode_auto_gemma3_b8.csv"))
AUTO_8K = ("auto_pareto_smollm2_8k.csv", ("eval_auto_smollm2_8k.csv",), (),
           ("decode_auto_smollm2_8k_b1.csv", "decode_auto_smollm2_8k_b8.csv"))
AUTO_COST = "cost_model_auto.csv"
AUTO_COST_FIRST = "cost_model_auto_first.csv"


def merged(names, key) -> list[dict]:
    out = {}
    for n in names:
        for r in load(n):
            out[key(r)] = r
    return list(out.values())


def auto_pareto_tables(pareto: str, evals, lms, model: str, ctx: str = "4K") -> list[str]:
    rows = load(pareto)
    ev = merged(evals, lambda r: (r["policy"], r["task"]))
    lm = {r["policy"]: r for r in merged(lms, lambda r: r["policy"])}
    tasks = [t for t in ("passkey", "niah", "ruler_niah_single_1") if t in rows[0]]
    batches = sorted(int(k[len("tok_s_b"):]) for k in rows[0] if re.fullmatch(r"tok_s_b\d+", k))
    dense = next(r for r in rows if r["method"] == "dense")
    n_task = {t: next(int(x["n"]) for x in ev if x["task"] == t and x["policy"] == "dense") for t in tasks}
    label = TASK_LABEL

    def count(r, t):
        return f"{round(float(r[t]) * n_task[t])}/{n_task[t]}"

    def ppl(p):
        v, d = lm.get(p), lm.get("dense")
        return "-" if v is None else f"{float(v['ppl']):.2f} ({100 * (float(v['ppl']) / float(d['ppl']) - 1):+.1f}%)"

    out = [f"{model} at {ctx}: " + ", ".join(f"{label[t]} ({n_task[t]} samples)" for t in tasks)
           + (f", perplexity of 64 held-out tokens after {ctx} of essay (3 samples)" if lm else "")
           + f"; decode tokens/s from a random {ctx} cache (`--synthetic-kv`, 32 new tokens) at batch "
           + " and ".join(map(str, batches)) + ".", "",
           "Dense: " + ", ".join(f"{label[t]} {count(dense, t)}" for t in tasks)
           + (f", perplexity {ppl('dense')}" if lm else "") + ", "
           + ", ".join(f"{f(dense[f'tok_s_b{b}'], 1)} tokens/s at batch {b}" for b in batches) + ".", ""]
    for budget in sorted({float(r["budget"]) for r in rows if r["method"] != "dense"}, reverse=True):
        sel = sorted([r for r in rows if float(r["budget"]) == budget and r["method"] != "dense"],
                     key=lambda r: (-int(r["correct"]), r["policy"]))
        a = next(r for r in sel if r["method"] == "auto")
        front = [b for b in batches if not a[f"dominated_by_b{b}"]]
        # repeated speed runs: their spread is known (single runs write min = max)
        spread = all(f"tok_s_b{b}_min" in a for b in batches) and any(
            r[f"tok_s_b{b}_min"] != r[f"tok_s_b{b}_max"] for r in rows for b in batches)
        clear = [b for b in batches if spread and a[f"clearly_dominated_by_b{b}"]]
        best = max((r for r in sel if r["method"] != "auto"), key=lambda r: int(r["correct"]))
        out += [f"#### {model}, {ctx}, budget {budget:g}", "",
                f"auto: {a['correct']}/{a['n']} correct (best single policy: {best['policy']} {best['correct']}/"
                f"{best['n']}); on the Pareto front at " + (" and ".join(f"batch {b}" for b in front) or "no batch size")
                + (("; dominated beyond the runs' spread at " + " and ".join(
                    f"batch {b} (by {a[f'clearly_dominated_by_b{b}'].replace(' ', ', ')})" for b in clear)
                    if clear else "; dominated by no policy beyond the runs' spread") if spread and len(front) < len(batches)
                   else "") + ".", ""]

        def speed(r, b):
            med = f(r[f"tok_s_b{b}"], 1)
            if not spread or r[f"tok_s_b{b}_min"] == r[f"tok_s_b{b}_max"]:
                return med
            return f"{med} ({f(r[f'tok_s_b{b}_min'], 1)}-{f(r[f'tok_s_b{b}_max'], 1)})"

        out += table(["policy"] + [label[t] for t in tasks] + ["pooled"] + (["perplexity"] if lm else []) + ["KV MB"]
                     + [f"tok/s b{b}" for b in batches] + [f"dominated by (b{b})" for b in batches],
                     [[("**auto**" if r["method"] == "auto" else r["policy"])] + [count(r, t) for t in tasks]
                      + [f"{r['correct']}/{r['n']}"] + ([ppl(r["policy"])] if lm else []) + [f(r["kv_mb"], 1)]
                      + [speed(r, b) for b in batches]
                      + [r[f"dominated_by_b{b}"].replace(" ", ", ") or "—" for b in batches] for r in sel])
        out += [f"![Pareto, budget {budget:g}](../bench/results/{pareto[:-4]}_{int(round(budget * 100))}.png)", ""]
    return out


AUTO_SPEED_8K = ("eval_auto_speed_smollm2_8k.csv", "cost_model_auto_amd_8k.csv")


def auto_speed_plans() -> list[str]:
    """auto's speed-target plans at 8K: what they keep, their accuracy, their predicted and measured speed-ups."""
    ev, chk = load(AUTO_SPEED_8K[0]), load(AUTO_SPEED_8K[1])
    tasks = [t for t in ("passkey", "niah", "ruler_niah_single_1") if any(r["task"] == t for r in ev)]
    label = TASK_LABEL
    by = {(r["policy"], r["task"]): r for r in ev}
    kv_dense = sum(float(by[("dense", t)]["kv_mb"]) for t in tasks) / len(tasks)
    pols = ["dense"] + sorted({r["policy"] for r in ev if r["policy"].startswith("auto@speed")})
    speed = {(r["policy"], int(r["batch"])): r for r in chk}

    def at(p):
        m = re.search(r"@batch=(\d+)", p)
        return int(m.group(1)) if m else 1

    rows = []
    for p in pols:
        acc = [round(float(by[(p, t)]["accuracy"]) * int(by[(p, t)]["n"])) for t in tasks]
        n = sum(int(by[(p, t)]["n"]) for t in tasks)
        kv = sum(float(by[(p, t)]["kv_mb"]) for t in tasks) / len(tasks)
        sp = speed.get((p, at(p)))
        rows.append([p if p == "dense" else f"`{p}`", "-" if p == "dense" else f"batch {at(p)}",
                     f"{100 * kv / kv_dense:.0f}%"] + [f"{a}/{int(by[(p, t)]['n'])}" for a, t in zip(acc, tasks)]
                    + [f"{sum(acc)}/{n}", "-" if sp is None else f(sp["predicted_speedup"], 2) + "x",
                       "-" if sp is None else f(sp["speedup"], 2) + "x"])
    out = ["#### SmolLM2-135M, 8K: speed targets", "",
           "`auto` solved for a predicted decode speed-up over dense at 8K (the shipped AMD EPYC cost model), "
           "evaluated like the budgets above (12 samples per task, one run) and timed beside dense at its batch size "
           f"(the cost-model check below: the median speed-up of {chk[0].get('repeats') or 1} interleaved (dense, plan) "
           "pairs; 8000-token caches). KV kept: the cache each plan held after compression against dense's.", ""]
    out += table(["plan", "for", "KV kept"] + [label[t] for t in tasks] + ["pooled", "predicted speed-up",
                                                                          "measured speed-up"], rows)
    return out


def sec_auto() -> list[str]:
    out = ["## policy=auto against every single KV policy", "",
           "Each model's evaluation ran once per policy: every single KV policy at the same budget (`budget_ratio`, "
           "MoA's `density`) and `auto` solved for `kv_budget` from the shipped profile. KV MB is what each policy's "
           "cache held after compression, measured by the evaluation (mean over samples). *Dominated by* lists the "
           "single policies of the same budget at least as accurate (tasks pooled) and at least as fast at that "
           "batch, and better in one of the two; empty: on the accuracy-vs-speed Pareto front. On SmolLM2 the auto "
           "rows come from a later run with the profile shipped now (retrieval calibration texts; the accuracy of "
           "the other policies does not change between runs), and every speed row from one run after it. At 8K "
           "(SmolLM2, 12 samples per task) the evaluation is one run on the machine its source line names; each speed "
           "figure is the median of three runs of the whole grid, interleaved (`accel bench --repeats 3`; the slowest "
           "and fastest run in brackets): on this shared machine the read bandwidth drifts by tens of percent within "
           "minutes, more than the policies differ at one budget. The speed runs came after, and the "
           "evaluation before, the eviction scores' vectorised exponentials (scores within ~1e-6 relative; the dense "
           "notes) and the vectorised choice of eviction victims (the same victims, tested row by row).", ""]
    out += auto_pareto_tables(AUTO_PARETO, AUTO_EVAL, AUTO_LM, "SmolLM2-135M")
    out += auto_pareto_tables(AUTO_8K[0], AUTO_8K[1], AUTO_8K[2], "SmolLM2-135M", "8K")
    out += auto_speed_plans()
    out += auto_pareto_tables(AUTO_GEMMA[0], AUTO_GEMMA[1], AUTO_GEMMA[2], "Gemma-3-270m")
    chk = load(AUTO_COST)
    first = load(AUTO_COST_FIRST)
    errs = [abs(float(r["error"])) for r in chk]
    ferr = [float(r["error"]) for r in first]
    cal = {(r["batch"], r["policy"], r["context"]): float(r["step_ms"]) for r in load("cost_model_smollm2.csv")
           if r["policy"] == "dense"}
    recal = {(r["batch"], r["policy"], r["context"]): float(r["step_ms"]) for r in load("cost_model_smollm2_b.csv")
             if r["policy"] == "dense"}
    both = sorted(set(cal) & set(recal))
    drift = sorted(recal[k] / cal[k] - 1 for k in both)
    out += ["### The cost model on the plans auto emits", "",
            f"Every auto plan above and four speed-target plans, predicted by a cost model and measured right after "
            f"(`generate()` from a random cache, median step), one run each. Against the shipped cost model, calibrated "
            f"that morning on the same machine: **{sum(abs(e) <= 0.15 for e in ferr)} of {len(first)} within 15%**, every "
            f"prediction too slow by {pct(min(ferr), 0)} to {pct(max(ferr), 0)}: the machine ran faster that afternoon "
            f"(the dense steps the two calibrations share moved by a median {pct(drift[len(drift) // 2], 0)}). "
            f"Recalibrated (`accel calibrate-cost`, {len(load('cost_model_smollm2_b.csv'))} runs) and checked right after: "
            f"**{sum(e <= 0.15 for e in errs)} of {len(chk)} within 15%**, worst {pct(max(errs), 1)}. A cost model is "
            "only as current as the machine's state when it was measured.", ""]
    out += table(["plan", "batch", "context", "predicted ms", "measured ms", "error"],
                 [[r["policy"], r["batch"], r["context"], f(r["predicted_ms"], 1), f(r["step_ms"], 1),
                   f"{100 * float(r['error']):+.1f}%"] for r in chk])
    out += ["![predicted vs measured](../bench/results/cost_model_auto.png)", ""]
    amd = load("cost_model_auto_amd.csv") + load("cost_model_auto_amd_8k.csv")
    aerr = [abs(float(r["error"])) for r in amd]
    serr = [abs(float(r["speedup_error"])) for r in amd]
    reps = int(amd[0].get("repeats") or 1)
    b1err = [float(r["step_ms"]) / float(r["predicted_ms"]) - 1 for r in amd if r["batch"] == "1"]
    free = load("cost_model_auto_amd_free.csv")
    ferr_free = [abs(float(r["error"])) for r in free]
    fb1 = json.loads((RESULTS / "cost_model_smollm2_amd_free.json").read_text())["per_batch"]["1"]
    out += [f"The same check on the AMD EPYC machine: its own cost model (`accel calibrate-cost`, "
            f"{len(load('cost_model_smollm2_amd.csv'))} runs, the compressed layers' per-key costs held at least at a "
            f"full layer's), then the plans 45 minutes later at 4K and 8K, the speed plans solved with that cost model, each "
            f"beside dense measured just before it at the same point: **{sum(e <= 0.15 for e in aerr)} of {len(amd)} "
            f"steps within 15%** (worst {pct(max(aerr), 1)}), **{sum(e <= 0.15 for e in serr)} of {len(amd)} "
            f"speed-ups over dense within 15%** (worst {pct(max(serr), 1)}), each the median of {reps} interleaved "
            f"runs. The machine mostly ran faster than during the calibration: the batch-1 steps measured from "
            f"{pct(-min(b1err), 0)} below to {pct(max(b1err), 0)} above their predictions, while each plan's speed-up "
            f"over the dense run just before it moved much less. The 8K rows at batch 8 extend the cost model past the "
            f"highest context it measured there (4096). A freely "
            f"fitted cost model of the same machine earlier that day (`cost_model_smollm2_amd_free.json`) put "
            f"{sum(e <= 0.15 for e in ferr_free)} of {len(free)} 4K steps within 15% (worst {pct(max(ferr_free), 1)}) "
            f"and priced the scored rule's keys at {f(fb1['kv_scored_slope'], 1)} and the window rule's at "
            f"{float(fb1['kv_plain_slope']) / float(fb1['full_slope']):.0f}x a full layer's at batch 1, so its batch-1 "
            "speed plans left the scored rule out.", ""]
    out += table(["plan", "batch", "context", "predicted ms", "measured ms", "error", "predicted speed-up",
                  "measured speed-up", "error "],
                 [[r["policy"], r["batch"], r["context"], f(r["predicted_ms"], 1), f(r["step_ms"], 1),
                   f"{100 * float(r['error']):+.1f}%", f(r["predicted_speedup"], 2) + "x", f(r["speedup"], 2) + "x",
                   f"{100 * float(r['speedup_error']):+.1f}%"] for r in amd])
    out += sources(AUTO_PARETO, *AUTO_EVAL, *AUTO_LM, *AUTO_SPEED, AUTO_8K[0], *AUTO_8K[1], *AUTO_8K[3],
                   AUTO_GEMMA[0], *AUTO_GEMMA[1], *AUTO_GEMMA[3],
                   AUTO_COST_FIRST, "cost_model_smollm2_b.csv", AUTO_COST, "cost_model_smollm2_amd.csv",
                   "cost_model_auto_amd.csv", "cost_model_auto_amd_8k.csv", AUTO_SPEED_8K[0],
                   "cost_model_auto_amd_free.csv")
    out += sec_auto_ppl()
    return out


AUTO_PPL = ("auto_ppl_smollm2_4k.csv", "auto_ppl_gemma3_4k.csv")


def sec_auto_ppl() -> list[str]:
    out = ["### A perplexity target", "",
           "`auto` solved for `max_ppl_increase` alone (the fewest kept tokens within the damage bound the shipped "
           "profile's measured perplexity curve gives), then measured on the evaluation's held-out text (the `lm` "
           "task: 64 teacher-forced tokens after a 4K prefix of the essays' first half, perplexity pooled over the "
           "samples), one run each. *Predicted* is the increase the curve predicts for the plan (measured on "
           "calibration passages from the essays' second half); *within* says whether the measured increase is at "
           "most the target.", ""]
    for name in AUTO_PPL:
        rows = load(name)
        d = rows[0]
        out += [f"{d['model']}, {d['samples']} samples: dense perplexity {f(d['ppl'], 2)}, {f(d['kv_mb'], 1)} KV MB.", ""]
        out += table(["max_ppl_increase", "mean share kept", "KV MB", "predicted", "measured", "within"],
                     [[r["target"], r["kv_share"], f(r["kv_mb"], 1),
                       pct(float(r["predicted_increase"]), 2) if r["predicted_increase"] else "-",
                       pct(float(r["increase"]), 2), "yes" if r["within"] == "True" else "**no**"]
                      for r in rows[1:]])
    out += sources(*AUTO_PPL)
    return out


def sec_tpla() -> list[str]:
    err = load("tpla_error.csv")
    tr = list(dict.fromkeys(r["transform"] for r in err))
    by = {}
    for r in err:
        by.setdefault((int(r["shards"]), r["queries"], r["query_scale"], r["shard_logit_scale"]), {})[r["transform"]] = r["rel_error"]
    out = ["## TPLA on a random DeepSeek-V3-shaped model", "",
           "No MLA weights install here: these runs use random configs, so they measure speed, bytes and the error of "
           "the maths, not model quality.", "",
           "### Output error of TPLA against MLA", "",
           "Mean relative error of the per-head attention outputs over several seeds; structured latents (low rank plus "
           "noise and outlier channels); queries random or *aligned* (the absorbed query of a latent of the same "
           "sequence). Shard logit scale 1 is the paper's independent softmax, g multiplies each shard's logits by g.", ""]
    out += table(["g", "queries", "q scale", "shard logit scale"] + tr,
                 [[g, q, s, sl] + [f(v[t], 3) for t in tr] for (g, q, s, sl), v in by.items()])
    out += ["![TPLA error](../bench/results/tpla_error.png)", ""]
    out += sources("tpla_error.csv")
    mib = lambda b: f"{int(b) / 2**20:.1f} MiB"
    label = {"hf-unpatched": "transformers unpatched", "mla-absorbed-1-process": "accel MLA, absorbed, 1 process",
             "tpla-2-simulated-1-process": "TPLA 2 shards simulated, 1 process", "tpla-2-ranks": "TPLA, 2 gloo ranks"}
    rows = [[label.get(r["mode"], r["mode"]), r["ranks"], r["context"], f(r["step_ms"], 1), ratio(r["speedup_vs_mla_1_process"]),
             mib(r["kv_bytes_per_rank"]), mib(r["weight_bytes_per_rank"])]
            for r in sorted(load("tpla_decode.csv"), key=lambda r: (int(r["context"]), r["mode"] != "hf-unpatched", int(r["ranks"])))]
    out += ["### Decode step, 2 gloo ranks against one process", "",
            "`random-mla-mid` (DeepSeek-V3 layout with its real MLA widths), synthetic latent cache, Hadamard transform, "
            "one thread per process, median of the decode steps.", ""]
    out += table(["execution", "ranks", "context", "step ms", "vs MLA 1 process", "KV bytes per rank", "weights per rank"], rows)
    out += sources("tpla_decode.csv")
    return out


def sec_compile() -> list[str]:
    rs = load("compile_smollm2_4k.csv")
    hf = next(r for r in rs if r["policy"] == "hf")
    by = {}
    for r in rs:
        by.setdefault(r["policy"], {})[r["mode"]] = r
    rows = []
    for p, m in by.items():
        if p == "hf":
            continue
        e, c = m["eager"], m["compiled"]
        rows.append([p, f(e["decode_tok_s"]), f(c["decode_tok_s"]), f(float(c["decode_tok_s"]) / float(e["decode_tok_s"])),
                     f(c["compile_s"], 1), "yes" if c["same_tokens"] == "True" else "no",
                     ratio(float(c["decode_tok_s"]) / float(hf["decode_tok_s"])), e["runs"], c["runs"]])
    out = ["## torch.compile against eager decode", "",
           f"`model.forward = torch.compile(model.forward)` on the patched model, compiled once by a warm-up generation; "
           f"cache filled with {hf['context']} random tokens, {hf['new_tokens']} new tokens, eager and compiled runs "
           f"alternated, median reported. Unpatched transformers (eager, one run): {f(hf['decode_tok_s'])} tok/s.", ""]
    out += table(["policy", "eager tok/s", "compiled tok/s", "compiled / eager", "compile s", "same tokens",
                  "compiled vs unpatched HF", "eager runs", "compiled runs"], rows)
    return out + sources("compile_smollm2_4k.csv")


# ------------------------------------------------------------------------------------------------------------
# the README's policy table
# ------------------------------------------------------------------------------------------------------------
POLICIES = [  # name, paper (as cited in the code), what it does
    ("dense", "— (exact attention)", "accel's cache and decode kernels; every other policy reduces to it when its budget covers the context"),
    ("hylra", "HyLRA, Ai et al. 2026, arXiv 2602.00777", "per layer from a calibrated plan: full attention, or reuse an earlier layer's top-k tokens"),
    ("delta", "DELTA, arXiv 2510.09883", "Delta-layers pick 16-token pages from full attention; the layers below them attend to those pages"),
    ("recycled", "RefreshKV / Recycled Attention, Xu, Goyal, Choi, ACL 2025, arXiv 2411.05787", "partial cache of top tokens, refreshed by a full step when the query drifts"),
    ("quest", "Quest, Tang et al., ICML 2024, arXiv 2406.10774", "per query head, the pages whose key min/max bound q.k highest, plus the current page; a GQA group reads their union once"),
    ("hip", "HiP, Lee et al., ICLR 2025, arXiv 2406.09827", "per KV head, a hierarchical search keeps the key blocks whose middle keys score highest, plus sinks and a window"),
    ("streaming", "StreamingLLM, Xiao et al. 2023", "keeps attention sinks + the newest tokens"),
    ("snapkv", "SnapKV, Li et al. 2024", "keeps the tokens the prompt's last queries attend to"),
    ("pyramidkv", "PyramidKV, Cai et al. 2024", "SnapKV scores with budgets shrinking with depth"),
    ("h2o", "H2O, Zhang et al. 2023", "keeps heavy hitters (accumulated attention) + recent tokens"),
    ("duo", "DuoAttention, Xiao et al. 2024, arXiv 2410.10819", "retrieval heads keep everything, streaming heads a small cache"),
    ("taskkv", "Task-KV, He, Liu, Chen, arXiv 2501.15113", "per request, heads far from their layer's semantic center keep everything"),
    ("moa", "MoA, Fu et al., arXiv 2406.14909", "per-head sink + band spans from an offline MILP; sparse prefill"),
    ("auto", "accel's scheduler: StreamingLLM / SnapKV rules, per-head budgets by MILP as in MoA", "per layer an eviction rule, per KV head its share of the prompt (or all of it), chosen from a calibration profile under a bytes or speed target"),
    ("flux", "Flux Attention, Qiu et al., arXiv 2604.07394", "a trained layer router picks, per request and layer, full attention or a sparse backend (Quest pages by default) from the prefill"),
    ("tca", "TCA-Attention, You, Chen, Zhang et al., arXiv 2512.09238", "per KV head, a calibrated quota of each 16-token block's least redundant keys stays in the cache (optionally in the prefill too)"),
    ("fastervlm", "FasterVLM, Zhang et al., arXiv 2412.01818", "keeps the image tokens the vision tower's [CLS] attends to"),
    ("flowcut", "FlowCut, Tong et al., arXiv 2505.19536", "prunes image tokens progressively inside the vision tower"),
    ("fastv", "FastV-style, after Chen et al., ECCV 2024", "ranks image tokens by the attention they get in an early LLM layer"),
    ("sgl", "SGL, Zhao et al., CVPR 2025", "a small VLM's attention ranks the large one's image tokens; confident small answers skip the large model"),
    ("randomprune", "— (control)", "keeps a seeded random subset of image tokens"),
    ("tpla", "TPLA, Tang et al., arXiv 2508.15881", "splits MLA's latent cache over tensor-parallel shards"),
]


def policy_table() -> list[str]:
    rq = _reuse_quality()
    kq, ks = kv_speed_and_quality()
    s12 = {(r["policy"], int(r["batch"])): r for n in ("decode_reuse_smollm2_b1_s12.csv", "decode_reuse_smollm2_b8_s12.csv") for r in load(n)}
    b1 = {r["policy"]: r for r in load("decode_smollm2_b1.csv") if r["context"] == "4095"}
    curve = {(r["policy"], int(r["keep"])): r for r in load("vlm_digits_curve.csv")}
    pre = {(r["policy"], r["keep"]): r for r in load("vlm_prefill_vitl.csv")}
    tdec = {(r["mode"], r["context"]): r for r in load("tpla_decode.csv")}
    terr = {(r["shards"], r["queries"], r["query_scale"], r["shard_logit_scale"], r["transform"]): r for r in load("tpla_error.csv")}

    def pk(q, p, c, ref="dense"):
        return (f"passkey {q.cell(p, c, 'passkey')}, NIAH {q.cell(p, c, 'niah')} (dense {q.cell(ref, c, 'passkey').split('/')[0]}, "
                f"{q.cell(ref, c, 'niah').split('/')[0]}), ppl {q.ppl(p, c).split(' ')[-1].strip('()')}")

    def reuse_speed(p):
        return (f"{ratio(s12[(p, 1)]['speedup_vs_accel_dense'])} dense (8K, batch 1), "
                f"{ratio(s12[(p, 8)]['speedup_vs_accel_dense'])} (4K, batch 8)")

    def kv_cells(spec):
        r, d = ks[(spec, 1)], ks[("dense", 1)]
        knob, val = spec.split("@")[1].split("=")
        what = "budget" if knob == "budget_ratio" else knob
        return (f"4K, {what} {100 * float(val):.0f}%: " + pk(kq, spec, 4096),
                f"{ratio(float(r['decode_tok_s']) / float(d['decode_tok_s']))} dense (8K, batch 1); KV "
                f"{100 * float(r['kv_held_mb']) / float(d['kv_held_mb']):.0f}% of dense")

    def vlm_cells(p):
        c16, c64, r = curve[(p, 16)], curve[(p, 64)], pre[(p, "64")]
        return (f"digits VLM, 16 of 64 tokens: {f(c16['accuracy'], 3)} (all: {f(c64['accuracy'], 3)})",
                f"576 → 64 tokens: LLM prefill {ratio(r['llm_speedup'])}, VLM prefill {ratio(r['prefill_speedup'])} (ViT-L-shaped tower)")

    qd = {r["policy"]: r for r in load("decode_quest_none_smollm2_b1.csv")}
    qb8 = {r["policy"]: r for r in load("decode_quest_smollm2_b8.csv")}
    hd = {r["policy"]: r for r in load(HIP_SPEED)}
    hsame, htotal, htasks, hctx = _headline_same()
    cells = {
        "dense": (f"{min(hctx) // 1024}K-{max(hctx) // 1024}K, {len(htasks)} tasks: same answers as unpatched on "
                  f"{hsame} of {htotal} samples",
                  f"{ratio(b1['dense']['speedup_vs_hf'])} unpatched HF (4K, batch 1)"),
        "hylra": ("4K, top-k 1/8: " + pk(rq, "hylra (current plan)", 4096), reuse_speed("hylra")),
        "delta": ("4K, top-k 1/8: " + pk(rq, "delta (calibrated layout)", 4096), reuse_speed("delta")),
        "recycled": ("4K, top-k 1/8: " + pk(rq, "recycled", 4096), reuse_speed("recycled")),
        "quest": ("4K, top-k 1/8, pages of 4: " + pk(rq, "quest", 4096),
                  f"{ratio(qd['quest']['speedup_vs_accel_dense'])} dense (8K, batch 1, real prefill; one page set per "
                  f"KV head {ratio(qd['quest@agg=max']['speedup_vs_accel_dense'])} in the same run), "
                  f"{ratio(qb8['quest']['speedup_vs_accel_dense'])} (4K, batch 8, distinct prompts)"),
        "hip": ("4K, top-k 1/8: " + pk(rq, "hip", 4096),
                f"{ratio(hd['hip']['speedup_vs_accel_dense'])} dense (8K, batch 1, real prefill; 16 keys per child "
                f"searched every step {ratio(hd['hip@rep_keys=16@refresh=1']['speedup_vs_accel_dense'])} in the same "
                "run)"),
        "tpla": ("random DeepSeek-V3 shape, g=2, Hadamard: relative output error "
                 f"{f(terr[('2', 'aligned', '1.0', '1', 'hadamard')]['rel_error'], 3)} (aligned queries)",
                 f"2 gloo ranks {ratio(tdec[('tpla-2-ranks', '32768')]['speedup_vs_mla_1_process'])} one process at 32K; "
                 f"KV per rank {int(tdec[('tpla-2-ranks', '32768')]['kv_bytes_per_rank']) / int(tdec[('mla-absorbed-1-process', '32768')]['kv_bytes_per_rank']):.3f} of MLA's"),
    }
    for p in ("streaming", "snapkv", "pyramidkv", "h2o", "duo", "taskkv"):
        cells[p] = kv_cells(f"{p}@budget_ratio=0.25")
    cells["moa"] = kv_cells("moa@density=0.25")
    aq = Quality()
    for n in (*AUTO_EVAL, *AUTO_LM):
        aq.add(n)
    ad = {r["policy"]: r for r in load(AUTO_SPEED[0])}
    cells["auto"] = ("4K, budget 25%: " + pk(aq, "auto@kv_budget=0.25", 4096),
                     f"{ratio(ad['auto@kv_budget=0.25']['speedup_vs_accel_dense'])} dense (4K, batch 1); KV "
                     f"{100 * float(ad['auto@kv_budget=0.25']['kv_held_mb']) / float(ad['dense']['kv_held_mb']):.0f}% "
                     "of dense")
    tq = Quality()
    for n in TCA_EVAL:
        tq.add(n)
    td = {(r["policy"], r["batch"]): r for n in TCA_SPEED for r in load(n)}
    cells["tca"] = ("4K, shipped quotas: " + pk(tq, "tca", 4096),
                    f"{ratio(td[('tca', '1')]['speedup_vs_accel_dense'])} dense (8K, batch 1, real prefill); KV "
                    f"{100 * float(td[('tca', '1')]['kv_held_mb']) / float(td[('dense', '1')]['kv_held_mb']):.0f}% of "
                    "dense")
    fq = Quality()
    for n in FLUX_EVAL:
        fq.add(n)
    fd = {(r["policy"], r["batch"]): r for n in FLUX_SPEED for r in load(n)}
    cells["flux"] = ("4K, 1/3 of the layers full, top-k 1/8: " + pk(fq, "flux", 4096)
                     + f"; hylra in the same run: passkey {fq.cell('hylra', 4096, 'passkey')}, NIAH "
                     f"{fq.cell('hylra', 4096, 'niah')}",
                     f"{ratio(fd[('flux', '1')]['speedup_vs_accel_dense'])} dense (8K, batch 1, real prefill), "
                     f"{ratio(fd[('flux', '8')]['speedup_vs_accel_dense'])} (4K, batch 8, one prompt)")
    for p in ("fastervlm", "flowcut", "fastv", "randomprune"):
        cells[p] = vlm_cells(p)
    cl = {(r["policy"], int(r["keep"])): r for r in load("vlm_clutter_curve.csv")}
    single = max((r for (p, k), r in cl.items() if k == CLUTTER_KEEP and not p.startswith(("sgl", "randomprune"))),
                 key=lambda r: float(r["accuracy"]))
    best, base = see_within_one_point()
    cells["sgl"] = (f"cluttered digits (large model), {CLUTTER_KEEP} of {cl[('sgl', CLUTTER_KEEP)]['tokens']} tokens: "
                    f"{f(cl[('sgl', CLUTTER_KEEP)]['accuracy'], 3)} (best single-model {single['policy']}: "
                    f"{f(single['accuracy'], 3)}; random {f(cl[('randomprune', CLUTTER_KEEP)]['accuracy'], 3)}; all: "
                    f"{f(cl[('large model, all tokens', int(cl[('sgl', CLUTTER_KEEP)]['tokens']))]['accuracy'], 3)})",
                    (f"early exit within 1 point of the large model: {pct(best['exit_rate'], 1)} answered by the small "
                     f"model alone, {ratio(best['speedup'])} end to end" if best is not None else
                     "no early-exit threshold within 1 point of the large model"))
    out = ["| policy | paper | what it does | measured quality | measured speed |", "|---|---|---|---|---|"]
    pages = sorted(x.stem for x in (ROOT / "docs" / "methods").glob("*.md") if x.stem != "README")
    missing = sorted(set(pages) - {n for n, _, _ in POLICIES})
    if missing:
        raise SystemExit(f"make_results: docs/methods has pages for {missing} but POLICIES has no row for them")
    for name, paper, what in POLICIES:
        q, s = cells.get(name, ("not measured yet", "not measured yet"))
        out.append(f"| [`{name}`](docs/methods/{name}.md) | {paper} | {what} | {q} | {s} |")
    out += ["", "SmolLM2-135M (the VLM rows: SmolLM2-135M inside a project-trained digits VLM, sgl's inside the "
            "project-trained cluttered-digits pair; tpla: a random "
            "DeepSeek-V3-shaped model, no quality), CPU, one thread (the sgl and auto rows: two). KV policies at a 25% budget (moa: density 0.25; auto: kv_budget 0.25, its row from its own run, with dense in the same run); "
            "speed against accel dense unless it says unpatched HF. Every cell is generated from `bench/results/` by "
            "`python bench/make_results.py`; sources, machines and dates in [docs/results.md](docs/results.md)."]
    return out


def kv_speed_and_quality():
    return kv_quality(), kv_speed()


def _headline_same() -> tuple[int, int, set, set]:
    """(samples where accel dense predicted exactly what unpatched transformers did, samples, tasks, contexts) over
    the generation tasks of the headline evaluation."""
    same = total = 0
    tasks, ctxs = set(), set()
    for n in ("eval_smollm2.csv", "eval_smollm2_long.csv", "eval_smollm2_ruler.csv"):
        preds: dict = {}
        for r in load(n.replace(".csv", "_samples.csv")):
            if r["task"] != "lm":
                preds.setdefault((r["task"], r["target_len"], r["idx"]), {})[r["policy"]] = r["prediction"]
        for (t, c, _), v in preds.items():
            if "hf" in v and "dense" in v:
                total += 1
                same += v["hf"] == v["dense"]
                tasks.add(t)
                ctxs.add(int(c))
    return same, total, tasks, ctxs


# ------------------------------------------------------------------------------------------------------------
def results_md() -> str:
    _USED.clear()
    body = []
    for sec in (sec_headline, sec_decode, sec_step, sec_throughput, sec_kernels, sec_linear, sec_reuse, sec_kv, sec_tca, sec_flux, sec_duo,
                sec_vlm, sec_vlm_clutter, sec_tpla, sec_compile, sec_cost_model, sec_auto):
        body += sec()
    head = ["# Measured results", "",
            "<!-- generated by `python bench/make_results.py` from bench/results/*.csv; do not edit by hand -->", "",
            "Every number on this page is read from a CSV in `bench/results/` by `python bench/make_results.py`; each "
            "table names its CSV, the command that wrote it (from the [benchmark index](../bench/README.md)) and the "
            "machine facts the CSV records. What the numbers mean for each method is discussed on its page under "
            "[docs/methods/](methods/).", "",
            "How to read them:", "",
            "* All runs are on the project machine: a shared AMD EPYC virtual machine with two cores and no GPU, fp32, "
            "one thread unless stated, one run per configuration. Runs committed before "
            f"{AVX2_SINCE} used an EPYC with AVX-512, later runs an AVX2-only EPYC until CSVs recorded the vector "
            "instructions accel's kernels were built for (column `isa`, from 2026-12-04); each source line names its "
            "machine. The C++ kernels are built for the machine they run on (`-march=native`), so rows from machines "
            "of different ISAs are not comparable.",
            "* The machine's memory bandwidth moves noticeably between runs, so compare rows of one CSV "
            "(measured in one run) rather than rows of different CSVs; the speed CSVs record the bandwidth measured in "
            "their run.",
            "* \"Committed\" is the day the CSV entered the repository, the closest record of when it was measured.",
            "* `hf` / \"HF unpatched\" is the model without accel; `dense` is accel's exact path; `name@knob=value` is a "
            "policy with an option set.", "",
            "Contents: "
            + ", ".join(f"[{t}](#{_anchor(t)})" for t in (l[3:] for l in body if l.startswith("## "))) + ".", ""]
    unused = sorted(set(COMMITTED) - set(_USED))
    if unused:
        raise SystemExit(f"make_results: CSVs listed in COMMITTED but shown nowhere: {unused}")
    missing = sorted(p.name for p in RESULTS.glob("*.csv") if not p.name.endswith("_samples.csv") and p.name not in COMMITTED)
    if missing:
        raise SystemExit(f"make_results: new CSVs without a commit date in COMMITTED (and a table): {missing}")
    return "\n".join(head + body).rstrip() + "\n"


def _anchor(title: str) -> str:
    s = re.sub(r"[^\w\- ]", "", title.lower()).strip()
    return s.replace(" ", "-")


def readme_with_table(text: str) -> str:
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"make_results: README.md lacks the {TABLE_START} / {TABLE_END} markers")
    a, rest = text.split(TABLE_START, 1)
    _, b = rest.split(TABLE_END, 1)
    return a + TABLE_START + "\n" + "\n".join(policy_table()) + "\n" + TABLE_END + b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/results.md or README.md's policy table is stale")
    args = ap.parse_args(argv)
    want = {RESULTS_MD: results_md(), README: readme_with_table(README.read_text())}
    if args.check:
        stale = [p.relative_to(ROOT).as_posix() for p, t in want.items() if not p.exists() or p.read_text() != t]
        if stale:
            print(f"make_results: {', '.join(stale)} out of date with bench/results/; run `python bench/make_results.py`",
                  file=sys.stderr)
            return 1
        return 0
    for p, t in want.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists() or p.read_text() != t:
            p.write_text(t)
            print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
