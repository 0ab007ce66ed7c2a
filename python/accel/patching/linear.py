"""Decode-time linear layers on the CPU: accel's small-M GEMV kernel instead of BLAS.

A decode step multiplies one (or a few) token rows by every weight matrix of the model, so its cost
is streaming the weights from memory. Single-thread BLAS SGEMV reaches about half the machine's
read bandwidth here; ``accel._C.small_m_linear`` streams each weight row once through 16-lane FMAs
and reaches ~80% of it (bench/bench_linear.py). This module binds a replacement ``forward`` to each
``nn.Linear`` *instance* of a patched model (house style: instance binding, reversible; the class
and other models are untouched). Calls it cannot serve exactly (training, autograd, GPU tensors,
more than ``max_rows`` rows, other dtypes) go to ``torch.nn.functional.linear`` unchanged.

A bf16 or fp16 layer (input and weight of that dtype) is computed as torch computes it on the CPU -- fp32 accumulation of the bf16
products, the result rounded to bf16 once -- from the input widened to fp32; only the summation order differs.
On CPUs without bf16 instructions (no AVX512_BF16 / AMX: torch's bf16 matrix product there runs ~10x slower than
fp32, measured 8.8 against 82 GFLOP/s on the project's AVX2 machine; for fp16, without AVX512_FP16 / AMX_FP16) the
same holds for the prefill's many-row
products: both operands are widened to fp32 and the product rounded back to bf16, in blocks of output features (a
block's fp32 weights and outputs at a time, never the whole layer's).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .. import _ext

MAX_ROWS = 8
_HALF = (torch.bfloat16, torch.float16)


_NATIVE_BF16: bool | None = None


#: output features per widened block of a bf16 product
WIDEN_BLOCK = 4096


def _x86_flags() -> list[str] | None:
    """The CPU flags of /proc/cpuinfo on x86 Linux; None elsewhere or when unreadable (16-bit products are then assumed
    native, and torch's own are kept)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), "").split() or None
    except OSError:
        return None


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: the AVX512_BF16 or AMX flags on x86 Linux; anything else (other
    systems, other architectures) is assumed to, and keeps torch's bf16 product."""
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        flags = _x86_flags()
        _NATIVE_BF16 = flags is None or "avx512_bf16" in flags or "amx_bf16" in flags
    return _NATIVE_BF16


_NATIVE_FP16: bool | None = None


def native_fp16() -> bool:
    """Whether this CPU multiplies fp16 natively (the AVX512_FP16 or AMX_FP16 flags); as ``native_bf16``."""
    global _NATIVE_FP16
    if _NATIVE_FP16 is None:
        flags = _x86_flags()
        _NATIVE_FP16 = flags is None or "avx512_fp16" in flags or "amx_fp16" in flags
    return _NATIVE_FP16


def widened_half_linear(x, w, b):
    """``F.linear`` of bf16 (or fp16) operands computed in fp32 and rounded to their dtype once, WIDEN_BLOCK output
    features at a time."""
    x32 = x.float()
    N = w.shape[0]
    if N <= WIDEN_BLOCK:
        return F.linear(x32, w.float(), None if b is None else b.float()).to(x.dtype)
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    for n0 in range(0, N, WIDEN_BLOCK):
        n1 = min(N, n0 + WIDEN_BLOCK)
        out[..., n0:n1] = F.linear(x32, w[n0:n1].float(), None if b is None else b[n0:n1].float())
    return out


def _fast_forward(self, x):
    w = self.weight
    if (
        x.device.type == "cpu"
        and (x.dtype == torch.float32 or (x.dtype == w.dtype and x.dtype in _HALF))
        and w.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not torch.is_grad_enabled()
        and x.dim() >= 1
        and 0 < x.numel() // max(1, x.shape[-1]) <= MAX_ROWS
        and w.stride(-1) == 1
    ):
        if torch.compiler.is_compiling():  # a node of the compiled graph (accel.ops.library)
            y = torch.ops.accel.small_m_linear(x.float(), w, self.bias)
        else:
            # a bf16 x holds bf16 values: the kernel may multiply them as bf16 (exact; vdpbf16ps where the CPU has it)
            y = _ext.cpu_ext().small_m_linear(x.float(), w, self.bias, 0, x.dtype == torch.bfloat16)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    if (x.dtype == w.dtype and x.dtype in _HALF and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not (native_bf16() if x.dtype == torch.bfloat16 else native_fp16())):
        return widened_half_linear(x, w, self.bias)
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
