"""Triton block-sparse causal prefill (GPU twin of accel/cpu/block_sparse_prefill.h).

Grid (B * H, query blocks); each program loads its 64-query block once, walks its key-block list
(64-token blocks), applies the causal mask, keeps an online softmax, and accumulates P V with
`tl.dot`. Queries are the last Tq of Tk key positions (chunked prefill). Verified under
TRITON_INTERPRET=1 only.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 64


@triton.jit
def _block_sparse_kernel(Q, K, V, BLOCKS, COUNTS, O, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                         H, G, Tq, Tk, D, nqb, max_kb, scale, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    qb = tl.program_id(1)
    b = pid // H
    h = pid % H
    kh = h // G
    off = Tk - Tq
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < Tq
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=mmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cnt = tl.load(COUNTS + h * nqb + qb)
    for i in range(0, cnt):
        j = tl.load(BLOCKS + (h * nqb + qb) * max_kb + i)
        offs_n = j * BLOCK_M + tl.arange(0, BLOCK_M)
        nmask = offs_n < Tk
        kk = tl.load(K + b * skb + kh * skh + offs_n[:, None] * skt + offs_d[None, :],
                     mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(kk)) * scale
        valid = nmask[None, :] & (offs_n[None, :] <= (offs_m[:, None] + off))
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_safe))
        p = tl.where(valid, tl.exp(s - m_safe[:, None]), 0.0)
        vv = tl.load(V + b * svb + kh * svh + offs_n[:, None] * svt + offs_d[None, :],
                     mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, vv)
        m = m_new
    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(O + ((b * H + h) * Tq + offs_m[:, None]) * D + offs_d[None, :], o, mask=mmask[:, None] & dmask[None, :])


def block_sparse_prefill_triton(q, k, v, blocks, counts, scale: float | None = None):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    nqb = triton.cdiv(Tq, BLOCK)
    blocks = blocks.to(torch.int32).contiguous()
    counts = counts.to(torch.int32).contiguous()
    out = torch.empty(B, H, Tq, D, device=q.device, dtype=torch.float32)
    _block_sparse_kernel[(B * H, nqb)](
        q, k, v, blocks, counts, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), H, H // Hkv, Tq, Tk, D, nqb, blocks.shape[2], scale,
        BLOCK_M=BLOCK, BLOCK_D=max(16, triton.next_power_of_2(D)))
    return out.to(q.dtype)
