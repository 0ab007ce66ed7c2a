"""Decode-time linear layers on the CPU: accel's small-M GEMV kernel instead of BLAS.

A decode step multiplies one (or a few) token rows by every weight matrix of the model, so its cost
is streaming the weights from memory. Single-thread BLAS SGEMV reaches about half the machine's
read bandwidth here; ``accel._C.small_m_linear`` streams each weight row once through 16-lane FMAs
and reaches ~80% of it (bench/bench_linear.py). This module binds a replacement ``forward`` to each
``nn.Linear`` *instance* of a patched model (house style: instance binding, reversible; the class
and other models are untouched). Calls it cannot serve exactly (training, autograd, GPU tensors,
more than ``max_rows`` rows, other dtypes) go to ``torch.nn.functional.linear`` unchanged.

A bf16 layer (bf16 input and weight) is computed as torch computes it on the CPU -- fp32 accumulation of the bf16
products, the result rounded to bf16 once -- from the input widened to fp32; only the summation order differs.
On CPUs without bf16 instructions (no AVX512_BF16 / AMX: torch's bf16 matrix product there runs ~10x slower than
fp32, measured 8.8 against 82 GFLOP/s on the project's AVX2 machine) the same holds for the prefill's many-row
products: both operands are widened to fp32 and the product rounded back to bf16.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .. import _ext

MAX_ROWS = 8


_NATIVE_BF16: bool | None = None


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX flags; not Linux: assumed so)."""
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((ln for ln in f if ln.startswith("flags")), "").split()
            _NATIVE_BF16 = "avx512_bf16" in flags or "amx_bf16" in flags
        except OSError:
            _NATIVE_BF16 = True
    return _NATIVE_BF16


def _fast_forward(self, x):
    w = self.weight
    if (
        x.device.type == "cpu"
        and (x.dtype == torch.float32 or x.dtype == w.dtype == torch.bfloat16)
        and w.dtype in (torch.float32, torch.bfloat16)
        and not torch.is_grad_enabled()
        and x.dim() >= 1
        and 0 < x.numel() // max(1, x.shape[-1]) <= MAX_ROWS
        and w.stride(-1) == 1
    ):
        if torch.compiler.is_compiling():  # a node of the compiled graph (accel.ops.library)
            y = torch.ops.accel.small_m_linear(x.float(), w, self.bias)
        else:
            y = _ext.cpu_ext().small_m_linear(x.float(), w, self.bias, 0)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    if (x.dtype == w.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not native_bf16()):
        b = self.bias
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)
    return F.linear(x, w, self.bias)


def bind_fast_linear(modules) -> list[torch.nn.Linear]:
    """Bind the fast forward to each ``nn.Linear`` among ``modules``; returns those bound."""
    if not _ext.HAS_CPU_EXT:
        return []
    from ..ops.library import ensure_ops

    ensure_ops()
    bound = []
    for m in modules:
        if type(m) is torch.nn.Linear and "forward" not in m.__dict__:
            m.forward = types.MethodType(_fast_forward, m)
            bound.append(m)
    return bound


def unbind_fast_linear(bound) -> None:
    for m in bound:
        m.__dict__.pop("forward", None)
