"""RULER tasks generated with the generators of the `nvidia-long-context-eval` package (NVIDIA RULER,
Apache-2.0), offline.

The package's generators are scripts (argparse at import), so they run as subprocesses. Two offline
fixes are applied without touching the package: its NIAH generator calls NLTK's `sent_tokenize`,
which downloads data at run time, so a tiny `nltk` shim with a regex sentence splitter is put first on
PYTHONPATH; the tokenizer is the model's own local folder (`--tokenizer_type hf`). Prompts use RULER's
"base" model template (plain completion) plus the task's answer prefix, exactly as RULER's
`prepare.py` builds them. Scoring is RULER's `string_match_all`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..config import cache_dir
from ..errors import AccelError

# task name -> (generator script, tokens_to_generate); arguments come from the package's synthetic.yaml
RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "cwe")

_NLTK_SHIM = '''
import re
def sent_tokenize(text, language="english"):
    """Regex sentence splitter standing in for NLTK's punkt (which downloads data at run time)."""
    parts = re.split(r"(?<=[.!?])\\s+(?=[A-Z0-9\\"'(\\[])", text.strip())
    return [p for p in parts if p]
'''


def _pkg_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("long_context_eval")
    if spec is None:
        raise AccelError("the RULER generators need `nvidia-long-context-eval==26.3` (installed by scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def _task_config(task: str) -> tuple[str, dict, str, int]:
    import yaml

    root = _pkg_root()
    cfg = yaml.safe_load((root / "synthetic.yaml").read_text())
    key = {"vt": "vt", "cwe": "cwe"}.get(task, task)
    if key not in cfg:
        raise AccelError(f"RULER task {task!r} not in the package's synthetic.yaml ({sorted(cfg)})")
    gen = cfg[key]["task"]
    sys.path.insert(0, str(root / "data" / "synthetic"))
    try:
        import importlib

        consts = importlib.import_module("long_context_eval.data.synthetic.constants").TASKS
    finally:
        sys.path.pop(0)
    c = consts[gen]
    template = c["template"] + c.get("answer_prefix", "")
    return gen, cfg[key]["args"], template, int(c["tokens_to_generate"])


def generate_ruler(task: str, tokenizer_path: str | Path, max_seq_length: int, num_samples: int, seed: int = 42,
                   tag: str = "") -> list[dict]:
    """Samples ``{"input", "outputs", "length"}`` for ``task``; cached under the accel cache folder."""
    if task not in RULER_TASKS:
        raise AccelError(f"unknown RULER task {task!r}; available: {', '.join(RULER_TASKS)}")
    out_dir = cache_dir() / "datasets" / "ruler" / (tag or Path(tokenizer_path).name)
    out = out_dir / f"{task}_{max_seq_length}_{num_samples}_{seed}.jsonl"
    if out.exists():
        return [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    gen, args, template, tokens = _task_config(task)
    root = _pkg_root()
    script = root / "data" / "synthetic" / {"niah": "niah.py", "variable_tracking": "variable_tracking.py",
                                            "common_words_extraction": "common_words_extraction.py"}[gen]
    with tempfile.TemporaryDirectory() as tmp:
        shim = Path(tmp) / "shim" / "nltk"
        shim.mkdir(parents=True)
        (shim / "__init__.py").write_text("")
        (shim / "tokenize.py").write_text(_NLTK_SHIM)
        cmd = [sys.executable, str(script), "--save_dir", tmp, "--save_name", task, "--tokenizer_path",
               str(tokenizer_path), "--tokenizer_type", "hf", "--max_seq_length", str(max_seq_length),
               "--tokens_to_generate", str(tokens), "--num_samples", str(num_samples), "--random_seed", str(seed),
               "--template", template]
        for k, v in args.items():
            cmd += [f"--{k}", str(v)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")]),
               "TOKENIZERS_PARALLELISM": "false"}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        files = list(Path(tmp).rglob("*.jsonl"))
        if r.returncode != 0 or not files:
            raise AccelError(f"RULER generator for {task} failed: {r.stderr[-2000:]}")
        rows = [json.loads(x) for x in files[0].read_text().splitlines() if x.strip()]
    rows = [{"input": r["input"], "outputs": r["outputs"], "length": r["length"], "tokens_to_generate": tokens}
            for r in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def string_match_all(pred: str, refs: list[str]) -> float:
    """RULER's metric: the fraction of reference strings found in the prediction (case-insensitive)."""
    return sum(1.0 for r in refs if r.lower() in pred.lower()) / len(refs)
