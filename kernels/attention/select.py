"""Triton token selection (GPU twin of accel/cpu/select.h).

Pass 1 reuses the decode kernel's log-sum-exp per query head. Pass 2 (`_chunk_scores_kernel`,
grid (B * Hsel, chunk blocks)) recomputes the logits of each token block, turns them into
probabilities, aggregates over the query heads of a KV head (max / mean / sum) or over all heads
(shared), and sums them into chunks. Sink/recent forcing, top-k and the ascending sort run on the
chunk scores with torch ops (small tensors). Verified under TRITON_INTERPRET=1 only.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from accel.ops._selection_reference import topk_chunks

from .decode import decode_attention_triton

AGG = {"max": 0, "mean": 1, "sum": 2, "shared": 3}


@triton.jit
def _chunk_scores_kernel(Q, K, LSE, LEN, OUT, sqb, sqh, skb, skh, skt, H, Hkv, G, D, scale, n_chunks,
                         AGG_MODE: tl.constexpr, HSEL_ALL: tl.constexpr, CHUNK: tl.constexpr,
                         CHUNKS_PER_PROG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cb = tl.program_id(1)
    if HSEL_ALL:
        b = pid
        h0 = 0
        nh = H
    else:
        b = pid // Hkv
        h0 = (pid % Hkv) * G
        nh = G
    length = tl.load(LEN + b)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < nh
    heads = h0 + offs_h
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=hmask[:, None] & (offs_d[None, :] < D),
                other=0.0).to(tl.float32)
    lse = tl.load(LSE + b * H + heads, mask=hmask, other=0.0)
    kvh = heads // G
    offs_t = cb * CHUNKS_PER_PROG * CHUNK + tl.arange(0, CHUNKS_PER_PROG * CHUNK)
    tmask = offs_t < length
    # K rows of every head's KV head: [BLOCK_H, N, BLOCK_D]
    kk = tl.load(K + b * skb + kvh[:, None, None] * skh + offs_t[None, :, None] * skt + offs_d[None, None, :],
                 mask=hmask[:, None, None] & tmask[None, :, None] & (offs_d[None, None, :] < D), other=0.0).to(tl.float32)
    s = tl.sum(q[:, None, :] * kk, axis=2) * scale
    p = tl.exp(s - lse[:, None])
    p = tl.where(hmask[:, None] & tmask[None, :], p, 0.0)
    if AGG_MODE == 0 or AGG_MODE == 3:
        a = tl.max(p, axis=0)
    elif AGG_MODE == 1:
        a = tl.sum(p, axis=0) / nh
    else:
        a = tl.sum(p, axis=0)
    c = tl.sum(tl.reshape(a, (CHUNKS_PER_PROG, CHUNK)), axis=1)
    offs_c = cb * CHUNKS_PER_PROG + tl.arange(0, CHUNKS_PER_PROG)
    tl.store(OUT + pid * n_chunks + offs_c, c, mask=offs_c < n_chunks)


def select_topk_triton(q, k, lengths, budget: int, *, agg: str = "max", chunk: int = 1, sink: int = 0,
                       recent: int = 0, scale: float | None = None):
    """Same contract as ``accel.ops.sparse.select_topk``; ``chunk`` must be a power of two."""
    B, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    assert chunk & (chunk - 1) == 0, "chunk must be a power of two for the Triton kernel"
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=q.device).reshape(-1)
    T = int(lengths.max())
    _, lse = decode_attention_triton(q, k, k, lengths.view(B, 1).expand(B, Hkv).contiguous(), scale=scale)
    hsel = 1 if agg == "shared" else Hkv
    n_chunks = (T + chunk - 1) // chunk
    cpp = max(1, 64 // chunk)
    out = torch.zeros(B * hsel, n_chunks, device=q.device, dtype=torch.float32)
    qc = q.contiguous()
    _chunk_scores_kernel[(B * hsel, triton.cdiv(n_chunks, cpp))](
        qc, k, lse.contiguous(), lengths, out, qc.stride(0), qc.stride(1), k.stride(0), k.stride(1), k.stride(2),
        H, Hkv, G, D, scale, n_chunks, AGG_MODE=AGG[agg], HSEL_ALL=(agg == "shared"), CHUNK=chunk,
        CHUNKS_PER_PROG=cpp, BLOCK_H=triton.next_power_of_2(H if agg == "shared" else G),
        BLOCK_D=triton.next_power_of_2(D))
    scores = out.view(B, hsel, n_chunks)
    rows = []
    for b in range(B):
        Tb = int(lengths[b])
        rows.append(topk_chunks(scores[b : b + 1, :, : (Tb + chunk - 1) // chunk], Tb, budget, chunk=chunk,
                                sink=sink, recent=recent)[0])
    n = max(r.shape[-1] for r in rows)
    idx = torch.full((B, hsel, n), -1, dtype=torch.int32, device=q.device)
    for b, r in enumerate(rows):
        idx[b, :, : r.shape[-1]] = r.int()
    return idx, (idx >= 0).sum(-1).int()
