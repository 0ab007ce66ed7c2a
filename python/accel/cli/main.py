"""The `accel` command line: info, generate, bench, eval, plan, calibrate-cost, demo."""
from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its errors as one line naming the fix (an unknown option: the closest known ones; any
    error: where the options are listed) instead of the usage block; exit code 2 as argparse's."""

    def parse_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message):
        hint = ""
        parser, prog = self, self.prog
        subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:  # the top-level parser reports a subcommand's unknown options: name that subcommand
            cmd = next((w for w in getattr(self, "_argv", []) if w in subs[0].choices), None)
            if cmd is not None:
                parser, prog = subs[0].choices[cmd], f"{self.prog} {cmd}"
        if message.startswith("unrecognized arguments:"):
            import difflib

            known = sorted({o for a in _all_actions(parser) for o in a.option_strings})
            unknown = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("-")]
            close = sorted({c for w in unknown for c in difflib.get_close_matches(w, known, n=3, cutoff=0.6)})
            if close:
                hint = f"; did you mean {', '.join(close)}?"
        where = prog if prog != "accel" else "accel <command>"
        self.exit(2, f"{prog}: error: {message}{hint} (options: {where} --help)\n")


def _all_actions(parser):
    """Every action of a parser and of its subcommands' parsers."""
    out = []
    for a in parser._actions:
        out.append(a)
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                out += _all_actions(sp)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="accel", description="inference-time acceleration for HF transformers models")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, policy_default="dense"):
        sp.add_argument("--model", default="smollm2-135m", help="named model (smollm2-135m, gemma3-270m, random-mla-tiny, random-mla-mid) or a local folder")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        sp.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (default 1)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="policy option override (repeatable)")
        sp.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel ranks (launch under `torchrun --standalone --nproc-per-node N -m "
                             "accel ...`): MLA models with policy tpla run TPLA's latent shards; other models load "
                             "with transformers' tensor parallelism (tp_plan=auto), each rank holding its heads' "
                             "slice of accel's cache; 1 = one process")
        sp.add_argument("-v", "--verbose", action="store_true")

    sub.add_parser("info", help="versions, kernel backends and why any is unavailable, policies, models")

    g = sub.add_parser("generate", help="generate from a prompt, or offline over a JSONL file")
    common(g)
    g.add_argument("--policy", default="dense", help="policy name, 'a+b' composition, or 'hf' for unpatched")
    g.add_argument("--plan", default=None, help="plan JSON file from `accel plan`")
    g.add_argument("--prompt", default=None)
    g.add_argument("--prompt-file", default=None)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--input", default=None,
                   help='JSONL, one object per line: {"id": any (optional, default the 0-based line index), "prompt": "text", '
                        '"max_new_tokens": int (optional)} (batch mode)')
    g.add_argument("--output", default=None, help="JSONL output (appended; existing ids are skipped = resumable)")
    g.add_argument("--batch-size", type=int, default=4)

    b = sub.add_parser("bench", help="decode tokens/s and prefill time vs context: unpatched HF and policies")
    common(b)
    b.add_argument("--policies", default="dense",
                   help="comma-separated accel policies (the HF baseline always runs; 'hf-compile' adds transformers' "
                        "static cache + torch.compile)")
    b.add_argument("--anchors", default=None, metavar="DIR",
                   help="also run the anchor runtimes (llama.cpp, vLLM, OpenVINO) with DIR/run_anchors.sh when they are "
                        "built (skipped with a one-line reason when not)")
    b.add_argument("--contexts", default="1024,4096,8192")
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--batch", default="1", help="batch size(s), comma-separated, e.g. 1,8 (8 = throughput mode)")
    b.add_argument("--repeats", type=int, default=1,
                   help="run the whole grid N times, policies alternated, and report each row's median run (all "
                        "runs' step times in step_ms_all); with N > 1 and REPS unset the anchors run with REPS=N "
                        "(run_anchors.sh's own default is 3; llama-bench rows are the mean of its runs)")
    b.add_argument("--synthetic-kv", action="store_true",
                   help="speed only: fill the cache with random K/V instead of running the prefill")
    b.add_argument("--prompts", choices=("same", "distinct"), default="same",
                   help="batch rows: the same essay prefix (default), or each row its own passage of the essays "
                        "(equal lengths; per-request policies such as flux's router then route rows differently)")
    b.add_argument("--out", default="accel_results/decode.csv", help="CSV to write (a PNG is written next to it)")

    e = sub.add_parser("eval", help="accuracy of unpatched vs accel policies on passkey / NIAH / RULER / perplexity")
    common(e)
    e.add_argument("--policies", default="dense", help="comma-separated accel policies (HF baseline always runs)")
    e.add_argument("--tasks", default="passkey,niah,ruler_niah_single_1,ruler_niah_multikey_1,ruler_niah_multivalue,ruler_vt,ruler_cwe,lm")
    e.add_argument("--contexts", default="1024,2048,4096")
    e.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths for passkey/niah (cycled over samples)")
    e.add_argument("--samples", type=int, default=20, help="samples per task and context")
    e.add_argument("--lm-tokens", type=int, default=128, help="held-out tokens scored by the lm task")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--speed-csv", default=None, help="CSV from `accel bench` for the accuracy-vs-speed plot")
    e.add_argument("--quick", action="store_true", help="a few samples at 512 tokens (smoke test, under a minute on "
                   "2 cores): its own tasks, contexts, samples and lm tokens, so it refuses --tasks, --contexts, "
                   "--samples and --lm-tokens")
    e.add_argument("--out", default="accel_results/eval.csv", help="summary CSV to write (per-sample CSV and PNG next to it)")

    pl = sub.add_parser("plan", help="make a plan for a policy: its calibrator on calibration text (hylra, duo, moa, tca) or "
                                          "training (flux's layer router) "
                                     "or its default plan")
    common(pl)
    pl.add_argument("--policy", default="hylra",
                    help="a policy with a calibrator (`accel info` lists them; e.g. hylra: profiler + layer DP, duo: "
                         "per-head scores, moa: per-head spans by MILP, tca: per-head quotas, flux: trains its layer router on the "
                         "frozen model, ~14 min for SmolLM2) or any other policy (its default plan, e.g. delta)")
    pl.add_argument("--out", required=True, help="plan JSON to write (a PNG picture is written next to it)")
    pl.add_argument("--png", default=None, help="picture path (default: the --out path with .png)")
    pl.add_argument("--tokens", type=int, default=None, help="tokens per calibration text (hylra 4096, duo 2048)")
    pl.add_argument("--n-texts", type=int, default=None, help="calibration texts (hylra 4 and duo 4 retrieval prompts, moa 2, tca 2; "
                                                                      "flux 48 training requests)")
    pl.add_argument("--steps", type=int, default=None, help="decode-step queries profiled per text (hylra 32, duo/moa 64)")
    pl.add_argument("--chunk", type=int, default=None, help="hylra: selection chunk the profiler emulates (16)")
    pl.add_argument("--preserved-ratio", type=float, default=None, help="hylra: profiled top-k as a fraction of the text (0.125)")
    pl.add_argument("--sink", type=int, default=None, help="hylra 16, duo 64")
    pl.add_argument("--recent", type=int, default=None, help="hylra 64, duo 256")
    pl.add_argument("--retrieval-fraction", type=float, default=None, help="duo: default share of retrieval heads (0.5)")
    pl.add_argument("--densities", default=None, help="moa: average densities to solve for, the first the default "
                                                      "(0.5,0.25,0.1)")
    pl.add_argument("--lengths", default=None, help="moa: profiled lengths (2048,4096); flux: training "
                                                   "request lengths (1024,2048)")
    pl.add_argument("--sparsity", type=float, default=None, help="hylra: rollback layers = ceil(L*(1-sparsity)) (0.91)")
    pl.add_argument("--computed-ratio", type=float, default=None, help="hylra: switch budget share of the DP (0.2)")
    pl.add_argument("--anchor-mode", default=None, choices=["full", "select"], help="hylra (full)")
    pl.add_argument("--data", default=None, choices=["essays", "retrieval", "mixed"],
                    help="hylra calibration text: plain essays or synthetic passkey/needle prompts (default retrieval); "
                         "auto: passkey/needle prompts (retrieval) or those and essays in turn (mixed)")
    pl.add_argument("--metric", default=None, choices=["overlap", "mass", "mass_min", "far_mass", "residual", "relative",
                                                       "lost_mass", "output"],
                    help="hylra: inter-layer similarity for the DP (mass_min; overlap = HyLRA/UCM's chunk overlap, mass); "
                         "duo: head score (far_mass; residual, relative); auto: a head's damage (lost_mass, output)")
    pl.add_argument("--reduce", default=None, choices=["max", "mean"],
                    help="duo: head score over the profiled steps; auto: damage over the scored queries (max)")
    pl.add_argument("--kv-budget", type=float, default=None,
                    help="auto: a target, the mean share of the prompt a full-attention KV head keeps (0.25 when no "
                         "target is given)")
    pl.add_argument("--speed", type=float, default=None,
                    help="auto: a target, a predicted decode speed-up over dense attention at --context/--batch "
                         "(needs this machine's cost model, `accel calibrate-cost`)")
    pl.add_argument("--max-ppl-increase", type=float, default=None,
                    help="auto: a target, the largest relative perplexity increase over dense (0.02: +2%%), from the "
                         "profile's measured curve; alone it asks for the fewest kept tokens, with --kv-budget or "
                         "--speed it bounds their least-damage plan")
    pl.add_argument("--ppl-texts", type=int, default=None,
                    help="auto: essay passages the profile's perplexity curve is measured on (3; 0: no curve)")
    pl.add_argument("--context", type=int, default=None, help="auto: the context a --speed target is for (4096)")
    pl.add_argument("--batch", type=int, default=None, help="auto: the batch size a --speed target is for (1)")
    pl.add_argument("--cost", default=None, help="auto: cost model JSON (default: the one shipped for this model and "
                                                 "machine, if any)")
    pl.add_argument("--from", dest="from_plan", default=None,
                    help="auto: solve from this auto plan's calibration profile instead of calibrating again ('shipped': the "
                         "profile accel ships for the model)")
    pl.add_argument("--explain", action="store_true", help="auto: print which layer and head got what and why")

    cc = sub.add_parser("calibrate-cost", help="measure the decode cost model of a model on this machine (versioned "
                                              "JSON + CSV + PNG of the fit)")
    cc.add_argument("--model", default="smollm2-135m", help="named model (smollm2-135m, gemma3-270m) or a local folder")
    cc.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    cc.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (default 1; the cost model holds "
                                                          "for this count only)")
    cc.add_argument("-v", "--verbose", action="store_true")
    cc.add_argument("--batches", default="1,4,8", help="batch sizes to measure; predictions interpolate between them "
                                                      "(default 1,4,8)")
    cc.add_argument("--contexts", default=None, help="per batch LOW,MID,HIGH contexts, e.g. '1:1024,4096,8000;"
                                                    "4:512,2048,4096' (default: 1024,4096,8000 at batch 1, "
                                                    "512,2048,4096 at any other batch)")
    cc.add_argument("--new-tokens", type=int, default=24, help="generated tokens per timed run; the median step counts "
                                                             "(default 24)")
    cc.add_argument("--passes", type=int, default=3, help="times the whole design is measured; each point's median "
                                                        "over them is fitted (default 3)")
    cc.add_argument("--free-kv-slopes", action="store_true",
                    help="fit the KV-compressed layers' per-key costs freely (default: at least a full layer's, which "
                         "reads its rows with the same kernel)")
    cc.add_argument("--out", required=True, help="cost model JSON to write (CSV and PNG of the fit next to it)")

    d = sub.add_parser("demo", help="passkey on the embedded SmolLM2: unpatched vs accel, answers and speed")
    common(d)
    d.add_argument("--policy", default="dense")
    d.add_argument("--context", type=int, default=3000)
    d.add_argument("--depth", type=float, default=0.5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-new-tokens", type=int, default=24)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import AccelError, UnsupportedModelError

    try:
        if args.cmd == "info":
            from .info import run
        elif args.cmd == "generate":
            from .generate import run
        elif args.cmd == "bench":
            from .bench import run
        elif args.cmd == "eval":
            from .evaluate import run
        elif args.cmd == "plan":
            from .plan import run
        elif args.cmd == "calibrate-cost":
            from .calibrate_cost import run
        else:
            from .demo import run
        return run(args)
    except (AccelError, UnsupportedModelError) as exc:
        print(f"accel: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder the command was given cannot be read or written
        print(f"accel: error: {exc.strerror or exc} ({exc.filename or ''}); check the path", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
