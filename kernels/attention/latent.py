"""Triton latent (MLA / TPLA-shard) decode attention: GPU twin of ``csrc/include/accel/cpu/latent_decode.h``.

Grid: (B, cdiv(H, BLOCK_H)). A program owns one sequence and a block of heads: it loads their queries once
(latent part ``[BLOCK_H, Dl]`` and rotary part ``[BLOCK_H, Dr]``), streams the sequence's latent rows in blocks of
BLOCK_N (``tl.dot`` for the logits of all heads and for the value accumulation, as FlashMLA-style kernels do,
since every head shares the same rows), keeps an online softmax per head, and writes the normalised output and
its log-sum-exp. Optional index lists (sparse decode) and a per-position validity mask, like the CPU kernel.
All arithmetic in fp32 (``input_precision="ieee"``); bf16 rows are widened right after loading.

Verified here only under ``TRITON_INTERPRET=1`` on CPU tensors (tests/test_triton_interpret.py); written for
A100/H100 but not run on a GPU in this repository's CI.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _latent_kernel(
    Q, KV, LEN, IDX, VALID, OUT, LSE,
    sqb, sqh, skb, skt, sib, svb, sob, soh,
    H, DL, DR, scale,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr,
    HAS_IDX: tl.constexpr, HAS_VALID: tl.constexpr,
):
    b = tl.program_id(0)
    h0 = tl.program_id(1) * BLOCK_H
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_DL)
    offs_r = tl.arange(0, BLOCK_DR)
    hmask = offs_h < H
    lmask = offs_l < DL
    rmask = offs_r < DR
    q_lat = tl.load(Q + b * sqb + offs_h[:, None] * sqh + offs_l[None, :], mask=hmask[:, None] & lmask[None, :],
                    other=0.0).to(tl.float32)
    q_rot = tl.load(Q + b * sqb + offs_h[:, None] * sqh + DL + offs_r[None, :], mask=hmask[:, None] & rmask[None, :],
                    other=0.0).to(tl.float32)
    length = tl.load(LEN + b)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DL], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < length
        if HAS_IDX:
            tok = tl.load(IDX + b * sib + offs_n, mask=nmask, other=0)
        else:
            tok = offs_n
        if HAS_VALID:
            nmask = nmask & (tl.load(VALID + b * svb + tok, mask=nmask, other=0) != 0)
        base = KV + b * skb + tok[:, None] * skt
        lat = tl.load(base + offs_l[None, :], mask=nmask[:, None] & lmask[None, :], other=0.0).to(tl.float32)
        rot = tl.load(base + DL + offs_r[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q_lat, tl.trans(lat), input_precision="ieee") + tl.dot(q_rot, tl.trans(rot), input_precision="ieee")
        s = tl.where(nmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, lat, input_precision="ieee")
        m = m_new
    inv = tl.where(l > 0, 1.0 / l, 0.0)
    tl.store(OUT + b * sob + offs_h[:, None] * soh + offs_l[None, :], acc * inv[:, None],
             mask=hmask[:, None] & lmask[None, :])
    lse = tl.where(l > 0, m + tl.log(l), float("-inf"))
    tl.store(LSE + b * H + offs_h, lse, mask=hmask)


def latent_decode_triton(q, kv, lengths, dl, *, indices=None, valid=None, scale=None, block_n: int = 32,
                         block_h: int = 16):
    """Same contract as ``accel.ops.latent.latent_decode``; returns ``(out [B, H, Dl] fp32, lse [B, H])``."""
    B, H, Dk = q.shape
    assert kv.stride(2) == 1, "kv must be contiguous in its last dimension"
    dr = Dk - dl
    scale = 1.0 / math.sqrt(Dk) if scale is None else float(scale)
    q = q.float().contiguous()
    lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    out = torch.empty(B, H, dl, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H, device=q.device, dtype=torch.float32)
    has_idx, has_valid = indices is not None, valid is not None
    idx = indices.to(torch.int32).contiguous() if has_idx else lengths
    val = valid.to(torch.uint8).contiguous() if has_valid else lengths
    _latent_kernel[(B, triton.cdiv(H, block_h))](
        q, kv, lengths, idx, val, out, lse,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), idx.stride(0) if has_idx else 0,
        val.stride(0) if has_valid else 0, out.stride(0), out.stride(1),
        H, dl, dr, scale,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DL=max(16, triton.next_power_of_2(dl)),
        BLOCK_DR=max(16, triton.next_power_of_2(max(dr, 1))), HAS_IDX=has_idx, HAS_VALID=has_valid,
    )
    return out, lse
