"""The command line on a tiny random Llama that uses SmolLM2's real tokenizer (saved to a folder)."""
import json
from pathlib import Path

import pytest
import torch

from accel.cli.main import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from accel.models.loader import converted_path, load

    load("smollm2-135m")  # make sure the converted folder (and its tokenizer) exists
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted_path("smollm2-135m")))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    d = tmp_path_factory.mktemp("tiny")
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpp" in out and "dense" in out and "hylra" in out and "recycled" in out and "unavailable:" in out
    assert "fastervlm" in out and "llava_next" in out and "qwen2_vl" in out
    assert "tpla" in out and "deepseek_v3" in out and "random-mla-mid" in out


def test_generate_single_prompt(tiny_folder, capsys):
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "Hello there", "--max-new-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert "prefill" in err and "tok/s" in err


def test_generate_jsonl_batched_and_resumable(tiny_folder, tmp_path):
    inp = tmp_path / "p.jsonl"
    inp.write_text("\n".join(json.dumps({"id": i, "prompt": f"Item {i} is"}) for i in range(5)) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--model", str(tiny_folder), "--input", str(inp), "--output", str(out),
                 "--batch-size", "2", "--max-new-tokens", "4"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(5))
    # resume: add one prompt, only it is generated
    inp.write_text(inp.read_text() + json.dumps({"id": 5, "prompt": "Item 5 is"}) + "\n")
    assert main(["generate", "--model", str(tiny_folder), "--input", str(inp), "--output", str(out),
                 "--max-new-tokens", "4"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(6))


def test_generate_data_parallel_over_two_ranks_merges_and_resumes(tiny_folder, tmp_path):
    """torchrun with 2 gloo ranks and --input: each rank generates its share, rank 0 merges them into one output in
    input order, equal to a single-process run; a part file left by an interrupted run (here with another rank count)
    is not generated again but merged; no part file remains."""
    import json
    import os
    import subprocess
    import sys

    inp = tmp_path / "p.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"item {i} of the list is"}) + "\n" for i in range(5)))
    ref = tmp_path / "ref.jsonl"
    assert main(["generate", "--model", str(tiny_folder), "--input", str(inp), "--output", str(ref),
                 "--max-new-tokens", "4", "--batch-size", "1"]) == 0
    want = [json.loads(line) for line in ref.read_text().splitlines()]
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.part7").write_text(json.dumps({**want[2], "completion": "from the earlier run"}) + "\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                        "accel", "generate", "--model", str(tiny_folder), "--input", str(inp), "--output", str(out),
                        "--max-new-tokens", "4", "--batch-size", "1"], capture_output=True, text=True, env=env,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "merged 5 completions from 2 ranks" in r.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [w["id"] for w in want]
    assert [g["completion"] for g in got] == [w["completion"] if w["id"] != "q2" else "from the earlier run"
                                              for w in want]
    assert not list(tmp_path.glob("out.jsonl.part*"))


def test_anchor_folder_and_leftover_parts_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import accel.cli.bench as B
    import accel.cli.generate as G

    def no_load(*a, **k):
        raise AssertionError("the model must not load for an input error")

    monkeypatch.setattr(B, "load_model", no_load)
    monkeypatch.setattr(G, "load_model", no_load)
    assert main(["bench", "--anchors", str(tmp_path / "nope")]) == 2
    assert "no run_anchors.sh there" in capsys.readouterr().err
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"prompt": "hi"}\n')
    (tmp_path / "o.jsonl.part0").write_text("")
    assert main(["generate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "left from an interrupted data-parallel run" in capsys.readouterr().err


def test_a_thread_count_below_one_is_refused_in_one_line(capsys):
    for cmd, n in ((["eval", "--quick"], "-1"), (["bench"], "0"), (["generate", "--prompt", "x"], "-2")):
        assert main([*cmd, "--threads", n]) == 2
        err = capsys.readouterr().err
        assert f"--threads {n}: give a positive number" in err and err.count("\n") == 1, err


def test_generate_errors_are_clean(tiny_folder, capsys):
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "", "--max-new-tokens", "4"]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_folder), "--policy", "nope", "--prompt", "x"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "x " * 1100, "--max-new-tokens", "4"]) == 2
    assert "context window of 1024" in capsys.readouterr().err
    assert main(["generate", "--model", "/no/such/model", "--prompt", "x"]) == 2
    assert "never downloads" in capsys.readouterr().err


def test_bench_writes_csv_and_png(tiny_folder, tmp_path):
    out = tmp_path / "b.csv"
    assert main(["bench", "--model", str(tiny_folder), "--contexts", "64,128", "--new-tokens", "4",
                 "--out", str(out)]) == 0
    import csv

    rows = list(csv.DictReader(out.open()))
    assert {r["policy"] for r in rows} == {"hf", "dense"}
    assert len(rows) == 4 and all(float(r["decode_tok_s"]) > 0 for r in rows)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_bench_overhead_columns_compiled_baseline_and_anchors(tiny_folder, tmp_path, monkeypatch, capsys):
    """Every accel row carries its decode path, the bandwidth measured after it and the step's cost beyond the
    bytes it read; hf-compile runs transformers' static cache under torch.compile; --anchors merges the rows a
    run_anchors.sh prints (here a stand-in script) and says in one line why it skipped when nothing is built."""
    import csv

    script_dir = tmp_path / "anchors"
    script_dir.mkdir()
    (script_dir / "run_anchors.sh").write_text(
        "echo '# a comment'\necho runtime,weights_dtype,kv_dtype,batch,context,decode_tok_s\n"
        "echo \"llamacpp,F32,F16,1,$CTX_B1,$NGEN.5\"\n"
        "echo llamacpp,F32,F16,8,4096,20.0\n")  # a batch this run did not ask for (the script's own default grid)
    monkeypatch.setenv("ANCHORS_DIR", str(tmp_path / "built"))
    out = tmp_path / "o.csv"
    args = ["bench", "--model", str(tiny_folder), "--contexts", "64", "--new-tokens", "3", "--anchors",
            str(script_dir), "--out", str(out)]
    assert main(args + ["--policies", "dense"]) == 0
    assert "anchors skipped: nothing built under" in capsys.readouterr().err
    (tmp_path / "built").mkdir()
    assert main(args + ["--policies", "hf-compile,dense"]) == 0  # dense after the compiled run: forward restored
    rows = {r["policy"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"hf", "dense", "hf-compile", "anchor:llamacpp F32/F16"}
    assert rows["dense"]["decode_path"] == "fused" and rows["hf"]["decode_path"] == "hf"
    assert rows["hf-compile"]["decode_path"] == "hf-compiled" and float(rows["hf-compile"]["decode_tok_s"]) > 0
    d = rows["dense"]
    step, limit, over = float(d["decode_step_ms"]), float(d["bw_limit_ms"]), float(d["overhead_ms"])
    assert limit > 0 and abs(step - limit - over) < 0.02 and float(d["read_bw_gbs"]) > 0
    a = rows["anchor:llamacpp F32/F16"]
    assert (a["context"], a["batch"], a["decode_tok_s"]) == ("64", "1", "3.5")  # the script saw the grid
    assert float(d["speedup_vs_best_anchor"]) == round(float(d["decode_tok_s"]) / 3.5, 3)


def test_bench_repeats_report_the_median_run(tiny_folder, tmp_path, monkeypatch, capsys):
    """--repeats N runs the grid N times and keeps, per row, the run with the median step (every run listed in
    step_ms_all); the anchors script gets REPS=N; a count below 1 is refused before the model loads."""
    import csv

    script_dir = tmp_path / "anchors"
    script_dir.mkdir()
    (script_dir / "run_anchors.sh").write_text("echo \"llamacpp,F16,F16,1,$CTX_B1,$REPS\"\n")
    monkeypatch.setenv("ANCHORS_DIR", str(tmp_path))
    monkeypatch.delenv("REPS", raising=False)
    out = tmp_path / "r.csv"
    assert main(["bench", "--model", str(tiny_folder), "--contexts", "64", "--new-tokens", "3", "--repeats", "3",
                 "--anchors", str(script_dir), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["policy"] for r in rows) == ["anchor:llamacpp F16/F16", "dense", "hf"]
    for r in rows:
        if r["policy"].startswith("anchor"):
            assert r["decode_tok_s"] == "3.0"  # the script ran with REPS=3
            continue
        runs = [float(x) for x in r["step_ms_all"].split()]
        assert r["repeats"] == "3" and len(runs) == 3
        assert float(r["decode_step_ms"]) == pytest.approx(sorted(runs)[1], abs=0.006)
    from accel.cli.bench import _median_runs

    fake = [{"context": 8, "context_requested": 8, "batch": 1, "policy": p, "decode_step_ms": ms, "run": i}
            for i, (p, ms) in enumerate([("a", 5.0), ("b", 1.0), ("a", 3.0), ("b", 2.0), ("a", 4.0), ("b", 9.0)])]
    med = {r["policy"]: r for r in _median_runs(fake, 3)}
    assert (med["a"]["run"], med["a"]["step_ms_all"]) == (4, "5.00 3.00 4.00")
    assert (med["b"]["run"], med["b"]["repeats"]) == (3, 3)
    assert _median_runs(fake[:4], 2)[0]["run"] == 0  # even count: the upper middle run
    # rows of other batches and other requested contexts (two clipped to one prompt length) stay apart
    other = [{**r, "batch": 2, "run": 10 + r["run"]} for r in fake] + [{**r, "context_requested": 9} for r in fake]
    groups = {(r["context_requested"], r["batch"], r["policy"]): r["run"] for r in _median_runs(fake + other, 3)}
    assert groups == {(8, 1, "a"): 4, (8, 1, "b"): 3, (8, 2, "a"): 14, (8, 2, "b"): 13, (9, 1, "a"): 4, (9, 1, "b"): 3}
    capsys.readouterr()
    assert main(["bench", "--model", str(tiny_folder), "--repeats", "0", "--out", str(out)]) == 2
    assert "--repeats 0" in capsys.readouterr().err


def test_bench_batches_and_synthetic_kv(tiny_folder, tmp_path):
    import csv

    out = tmp_path / "s.csv"
    assert main(["bench", "--model", str(tiny_folder), "--contexts", "96", "--batch", "1,2", "--new-tokens", "3",
                 "--synthetic-kv", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {(r["policy"], r["batch"]) for r in rows} == {(p, b) for p in ("hf", "dense") for b in ("1", "2")}
    for r in rows:
        assert r["synthetic_kv"] == "True" and r["prefill_s"] == ""
        assert float(r["peak_rss_mb"]) > 0 and float(r["decode_tok_s"]) > 0
    dense2 = [r for r in rows if r["policy"] == "dense" and r["batch"] == "2"][0]
    # KV held: 2 layers x batch 2 x 2 KV heads x (prompt + generated - 1) tokens x 16 dims x K+V x fp32
    assert float(dense2["kv_held_mb"]) == round(2 * 2 * 2 * (int(dense2["context"]) + 2) * 16 * 2 * 4 / 1e6, 2)
    assert dense2["speedup_vs_accel_dense"] == "1.0"


def test_bench_distinct_prompts_give_each_row_its_own_passage(tiny_folder, tmp_path, capsys):
    """``--prompts distinct``: every row of a batch its own passage of the essays, all of one length (no padding);
    the CSV says which prompts ran; with --synthetic-kv (which replaces the prompts' K/V) it is refused."""
    import csv

    from accel.cli.bench import _distinct_prompts
    from accel.cli.common import load_model

    _, tok = load_model(str(tiny_folder), "float32")
    enc = _distinct_prompts(tok, 80, 3)
    ids = enc["input_ids"]
    assert ids.shape[0] == 3 and abs(ids.shape[1] - 80) <= 2 and bool(enc["attention_mask"].all())
    assert len({tuple(r.tolist()) for r in ids}) == 3  # three different prompts
    out = tmp_path / "d.csv"
    assert main(["bench", "--model", str(tiny_folder), "--contexts", "96", "--batch", "2", "--new-tokens", "3",
                 "--prompts", "distinct", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["policy"] for r in rows} == {"hf", "dense"} and all(r["prompts"] == "distinct" for r in rows)
    capsys.readouterr()
    assert main(["bench", "--model", str(tiny_folder), "--prompts", "distinct", "--synthetic-kv",
                 "--out", str(out)]) == 2
    assert "--prompts distinct" in capsys.readouterr().err


def test_plan_command_writes_a_loadable_plan_and_picture(tiny_folder, tmp_path, capsys):
    from accel.plan import Plan

    out = tmp_path / "p.json"
    assert main(["plan", "--model", str(tiny_folder), "--policy", "hylra", "--out", str(out), "--tokens", "512",
                 "--steps", "16", "--sparsity", "0.5", "--computed-ratio", "0.5"]) == 0
    p = Plan.load(out)
    assert p.policy == "hylra" and p.num_layers == 2 and p.provenance["command"].startswith("accel ")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "layers: 0:" in capsys.readouterr().out
    assert main(["plan", "--model", str(tiny_folder), "--policy", "delta", "--out", str(tmp_path / "d.json")]) == 0
    assert Plan.load(tmp_path / "d.json").policy == "delta"
    # a policy without a calibrator writes its default plan, built with --set (here Quest's dense first layers)
    assert main(["plan", "--model", str(tiny_folder), "--policy", "quest", "--set", "dense_layers=1", "--out",
                 str(tmp_path / "q.json")]) == 0
    assert [lp.mode for lp in Plan.load(tmp_path / "q.json").layers] == ["full", "quest"]


def test_policy_lists_split_outside_brackets():
    from accel.cli.common import split_policies

    assert split_policies("dense, delta@delta_layers=[2,15,23],snapkv@budget_ratio=0.25") == [
        "dense", "delta@delta_layers=[2,15,23]", "snapkv@budget_ratio=0.25"]


INPUT_ERRORS = [
    (["generate"], "give --prompt"),
    (["generate", "--prompt-file", "/no/such/file"], "--prompt-file '/no/such/file' does not exist"),
    (["generate", "--input", "/no/such.jsonl"], "--input '/no/such.jsonl' does not exist"),
    (["generate", "--input", "{bad}"], "not valid JSON"),
    (["generate", "--input", "{noprompt}"], "needs a non-empty string 'prompt'"),
    (["generate", "--input", "{dupid}"], "appears twice"),
    (["generate", "--prompt", "hi", "--policy", "nope"], "unknown policy 'nope'"),
    (["generate", "--prompt", "hi", "--policy", "snapkv", "--set", "bogus=1"], "has no option(s) ['bogus']"),
    (["generate", "--prompt", "hi", "--policy", "quest", "--set", "topk_ratio=abc"],
     "quest: topk_ratio must be a number (float or None), got 'abc'"),
    (["generate", "--prompt", "hi", "--policy", "snapkv", "--set", "budget_ratio=x"], "budget_ratio must be a number"),
    (["eval", "--policies", "hylra@topk_ratio=x"], "hylra: topk_ratio must be a number"),
    (["generate", "--prompt", "hi", "--plan", "/no/plan.json"], "--plan '/no/plan.json' does not exist"),
    (["generate", "--prompt", "hi", "--plan", "{bad}"], "plan: not valid JSON"),
    (["generate", "--prompt", "hi", "--policy", "hylra", "--plan", "{badmode}"],
     "layers[0].mode: 'sparce' is not a mode policy 'hylra' executes"),
    (["bench", "--contexts", "1k"], "--contexts takes comma-separated integers"),
    (["bench", "--policies", "dense,nope"], "unknown policy 'nope'"),
    (["eval", "--tasks", "passkey,foo"], "unknown --tasks foo"),
    (["eval", "--depths", "2"], "--depths takes comma-separated fractions"),
    (["eval", "--policies", "hylra@topk=x"], "topk must be"),
    (["plan", "--policy", "nope", "--out", "x.json"], "unknown policy 'nope'"),
    (["plan", "--policy", "hylra", "--reduce", "max", "--out", "x.json"], "--reduce does not apply to 'hylra'"),
    (["plan", "--policy", "delta", "--sparsity", "0.5", "--out", "x.json"], "'delta' has no calibrator"),
    (["plan", "--policy", "quest", "--set", "bogus=1", "--out", "x.json"], "has no option(s) ['bogus']"),
    (["plan", "--policy", "moa", "--densities", "a,b", "--out", "x.json"], "--densities takes comma-separated numbers"),
]


@pytest.mark.parametrize("argv,words", INPUT_ERRORS)
def test_input_errors_are_one_line_rc2_before_the_model_loads(argv, words, tmp_path, capsys, monkeypatch):
    import importlib

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    for mod in ("generate", "bench", "evaluate", "plan"):  # each command binds load_model when its module is imported
        monkeypatch.setattr(importlib.import_module(f"accel.cli.{mod}"), "load_model", no_load)
    files = {"{badmode}": '{"schema_version": 1, "policy": "hylra", "num_layers": 1, "layers": [{"mode": "sparce"}]}',
             "{bad}": "not json\n", "{noprompt}": '{"id": 1}\n', "{dupid}": '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n'}
    args = []
    for a in argv:
        if a in files:
            p = tmp_path / "f.jsonl"
            p.write_text(files[a])
            a = str(p)
        args.append(a)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("accel: error:") and "\n" not in err and "Traceback" not in err
    assert words in err, err


def test_eval_quick_refuses_the_options_it_replaces(capsys):
    """--quick brings its own tasks, contexts, samples and lm tokens: giving one of them too is refused in one line
    (a typo in --tasks would otherwise pass silently), before the model loads."""
    assert main(["eval", "--quick", "--tasks", "passkee"]) == 2
    err = capsys.readouterr().err
    assert "--quick sets its own" in err and "--tasks" in err and err.count("\n") == 1, err
    assert main(["eval", "--quick", "--samples", "5", "--contexts", "1024"]) == 2
    err = capsys.readouterr().err
    assert "--contexts" in err and "--samples" in err, err


def test_first_use_of_a_named_model_says_it_converts_once(tmp_path, monkeypatch, capsys):
    """A named model not converted yet: the CLI says so in one line before the conversion's own progress bars."""
    import accel.models as models
    import accel.models.loader as loader
    from accel.cli.common import load_model

    monkeypatch.setattr(loader, "converted_path", lambda name: tmp_path / "models" / name)
    monkeypatch.setattr(models, "load", lambda name, dtype: ("model", "tok"))
    assert load_model("smollm2-135m") == ("model", "tok")
    err = capsys.readouterr().err
    assert "first use of smollm2-135m: converting" in err and err.count("\n") == 1, err
    (tmp_path / "models" / "smollm2-135m").mkdir(parents=True)
    (tmp_path / "models" / "smollm2-135m" / "config.json").write_text("{}")
    load_model("smollm2-135m")
    assert capsys.readouterr().err == ""


def test_option_errors_are_one_line_naming_the_fix(capsys):
    """argparse's own errors (an unknown option, a bad value) come out as one line, with the closest known options of
    that subcommand and where its options are listed, exit code 2; no usage block."""
    from accel.cli.main import main

    for argv, want in ((["bench", "--new-tokenz", "4"], "did you mean --new-tokens?"),
                       (["bench", "--dtype", "float64"], "invalid choice: 'float64'"),
                       (["eval", "--samples", "x"], "invalid int value: 'x'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and want in err and f"accel {argv[0]} --help" in err and "usage:" not in err, err
