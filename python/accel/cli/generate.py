"""`accel generate`: one prompt, or offline batch generation over a JSONL file (resumable)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import AccelError
from .common import load_model, parse_overrides, patch_for, setup, timed_generate, tp_setup


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AccelError(f"{path}:{i + 1}: not valid JSON ({exc})") from None
        if "prompt" not in row:
            raise AccelError(f"{path}:{i + 1}: each line needs a 'prompt' field")
        row.setdefault("id", i)
        rows.append(row)
    return rows


def run(args) -> int:
    setup(args)
    model, tok = load_model(args.model, args.dtype)
    overrides = parse_overrides(args.set)
    rank = tp_setup(args, args.policy, overrides)
    if rank != 0:  # tensor-parallel ranks other than 0 compute but do not print or write
        sys.stdout = open(os.devnull, "w")
    handle = patch_for(model, args.policy, overrides, plan=args.plan)
    try:
        if args.input:
            if rank != 0:
                args.output = os.devnull
            return _batch(args, model, tok)
        if args.prompt_file:
            prompt = Path(args.prompt_file).read_text()
        elif args.prompt is not None:
            prompt = args.prompt
        else:
            raise AccelError("give --prompt, --prompt-file, or --input prompts.jsonl")
        texts, st, n_prompt = timed_generate(model, tok, [prompt], args.max_new_tokens)
        if rank != 0:
            return 0
        print(texts[0])
        n_new = st.decode_steps + 1
        print(f"[{args.policy}] prompt {n_prompt} tokens: prefill {st.prefill_s:.2f} s "
              f"({n_prompt / st.prefill_s:.1f} tok/s); decode {n_new} tokens at "
              f"{st.decode_steps / st.decode_s if st.decode_steps else float('nan'):.2f} tok/s", file=sys.stderr)
        return 0
    finally:
        if handle is not None:
            handle.remove()  # collective under --tp: every rank restores its weight slices together


def _batch(args, model, tok) -> int:
    from tqdm import tqdm

    rows = _read_jsonl(Path(args.input))
    out_path = Path(args.output or (str(args.input) + ".out.jsonl"))
    done = set()
    if out_path.exists():
        for line in out_path.read_text().splitlines():
            if line.strip():
                done.add(json.loads(line)["id"])
    todo = [r for r in rows if r["id"] not in done]
    bs = max(1, args.batch_size)
    with out_path.open("a") as f, tqdm(total=len(todo), desc=f"generate [{args.policy}]", unit="prompt") as bar:
        for i in range(0, len(todo), bs):
            chunk = todo[i : i + bs]
            texts, st, n_prompt = timed_generate(model, tok, [r["prompt"] for r in chunk],
                                                 int(chunk[0].get("max_new_tokens", args.max_new_tokens)))
            rate = len(chunk) * st.decode_steps / st.decode_s if st.decode_steps else float("nan")
            for r, t in zip(chunk, texts):
                f.write(json.dumps({"id": r["id"], "prompt": r["prompt"], "completion": t, "policy": args.policy,
                                    "prefill_s": round(st.prefill_s, 4), "decode_tok_s": round(rate, 3)}) + "\n")
            f.flush()
            bar.update(len(chunk))
    print(f"wrote {len(todo)} completions to {out_path} ({len(done)} already there)", file=sys.stderr)
    return 0
