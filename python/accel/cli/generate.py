"""`accel generate`: one prompt, or offline batch generation over a JSONL file (resumable).

Under torchrun without ``--tp``, ``--input`` runs data-parallel: every rank loads the model, takes every world-th
prompt still to do, and appends its completions to its own part file ``<output>.part<rank>``; when all ranks are
done, rank 0 appends the parts' rows to ``<output>`` in input order and deletes the parts. An interrupted run
resumes: ids already in the output or in any part file are not generated again (whatever the number of ranks), and
the next finished run merges them.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import AccelError
from .common import (BASELINE, check_file, check_policy_specs, load_model, parse_overrides, patch_for, setup,
                     timed_generate, tp_setup)

JSONL_FORMAT = ('one JSON object per line: {"id": <any, optional: the 0-based line index>, "prompt": "<text>", '
                '"max_new_tokens": <int, optional>}')


def _read_jsonl(path: Path) -> list[dict]:
    rows, seen = [], set()
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AccelError(f"{path}:{i + 1}: not valid JSON ({exc.msg}); expected {JSONL_FORMAT}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise AccelError(f"{path}:{i + 1}: needs a non-empty string 'prompt'; expected {JSONL_FORMAT}")
        mnt = row.get("max_new_tokens")
        if mnt is not None and (not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1):
            raise AccelError(f"{path}:{i + 1}: 'max_new_tokens' must be a positive integer, got {mnt!r}")
        row.setdefault("id", i)
        if row["id"] in seen:
            raise AccelError(f"{path}:{i + 1}: id {row['id']!r} appears twice; ids must be unique (resuming skips "
                             "ids already in the output)")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise AccelError(f"{path}: no prompts; expected {JSONL_FORMAT}")
    return rows


def run(args) -> int:
    setup(args)
    # every input error is reported before the model loads (8-15 s)
    given = [f for f, v in (("--prompt", args.prompt), ("--prompt-file", args.prompt_file), ("--input", args.input))
             if v is not None]
    if len(given) > 1:
        raise AccelError(f"{' and '.join(given)} given together; give exactly one of --prompt, --prompt-file, --input")
    if not args.input and not args.prompt_file and args.prompt is None:
        raise AccelError("give --prompt TEXT, --prompt-file FILE, or --input prompts.jsonl")
    check_file(args.prompt_file, "--prompt-file")
    check_file(args.input, "--input")
    check_file(args.plan, "--plan")
    if args.max_new_tokens < 1:
        raise AccelError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    rows = _read_jsonl(Path(args.input)) if args.input else None
    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    if rows is None and not prompt:
        raise AccelError("empty prompt: give a non-empty --prompt / --prompt-file")
    overrides = parse_overrides(args.set)
    check_policy_specs([args.policy], overrides)
    if args.plan:
        from ..plan import Plan
        from ..policies.registry import get_policy_class, make_policy

        plan = Plan.coerce(args.plan)  # a malformed plan file is reported now
        names = [p.split("@")[0].strip() for p in args.policy.split("+")]
        # so are layer modes / head kinds the policy does not execute (the LM-only policies; TPLA and the visual
        # policies check their plans when they patch)
        if args.policy != BASELINE and not any(getattr(get_policy_class(n), "kind", "") in ("visual", "model")
                                               for n in names):
            make_policy(args.policy, dict(overrides)).check_plan(plan)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data_parallel = world > 1 and int(getattr(args, "tp", 1) or 1) <= 1
    if data_parallel and rows is None:
        raise AccelError(f"torchrun started {world} ranks without --tp: data-parallel generation shares the prompts of "
                         "--input prompts.jsonl among the ranks (give --input), and --tp N runs the model "
                         "tensor-parallel")
    if rows is not None and world <= 1 and _parts(_out_path(args)):
        raise AccelError(f"{_parts(_out_path(args))[0]} is left from an interrupted data-parallel run: rerun under "
                         "torchrun (any number of ranks) to finish and merge it into the output, or delete the part "
                         "files")
    if data_parallel:
        model, tok = load_model(args.model, args.dtype)
        return _data_parallel(args, model, tok, rows, overrides)
    rank = tp_setup(args, args.policy, overrides)
    model, tok = load_model(args.model, args.dtype, tp_plan=args.tp_plan)
    if rank != 0:  # tensor-parallel ranks other than 0 compute but do not print or write
        sys.stdout = open(os.devnull, "w")
    handle = patch_for(model, args.policy, overrides, plan=args.plan)
    try:
        if rows is not None:
            if rank != 0:
                args.output = os.devnull
            return _batch(args, model, tok, rows)
        texts, st, n_prompt = timed_generate(model, tok, [prompt], args.max_new_tokens)
        if rank != 0:
            return 0
        print(texts[0])
        n_new = st.decode_steps + 1
        from ..patching.tensor_parallel import tensor_parallel_size

        tp = tensor_parallel_size(model)
        where = f" on {tp} tensor-parallel ranks (transformers' tp_plan)" if tp > 1 else ""
        print(f"[{args.policy}]{where} prompt {n_prompt} tokens: prefill {st.prefill_s:.2f} s "
              f"({n_prompt / st.prefill_s:.1f} tok/s); decode {n_new} tokens at "
              f"{st.decode_steps / st.decode_s if st.decode_steps else float('nan'):.2f} tok/s", file=sys.stderr)
        return 0
    finally:
        if handle is not None:
            handle.remove()  # collective under --tp: every rank restores its weight slices together


def _written(path: Path) -> dict:
    """id -> row of every line accel wrote to ``path`` (empty if it does not exist)."""
    out = {}
    if path.exists():
        for j, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    row = json.loads(line)
                    out[_key(row["id"])] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise AccelError(f"{path}:{j + 1}: not a line accel wrote (JSON with an 'id'); give another "
                                     "--output or remove the file") from None
    return out


def _out_path(args) -> Path:
    return Path(args.output or (str(args.input) + ".out.jsonl"))


def _key(i):
    return json.dumps(i, sort_keys=True)  # ids may be any JSON value; compare them by their JSON text


def _parts(out_path: Path) -> list[Path]:
    import re

    pat = re.compile(re.escape(out_path.name) + r"\.part\d+")
    return sorted(p for p in out_path.parent.glob(out_path.name + ".part*") if pat.fullmatch(p.name))


def _data_parallel(args, model, tok, rows, overrides) -> int:
    """This rank's share of ``rows`` into its part file, then (rank 0) the merge into the output."""
    import torch.distributed as dist

    from ..tpla import init_distributed

    rank, world = init_distributed("gloo")
    out_path = _out_path(args)
    done = set(_written(out_path))
    for part in _parts(out_path):
        done |= set(_written(part))
    dist.barrier()  # every rank has read what is done before any rank writes
    # shares by position in the input, so every rank's share is the same whatever it read
    todo = [r for i, r in enumerate(rows) if i % world == rank and _key(r["id"]) not in done]
    handle = patch_for(model, args.policy, overrides, plan=args.plan)
    try:
        args.output = str(out_path) + f".part{rank}"
        _batch(args, model, tok, todo, skip_done=False, quiet=rank != 0)
    finally:
        if handle is not None:
            handle.remove()
    dist.barrier()
    if rank == 0:
        have = _written(out_path)
        parts = _parts(out_path)
        new = {}
        for part in parts:
            new.update(_written(part))
        stray = sorted(set(new) - {_key(r["id"]) for r in rows})
        if stray:
            raise AccelError(f"the part files next to {out_path} hold ids that are not in {args.input} ({stray[0]}, ...): "
                             "they come from another input; nothing was merged (the part files are kept)")
        with out_path.open("a") as f:
            merged = [new[_key(r["id"])] for r in rows if _key(r["id"]) in new and _key(r["id"]) not in have]
            for row in merged:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for part in parts:
            part.unlink()
        print(f"merged {len(merged)} completions from {world} ranks into {out_path} ({len(have)} already there)",
              file=sys.stderr)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _batch(args, model, tok, rows, skip_done: bool = True, quiet: bool = False) -> int:
    from tqdm import tqdm

    out_path = _out_path(args)
    done = set(_written(out_path)) if skip_done else set()
    todo = [r for r in rows if _key(r["id"]) not in done]
    bs = max(1, args.batch_size)
    with out_path.open("a") as f, tqdm(total=len(todo), desc=f"generate [{args.policy}]", unit="prompt",
                                       disable=quiet) as bar:
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
    if not quiet:
        print(f"wrote {len(todo)} completions to {out_path} ({len(done)} already there)", file=sys.stderr)
    return 0
