"""accel's C++ decode kernels as ``torch.library`` custom ops, so ``torch.compile`` traces through them.

Dynamo cannot trace a pybind11 function: every call to ``accel._C`` in a compiled forward would break the graph
(about two breaks per layer). Registered as custom ops with fake (meta) implementations, the kernels become single
nodes of the compiled graph: the fake implementation gives the output's shape and dtype without running anything.

The ops are used only while Dynamo traces (``torch.compiler.is_compiling()``); eager calls go to the extension
directly, which avoids the dispatcher's per-call overhead (a decode step makes ~200 such calls). Registration
happens on first use, never at import (``ensure_ops``).
"""
from __future__ import annotations

import torch

from .. import _ext

_done = False


def ensure_ops() -> bool:
    """Register ``accel::small_m_linear`` and ``accel::decode_attention`` once; False without the C++ extension."""
    global _done
    if _done:
        return True
    if not _ext.HAS_CPU_EXT:
        return False

    @torch.library.custom_op("accel::small_m_linear", mutates_args=(), device_types="cpu")
    def small_m_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _ext.cpu_ext().small_m_linear(x, w, bias, 0)

    @small_m_linear.register_fake
    def _(x, w, bias):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.custom_op("accel::decode_attention", mutates_args=(), device_types="cpu")
    def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                         valid: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Dense (optionally masked) GQA decode attention, fp32 queries: out [B, H, Dv] fp32."""
        return _ext.cpu_ext().decode_attention(q, k, v, lengths, None, valid, scale, False, 0, None)[0]

    @decode_attention.register_fake
    def _(q, k, v, lengths, valid, scale):
        return q.new_empty(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32)

    _done = True
    return True
