"""Latent decode attention: the per-shard kernel interface of MLA / TPLA decode.

One query per sequence for ``H`` heads over a cache of latent rows ``[c_t | k^R_t]`` (``Dl`` latent values,
then ``Dr`` rotary-key values). Every head uses the whole row as its key and the latent part as its value:
DeepSeek-V2's absorbed MLA decode is this with the full latent, and a TPLA shard (Tang et al., arXiv
2508.15881) is this with the shard's slice of the latent, so simulated shards (one process) and real
tensor-parallel ranks (``torch.distributed``) call the same function.

Backends: the C++ kernel (``csrc/include/accel/cpu/latent_decode.h``) on CPU, the Triton kernel
(``accel.kernels.attention.latent``) and the CUDA kernel (``csrc/include/accel/cuda/latent_decode.cuh``) on GPUs,
and ``latent_decode_ref`` in plain torch, which every other backend is tested against.
"""
from __future__ import annotations

import math

import torch

from .. import _ext
from .attention import choose_backend, on_device


def latent_decode_ref(q, kv, lengths, dl, *, indices=None, valid=None, scale=None):
    """Plain-torch reference. Returns ``(out [B, H, Dl] fp32, lse [B, H] fp32)``; a sequence with no
    attended row gets zeros and ``lse = -inf``."""
    B, H, Dk = q.shape
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    out = torch.zeros(B, H, dl, dtype=torch.float32, device=q.device)
    lse = torch.full((B, H), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(lengths[b])
        rows = indices[b, :n].long() if indices is not None else torch.arange(n, device=kv.device)
        if valid is not None:
            rows = rows[valid[b, rows].bool()]
        if rows.numel() == 0:
            continue
        k = kv[b, rows].float()
        s = (q[b].float() @ k.T) * scale  # [H, n]
        m = s.max(-1, keepdim=True).values
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        out[b] = (p @ k[:, :dl]) / l
        lse[b] = (m + torch.log(l))[:, 0]
    return out, lse


def latent_decode(q, kv, lengths=None, dl: int | None = None, *, indices=None, valid=None, scale=None,
                  backend: str | None = None, num_threads: int = 0):
    """Decode attention over latent rows.

    Args:
        q: ``[B, H, Dl + Dr]`` queries: the absorbed latent query (``W_UK^T q^C``, the shard's slice) and the
            rotary query, concatenated. Computed in fp32.
        kv: ``[B, T, Dl + Dr]`` cache rows (fp32 or bf16), contiguous in the last dimension; any batch / row
            strides, so a view of a preallocated cache is passed without a copy.
        lengths: ``[B]`` int32 rows attended (default all ``T``); with ``indices``, the valid entries of each
            index list.
        dl: latent width ``Dl`` (the value is ``row[:Dl]``).
        indices: optional ``[B, K]`` int32 row positions (sparse decode over selected tokens).
        valid: optional ``[B, >=T]`` bool, False = skip that position (left padding).
        scale: softmax scale (default ``1/sqrt(Dl + Dr)``; MLA uses ``1/sqrt(d_nope + d_rope)``).
    Returns:
        ``(out [B, H, Dl] fp32, lse [B, H] fp32)``.
    """
    B, H, Dk = q.shape
    if dl is None:
        raise ValueError("latent_decode: dl (the latent width of each row) is required")
    if kv.dim() != 3 or kv.shape[0] != B or kv.shape[2] != Dk:
        raise ValueError(f"latent_decode: kv must be [B={B}, T, {Dk}], got {tuple(kv.shape)}")
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    if lengths is None:
        lengths = torch.full((B,), kv.shape[1], dtype=torch.int32, device=kv.device)
    backend = backend or choose_backend(q.device)
    if backend in ("cuda", "triton"):
        lengths, indices, valid = on_device(kv.device, lengths, indices, valid)
    if backend == "cpp":
        qf = q if q.dtype == torch.float32 else q.float()
        return tuple(_ext.cpu_ext().latent_decode(qf, kv, lengths.to(torch.int32), int(dl), indices, valid, scale,
                                                  int(num_threads)))
    if backend == "cuda":
        return tuple(_ext.cuda_ext().latent_decode(q, kv, lengths.to(torch.int32), int(dl), indices, valid, scale))
    if backend == "triton":
        from accel.kernels.attention.latent import latent_decode_triton

        return latent_decode_triton(q, kv, lengths, dl, indices=indices, valid=valid, scale=scale)
    return latent_decode_ref(q, kv, lengths, dl, indices=indices, valid=valid, scale=scale)
