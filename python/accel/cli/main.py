"""The `accel` command line: info, generate, bench, demo."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accel", description="inference-time acceleration for HF transformers models")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, policy_default="dense"):
        sp.add_argument("--model", default="smollm2-135m", help="named model (smollm2-135m, gemma3-270m) or a local folder")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        sp.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (default 1)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="policy option override (repeatable)")
        sp.add_argument("-v", "--verbose", action="store_true")

    sub.add_parser("info", help="versions, kernel backends and why any is unavailable, policies, models")

    g = sub.add_parser("generate", help="generate from a prompt, or offline over a JSONL file")
    common(g)
    g.add_argument("--policy", default="dense", help="policy name, 'a+b' composition, or 'hf' for unpatched")
    g.add_argument("--plan", default=None, help="plan JSON file from `accel plan`")
    g.add_argument("--prompt", default=None)
    g.add_argument("--prompt-file", default=None)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--input", default=None, help="JSONL with one {'id', 'prompt'} per line (batch mode)")
    g.add_argument("--output", default=None, help="JSONL output (appended; existing ids are skipped = resumable)")
    g.add_argument("--batch-size", type=int, default=4)

    b = sub.add_parser("bench", help="decode tokens/s and prefill time vs context: unpatched HF and policies")
    common(b)
    b.add_argument("--policies", default="dense", help="comma-separated accel policies (HF baseline always runs)")
    b.add_argument("--contexts", default="1024,4096,8192")
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--out", default="bench/results/decode.csv")

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
        else:
            from .demo import run
        return run(args)
    except (AccelError, UnsupportedModelError) as exc:
        print(f"accel: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
