"""Triton decode attention over accel's KV cache (GPU twin of the C++ CPU kernel).

Grid: (B * Hkv, num_splits). A program owns one KV head and all G query heads of its GQA group
(padded to BLOCK_G), streams the tokens of one split in blocks of BLOCK_N with an online softmax,
and writes a normalised partial output plus its log-sum-exp; splits are merged on the host
(flash-decoding). Supports per-head lengths, a ragged row pool (per-head row offsets), optional index lists (sparse decode) and an optional
per-sequence validity mask, like the CPU kernel. All arithmetic in fp32; bf16 inputs are converted
right after loading.

Verified here only under ``TRITON_INTERPRET=1`` on CPU tensors (tests/test_triton_interpret.py);
written for A100/H100 but not run on a GPU in this repository's CI.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(
    Q, K, V, LEN, IDX, VALID, OFF, O_PART, LSE_PART,
    sqb, sqh, skb, skh, skt, svb, svh, svt, sib, sih, svalb,
    Hkv, G, D, valid_len, scale, chunk,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_IDX: tl.constexpr, HAS_VALID: tl.constexpr, HAS_OFF: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = bh // Hkv
    h = bh % Hkv
    length = tl.load(LEN + bh)
    if HAS_OFF:  # ragged row pool: this head's tokens start at row OFF[bh] (skb = skh = 0)
        row0 = tl.load(OFF + bh)
    else:
        row0 = 0
    start = sp * chunk
    end = tl.minimum(length, start + chunk)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < G
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + (h * G + offs_g)[:, None] * sqh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        if HAS_IDX:
            tok = tl.load(IDX + b * sib + h * sih + offs_n, mask=nmask, other=0)
        else:
            tok = offs_n
        if HAS_VALID:
            vm = tl.load(VALID + b * svalb + tok, mask=nmask & (tok < valid_len), other=1)
            nmask = nmask & (vm != 0)
        kk = tl.load(K + b * skb + h * skh + (row0 + tok)[:, None] * skt + offs_d[None, :],
                     mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * kk[None, :, :], axis=2) * scale  # [G, N]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_safe))
        p = tl.exp(s - m_safe[:, None])
        p = tl.where(nmask[None, :], p, 0.0)
        vv = tl.load(V + b * svb + h * svh + (row0 + tok)[:, None] * svt + offs_d[None, :],
                     mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vv[None, :, :], axis=1)
        m = m_new
    has = l > 0
    o = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    row = (bh * nsplit + sp) * BLOCK_G + offs_g
    tl.store(O_PART + row[:, None] * BLOCK_D + offs_d[None, :], o, mask=gmask[:, None] & dmask[None, :])
    tl.store(LSE_PART + row, lse, mask=gmask)


def decode_attention_triton(q, k, v, lengths, *, indices=None, valid=None, scale=None, num_splits=None,
                            block_n: int = 32, offsets=None):
    """Same contract as ``accel.ops.attention.decode_attention``; returns (out, lse)."""
    B, H, D = q.shape
    Hkv = k.shape[1]
    assert H % Hkv == 0, "query heads must be a multiple of KV heads"
    assert k.stride(3) == 1 and v.stride(3) == 1, "k/v must be contiguous in the head dimension"
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    max_len = int(lengths.max().item()) if lengths.numel() else 0
    if num_splits is None:
        num_splits = max(1, min(16, max_len // 1024))
    chunk = max(1, -(-max_len // num_splits))
    BLOCK_G = triton.next_power_of_2(G)
    BLOCK_D = triton.next_power_of_2(D)
    q = q.contiguous()
    o_part = torch.empty(B * Hkv * num_splits * BLOCK_G, BLOCK_D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B * Hkv * num_splits * BLOCK_G, device=q.device, dtype=torch.float32)
    has_idx = indices is not None
    has_valid = valid is not None
    idx = indices.to(torch.int32).contiguous() if has_idx else lengths
    val = valid.to(torch.uint8).contiguous() if has_valid else lengths
    has_off = offsets is not None
    off = offsets.to(device=q.device, dtype=torch.int64).contiguous() if has_off else lengths
    _decode_kernel[(B * Hkv, num_splits)](
        q, k, v, lengths, idx, val, off, o_part, lse_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        idx.stride(0) if has_idx else 0, idx.stride(1) if has_idx else 0, val.stride(0) if has_valid else 0,
        Hkv, G, D, val.shape[1] if has_valid else 0, scale, chunk,
        BLOCK_G=BLOCK_G, BLOCK_N=block_n, BLOCK_D=BLOCK_D, HAS_IDX=has_idx, HAS_VALID=has_valid,
        HAS_OFF=has_off,
    )
    o_part = o_part.view(B, Hkv, num_splits, BLOCK_G, BLOCK_D)[..., :G, :D]
    lse_part = lse_part.view(B, Hkv, num_splits, BLOCK_G)[..., :G]
    lse = torch.logsumexp(lse_part, dim=2)  # [B, Hkv, G]
    w = torch.exp(lse_part - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(2))
    w = torch.nan_to_num(w, nan=0.0)
    out = (w.unsqueeze(-1) * o_part).sum(dim=2)
    return out.reshape(B, H, D).to(q.dtype), lse.reshape(B, H)
