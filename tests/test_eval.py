"""The evaluation harness: metrics, cache forks, deterministic samples, and the quick mode end to end
on the real SmolLM2 (so the harness cannot silently break)."""
import csv

import pytest
import torch

from accel.eval import runner
from accel.eval.ruler import string_match_all


def test_wilson_interval():
    lo, hi = runner.wilson(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.73
    lo, hi = runner.wilson(5, 10)
    assert lo < 0.5 < hi and abs((0.5 - lo) - (hi - 0.5)) < 1e-9


def test_ruler_metric_and_scorers():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("The numbers are 123.", ["123", "456"]) == 0.5
    assert runner.score("passkey", " 60494. The pass key", ["60494"]) == 1.0
    assert runner.score("passkey", " 6049", ["60494"]) == 0.0
    assert runner.score("niah", " ride the yellow tram to the old castle.", ["ride the yellow tram to the old castle"]) == 1.0
    assert runner.score("niah", " ride a bike.", ["ride the yellow tram to the old castle"]) == 0.0


def test_fork_cache_is_independent_and_hf_equivalent():
    from accel.cache import AccelCache

    from .conftest import tiny_config

    cfg = tiny_config("gemma3_text")
    c = AccelCache(cfg)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 40, 16, generator=g)
    for layer in range(4):
        c.update(k, k, layer)
    f = runner.fork_cache(c)
    h = runner.fork_cache(c, for_hf=True)
    t = torch.randn(1, 2, 1, 16, generator=g)
    for layer in range(4):
        fa = f.update(t, t, layer)[0]
        hb = h.update(t, t, layer)[0]
        assert torch.equal(fa, hb)
    assert c.get_seq_length() == 40 and f.get_seq_length() == 41 == h.get_seq_length()


def test_shared_prefill_runs_the_lm_head_on_the_last_position_only():
    """The harness's shared prefill keeps only the cache: the LM head sees one position (logits_to_keep=1),
    and the cache is the one a full-logits prefill builds."""
    from .conftest import tiny_model

    m = tiny_model("llama")
    seen = []
    hook = m.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    ids = torch.randint(3, 200, (1, 33), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    try:
        cache, _ = runner._prefill(m, ids, mask)
    finally:
        hook.remove()
    assert seen == [1]
    from accel.api import patch

    with patch(m, "dense") as h, torch.no_grad():
        m(input_ids=ids, attention_mask=mask, use_cache=True)
        ref = h.cache
    for a, b in zip(cache.layers, ref.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.fixture(scope="module")
def smollm():
    from accel.models import load

    return load("smollm2-135m")


def test_samples_are_deterministic_and_cached(smollm):
    _, tok = smollm
    a = runner.build_samples("passkey", tok, "smollm2-135m", [300], [0.2, 0.8], 3, seed=5)
    b = runner.build_samples("passkey", tok, "smollm2-135m", [300], [0.2, 0.8], 3, seed=5)
    assert [s.prompt for s in a] == [s.prompt for s in b] and len({s.answers[0] for s in a}) == 3
    assert [s.depth for s in a] == [0.2, 0.8, 0.2]
    assert all(abs(s.n_tokens - 300) <= 30 for s in a)


def test_quick_mode_end_to_end(tmp_path):
    from accel.cli.main import main

    out = tmp_path / "eval.csv"
    assert main(["eval", "--quick", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    tasks = {(r["task"], r["policy"]) for r in rows}
    assert tasks == {(t, p) for t in ("passkey", "niah", "ruler_niah_single_1", "lm") for p in ("hf", "dense")}
    by = {(r["task"], r["policy"]): r for r in rows}
    for t in ("passkey", "niah", "ruler_niah_single_1"):
        assert by[(t, "dense")]["accuracy"] == by[(t, "hf")]["accuracy"]  # exact policy, same answers
    assert float(by[("lm", "dense")]["top1_agree"]) == 1.0
    for t in ("passkey", "niah", "ruler_niah_single_1", "lm"):  # accel's cache reports what it holds; HF's is not read
        assert float(by[(t, "dense")]["kv_mb"]) > 0 and by[(t, "hf")]["kv_mb"] == ""
    assert abs(float(by[("lm", "hf")]["ppl"]) - float(by[("lm", "dense")]["ppl"])) < 1e-3
    samples = list(csv.DictReader((tmp_path / "eval_samples.csv").open()))
    pred = {(s["task"], s["idx"], s["policy"]): s["prediction"] for s in samples}
    for (task, idx, pol), p in pred.items():
        if pol == "dense":
            assert p == pred[(task, idx, "hf")]
    assert (tmp_path / "eval.png").stat().st_size > 1000


def test_eval_plot_has_a_perplexity_panel_for_lm_only_runs(tmp_path):
    """An ``--tasks lm`` run used to write no PNG while the CLI said it did: the plot now draws perplexity
    against context, and reports whether it wrote anything."""
    from accel.cli.evaluate import _plot

    rows = [{"policy": pol, "task": "lm", "context": L, "ppl": ppl, "accuracy": 1.0, "ci_low": "", "ci_high": ""}
            for pol, L, ppl in [("dense", 4096, 22.4), ("dense", 8192, 17.3), ("snapkv", 4096, 23.0), ("snapkv", 8192, 17.9)]]
    assert _plot(rows, tmp_path / "lm.png", "m") is True
    assert (tmp_path / "lm.png").stat().st_size > 1000
    gen = [{"policy": "dense", "task": "passkey", "context": 4096, "accuracy": 0.5, "ci_low": 0.3, "ci_high": 0.7}]
    assert _plot(gen + rows, tmp_path / "both.png", "m") is True
    assert _plot([], tmp_path / "none.png", "m") is False and not (tmp_path / "none.png").exists()


def test_results_quality_table_later_csv_wins(tmp_path, monkeypatch):
    """bench/make_results.py's quality bookkeeping: a CSV added later replaces a policy's older rows, check marks
    follow the slack against dense, labels can drop an option, perplexity is shown relative to dense."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("make_results",
                                                  Path(__file__).resolve().parents[1] / "bench" / "make_results.py")
    mr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mr)
    monkeypatch.setattr(mr, "RESULTS", tmp_path)

    def write(name, rows):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["policy", "task", "context", "n", "accuracy", "ppl", "top1_agree"])
            w.writeheader()
            for pol, task, ctx, k, ppl in rows:
                w.writerow({"policy": pol, "task": task, "context": ctx, "n": 3 if task == "lm" else 20,
                            "accuracy": k / 20, "ppl": ppl, "top1_agree": 0.9 if ppl else ""})
        return name

    old = write("old.csv", [("dense", "passkey", 4096, 16, ""), ("duo@budget_ratio=0.25", "passkey", 4096, 4, ""),
                            ("moa@density=0.25@max_new_tokens=16", "passkey", 4096, 3, "")])
    new = write("new.csv", [("dense", "passkey", 4096, 16, ""), ("duo@budget_ratio=0.25", "passkey", 4096, 14, "")])
    lm = write("lm.csv", [("dense", "lm", 4096, 3, 20.0), ("moa@density=0.25@max_new_tokens=64", "lm", 4096, 3, 21.0)])
    q = mr.Quality().add(old, label=mr.drop_option).add(new, label=mr.drop_option).add(lm, label=mr.drop_option)
    assert q.cell("duo@budget_ratio=0.25", 4096, "passkey", slack=2) == "14/20 ✓"
    assert q.cell("moa@density=0.25", 4096, "passkey", slack=2) == "3/20 ✗"
    assert q.ppl("moa@density=0.25", 4096) == "21.00 (+5.0%)" and q.ppl("dense", 4096) == "20.00"
    assert q.cell("streaming", 4096, "passkey") == "-"


def test_summary_kv_mb_is_the_mean_held_and_blank_when_any_sample_has_none():
    from accel.eval.runner import Result, summarise

    mk = lambda pol, i, b: Result(pol, "passkey", 100, 100, 0.5, i, 1.0, "", extra={"kv_bytes": b})  # noqa: E731
    rows = {r["policy"]: r for r in summarise([mk("a", 0, 2**20), mk("a", 1, 3 * 2**20), mk("b", 0, float("nan")),
                                                 mk("b", 1, 2**20)])}
    assert rows["a"]["kv_mb"] == 2.0 and rows["b"]["kv_mb"] == ""


def test_auto_pareto_dominance_by_median_and_beyond_the_runs_spread(tmp_path):
    """bench/auto_pareto.py: a single policy at least as accurate and faster by the median run dominates auto; it
    dominates clearly only when its slowest run is at least as fast as auto's fastest."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("auto_pareto",
                                                  Path(__file__).resolve().parents[1] / "bench" / "auto_pareto.py")
    ap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ap)

    def write(name, fields, rows):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        return str(tmp_path / name)

    ev = write("ev.csv", ["policy", "task", "context", "n", "accuracy", "kv_mb"],
               [{"policy": p, "task": "passkey", "context": 8192, "n": 10, "accuracy": a, "kv_mb": 9}
                for p, a in [("dense", 0.8), ("auto@kv_budget=0.25", 0.7), ("duo@budget_ratio=0.25", 0.7),
                             ("snapkv@budget_ratio=0.25", 0.8)]])
    # batch 2: step ms per run; tokens/s = 2000 / median step
    runs = {"dense": [40, 41, 42], "auto@kv_budget=0.25": [20, 25, 30], "duo@budget_ratio=0.25": [19, 24, 29],
            "snapkv@budget_ratio=0.25": [12, 13, 14]}
    sp = write("sp.csv", ["policy", "batch", "decode_tok_s", "decode_step_ms", "step_ms_all"],
               [{"policy": p, "batch": 2, "decode_tok_s": 2000 / sorted(v)[1], "decode_step_ms": sorted(v)[1],
                 "step_ms_all": " ".join(map(str, v))} for p, v in runs.items()])
    ap.main(["--eval", ev, "--speed", sp, "--out", str(tmp_path / "p.csv")])
    rows = {r["policy"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    auto = rows["auto@kv_budget=0.25"]
    assert set(auto["dominated_by_b2"].split()) == {"duo@budget_ratio=0.25", "snapkv@budget_ratio=0.25"}
    assert auto["clearly_dominated_by_b2"] == "snapkv@budget_ratio=0.25"  # duo's runs overlap auto's
    assert float(auto["tok_s_b2_min"]) == pytest.approx(2000 / 30, abs=1e-3)
    assert float(auto["tok_s_b2_max"]) == pytest.approx(2000 / 20, abs=1e-3)
    assert rows["snapkv@budget_ratio=0.25"]["dominated_by_b2"] == ""
