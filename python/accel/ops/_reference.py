"""Pure-torch reference implementations: the test oracle for every kernel and the fallback backend.

Written for clarity, not speed; all arithmetic in fp32.
"""
from __future__ import annotations

import math

import torch


def decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    indices: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    head_mask: torch.Tensor | None = None,
):
    """One-query-per-sequence attention over a [B, Hkv, capacity, D] cache.

    ``lengths[b, h]`` tokens are attended for KV head ``h`` of sequence ``b``: positions
    ``0..lengths-1``, or ``indices[b, h, :lengths]`` when an index list is given. ``valid[b, t]``
    (optional, bool) removes positions (left padding, windows). GQA: query head ``i`` uses KV head
    ``i // (H // Hkv)``. ``head_mask`` (with ``indices``, int64 like them): query head ``h * G + g`` attends only
    the entries whose bit ``g`` is set. Returns ``out`` [B, H, D] (fp32) and optionally ``lse`` [B, H].
    """
    B, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dev = q.device  # any device: the reference is also the ``torch`` backend on GPUs
    out = torch.zeros(B, H, D, dtype=torch.float32, device=dev)
    lse = torch.full((B, H), -math.inf, dtype=torch.float32, device=dev)
    lengths = lengths.reshape(B, Hkv)
    for b in range(B):
        for h in range(Hkv):
            n = int(lengths[b, h])
            pos = indices[b, h, :n].long() if indices is not None else torch.arange(n, device=k.device)
            keep = torch.ones(n, dtype=torch.bool, device=pos.device)
            if valid is not None:
                inside = pos < valid.shape[1]
                keep[inside] = valid[b, pos[inside]].bool()
            groups = [(g, g + 1) for g in range(G)] if head_mask is not None else [(0, G)]
            for g0, g1 in groups:  # the whole group at once, or one query head at a time over its own entries
                sel = keep if head_mask is None else keep & (((head_mask[b, h, :n] >> g0) & 1) != 0).to(keep.device)
                p = pos[sel]
                if p.numel() == 0:
                    continue
                kk = k[b, h, p].float()
                vv = v[b, h, p].float()
                qq = q[b, h * G + g0 : h * G + g1].float()
                s = (qq @ kk.T) * scale
                lse[b, h * G + g0 : h * G + g1] = torch.logsumexp(s, dim=-1)
                out[b, h * G + g0 : h * G + g1] = torch.softmax(s, dim=-1) @ vv
    return (out, lse) if return_lse else out
