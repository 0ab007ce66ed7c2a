"""Loading of the compiled extensions, with the reason recorded when one is unavailable.

``HAS_CPU_EXT`` / ``HAS_CUDA_EXT`` say whether ``accel._C`` / ``accel._C_cuda`` imported; the
``*_REASON`` strings say why not (shown by ``accel info``). Importing accel never fails because an
extension is missing: the pure-torch reference paths are used instead.
"""
from __future__ import annotations

import importlib

import torch  # noqa: F401  (the extensions link against libtorch; load it first)

_cpu = None
_cuda = None
CPU_EXT_REASON = ""
CUDA_EXT_REASON = ""

try:
    _cpu = importlib.import_module("accel._C")
except Exception as exc:  # ImportError, or an undefined-symbol OSError from a stale build
    CPU_EXT_REASON = (
        f"accel._C did not import ({type(exc).__name__}: {exc}); build it with "
        "`pip install --no-build-isolation -e .` (needs a C++17 compiler with OpenMP)"
    )
try:
    _cuda = importlib.import_module("accel._C_cuda")
except Exception as exc:
    CUDA_EXT_REASON = (
        f"accel._C_cuda not built ({type(exc).__name__}); it is built only where a CUDA build of torch "
        "and nvcc are present"
    )

HAS_CPU_EXT = _cpu is not None
HAS_CUDA_EXT = _cuda is not None


def cpu_ext():
    if _cpu is None:
        raise ImportError(CPU_EXT_REASON)
    return _cpu


def cuda_ext():
    if _cuda is None:
        raise ImportError(CUDA_EXT_REASON)
    return _cuda
