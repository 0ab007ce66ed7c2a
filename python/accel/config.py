"""The one place that reads ACCEL_* environment variables.

ACCEL_CACHE_DIR   where converted models and generated datasets are cached (default ~/.cache/accel)
ACCEL_BACKEND     force a kernel backend: auto | cpp | triton | cuda | torch (default auto)
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    p = Path(os.environ.get("ACCEL_CACHE_DIR", Path.home() / ".cache" / "accel"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def forced_backend() -> str:
    b = os.environ.get("ACCEL_BACKEND", "auto")
    if b == "auto":
        return b
    b = b.strip().lower()
    valid = ("auto", "cpp", "triton", "cuda", "torch")
    if b not in valid:
        from .errors import AccelError

        raise AccelError(f"ACCEL_BACKEND={b!r} is not one of {valid}; unset it or pick one of those")
    return b
