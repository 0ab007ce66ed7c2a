"""Shared CLI helpers: argument parsing of overrides, model loading, generation with timing."""
from __future__ import annotations

import logging
import sys

import torch


from ..eval.runner import BASELINE, patch_for  # noqa: F401  (the CLI commands take them from here)


def parse_overrides(items: list[str] | None) -> dict:
    from ..policies.registry import parse_options

    return parse_options(items, "--set")


def split_policies(text: str) -> list[str]:
    """Split a ``--policies`` list on the commas outside brackets, so list-valued inline options work:
    ``"dense,delta@delta_layers=[2,15,23]"`` -> ``["dense", "delta@delta_layers=[2,15,23]"]``."""
    out, depth, cur = [], 0, []
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [p.strip() for p in out if p.strip()]


def setup(args) -> None:
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            from ..errors import InputError

            raise InputError(f"--threads {threads}: give a positive number of threads (1 by default)")
        torch.set_num_threads(threads)


def check_policy_specs(specs: list[str], overrides: dict) -> None:
    """Build every policy of ``specs`` once without a model, so an unknown policy or option is reported before the
    model loads (8-15 s). The unpatched baseline and TPLA / visual policies are checked by name and options."""
    from ..errors import AccelError
    from ..policies.registry import get_policy_class, make_policy, split_spec

    for spec in specs:
        if spec == BASELINE:
            continue
        parts = [p.strip() for p in spec.split("+") if p.strip()]
        names = [split_spec(p)[0] for p in parts]
        classes = [get_policy_class(n) for n in names]  # unknown names raise here
        if any(getattr(c, "kind", "") == "visual" for c in classes) or "tpla" in names:
            for part, cls in zip(parts, classes):
                opts = split_spec(part)[1]
                mine = {k.split(".", 1)[1] if "." in k else k: v for k, v in overrides.items()
                        if "." not in k or k.split(".", 1)[0] == cls.name}
                if hasattr(cls, "from_overrides") and len(parts) == 1:
                    cls.from_overrides(**{**mine, **opts})
            continue
        try:
            make_policy(spec, dict(overrides))
        except TypeError as exc:  # an option the policy does not have
            raise AccelError(f"policy {spec!r}: {exc}") from None


def int_list(text: str, what: str, minimum: int = 1) -> list[int]:
    """``"1024,4096"`` -> ``[1024, 4096]``; one line naming the flag otherwise."""
    from ..errors import InputError

    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} takes comma-separated integers, got {text!r}") from None
    if not vals or any(v < minimum for v in vals):
        raise InputError(f"{what} takes comma-separated integers >= {minimum}, got {text!r}")
    return vals


def check_file(path: str | None, what: str) -> None:
    """A named input file must exist and be readable: one line naming it otherwise (before the model loads)."""
    import os

    from ..errors import InputError

    if path is None:
        return
    if not os.path.isfile(path):
        raise InputError(f"{what} {path!r} does not exist (or is not a file); give the path of an existing file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path!r} is not readable; check its permissions")


def load_model(name: str, dtype: str = "float32", tp_plan: str | None = None):
    """``(model, tokenizer)`` of a named model, a local folder or a random MLA config. ``tp_plan`` (under torchrun,
    the process group initialised): transformers' own tensor parallelism, each rank holding its slice of the weights
    (rank 0 converts a named model on first use while the others wait)."""
    from ..models import load
    from ..research.mla_models import RANDOM_MODELS

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "fp32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if name in RANDOM_MODELS:  # random-weight DeepSeek-V3 configs for TPLA (no MLA weights install here)
        from ..research.mla_models import ByteTokenizer, random_mla

        return random_mla(RANDOM_MODELS[name]).to(dt), ByteTokenizer()
    from ..models.loader import NAMED_MODELS, converted_path

    if name in NAMED_MODELS and not (converted_path(name) / "config.json").exists():
        print(f"first use of {name}: converting its packaged GGUF weights to {converted_path(name)} (once; 10-30 s)",
              file=sys.stderr)
    if tp_plan is not None:
        import torch.distributed as dist

        from ..models.loader import local_path

        if dist.get_rank() == 0:
            local_path(name)
        dist.barrier()
        return load(name, dtype=dt, tp_plan=tp_plan)
    return load(name, dtype=dt)


def tp_setup(args, policy: str, overrides: dict) -> int:
    """``--tp N`` (N > 1): this process is one of N torchrun ranks. With ``tpla`` (MLA models) each rank runs one of
    TPLA's N latent shards; with any other policy the model is loaded with transformers' own tensor parallelism
    (``tp_plan="auto"``, set on ``args.tp_plan`` for ``load_model``) and accel runs on each rank's heads, its cache
    holding their slice (policies that combine heads are refused by ``accel.patch``). Call before the model loads;
    returns this process's rank (0 without --tp)."""
    tp = int(getattr(args, "tp", 1) or 1)
    args.tp_plan = None
    if tp <= 1:
        return 0
    from ..errors import AccelError
    from ..research.mla_models import RANDOM_MODELS

    tpla = policy.split("@")[0] == "tpla"
    if not tpla and getattr(args, "model", None) in RANDOM_MODELS:
        raise AccelError(f"--tp {tp} on {args.model} runs tensor-parallel TPLA: use --policy/--policies tpla (got "
                         f"{policy!r})")
    import os

    if "WORLD_SIZE" not in os.environ:
        raise AccelError(f"--tp {tp} needs one process per rank: launch with `torchrun --standalone --nproc-per-node "
                         f"{tp} -m accel ...`")
    from ..tpla import init_distributed

    rank, world = init_distributed()
    if world != tp:
        raise AccelError(f"--tp {tp} but torchrun started {world} ranks; use --nproc-per-node {tp}")
    if tpla:
        overrides.update(shards=tp, execution="distributed")
    else:
        args.tp_plan = "auto"
    return rank


def timed_generate(model, tok, prompts: list[str], max_new_tokens: int, force_length: bool = False, **gen):
    """Run ``model.generate`` on a left-padded batch; returns (texts, TimingStreamer, n_prompt_tokens)."""
    from ..errors import InputError
    from ..perf import TimingStreamer

    if any(not p for p in prompts):
        raise InputError("empty prompt: give a non-empty --prompt / --prompt-file / JSONL 'prompt'")
    enc = tok(prompts, return_tensors="pt", padding=True)
    n_prompt = enc["input_ids"].shape[1]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and n_prompt + max_new_tokens > limit:
        raise InputError(
            f"prompt ({n_prompt} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's context window "
            f"of {limit} tokens; shorten the prompt or lower --max-new-tokens"
        )
    st = TimingStreamer()
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, streamer=st)
    if force_length:
        kw["min_new_tokens"] = max_new_tokens
    kw.update(gen)
    with torch.no_grad():
        out = model.generate(**enc, **kw)
    texts = tok.batch_decode(out[:, n_prompt:], skip_special_tokens=True)
    return texts, st, n_prompt


def write_csv(path, rows: list[dict]):
    """Write ``rows`` (dicts with the same keys) as a CSV at ``path``, creating its folder; returns the path."""
    import csv
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return out
