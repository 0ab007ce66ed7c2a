"""MLA in its absorbed form and TPLA decode, in plain torch around the shard kernel (methods.md 3.1-3.2).

Notation (DeepSeek-V2): the cached latent of token ``j`` is ``c_j = gamma * n_j`` with ``n_j`` the RMS-normalised
``W_DKV h_j`` (``dc`` channels), plus a rotary key ``k^R_j`` (``dr`` channels) shared by all heads. Head ``i``
scores ``q^C_i . (W_UK,i c_j) + q^R_i . k^R_j``; absorbed: ``(W_UK,i^T q^C_i) . c_j``. accel stores the rotated,
gain-free latent ``U n_j`` and folds ``diag(gamma) U^T`` into ``W_UK`` and ``W_UV`` (``fold_weights``).

TPLA (Tang et al., "TPLA: Tensor Parallel Latent Attention", arXiv 2508.15881): shard ``r`` holds the latent
channels ``S_r`` of every token; every head is present on every shard and runs its own softmax over its partial
logits ``q~_i[S_r] . c_j[S_r] + q^R_i . k^R_j``; the shards' projected outputs are summed (one all-reduce).
``reduce="logits"`` sums the partial logits before one softmax instead: exactly MLA, the test oracle and the
per-layer fallback for sensitive layers.
"""
from __future__ import annotations

import torch

from ..errors import AccelError
from ..ops.latent import latent_decode


def split_kv_b(weight: torch.Tensor, heads: int, d_nope: int, d_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj.weight [H*(dn+dv), dc]`` -> ``W_UK [H, dn, dc]``, ``W_UV [H, dv, dc]``."""
    w = weight.reshape(heads, d_nope + d_v, weight.shape[-1])
    return w[:, :d_nope], w[:, d_nope:]


def fold_weights(w_uk, w_uv, gamma, u=None):
    """Fold the latent RMSNorm gain and the transform into the up-projections (fp64 maths, fp32 result):
    ``W diag(gamma) U^T`` so that ``W' (U n) = W (gamma * n)``."""
    g = gamma.double()
    uk, uv = w_uk.double() * g, w_uv.double() * g
    if u is not None:
        uk, uv = uk @ u.T, uv @ u.T
    return uk.float(), uv.float()


def shard_bounds(width: int, shards: int) -> list[tuple[int, int]]:
    if width % shards:
        raise AccelError(f"tpla: {width} channels cannot be split evenly over {shards} shards")
    s = width // shards
    return [(r * s, (r + 1) * s) for r in range(shards)]


def shard_rows(lat: torch.Tensor, kr: torch.Tensor, shards: int, rope_mode: str) -> torch.Tensor:
    """Cache rows per shard: ``[B, g, T, dc/g + dr]`` (replicate) or ``dc/g + dr/g`` (split)."""
    lb = shard_bounds(lat.shape[-1], shards)
    rb = shard_bounds(kr.shape[-1], shards) if rope_mode == "split" else [(0, kr.shape[-1])] * shards
    return torch.stack([torch.cat([lat[..., a:b], kr[..., c:d]], -1) for (a, b), (c, d) in zip(lb, rb)], 1)


def absorbed_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """``q~ = W_UK^T q^C`` per head: ``[B, H, dn] x [H, dn, dc] -> [B, H, dc]``."""
    return torch.einsum("bhn,hnc->bhc", q_nope.float(), w_uk)


def tpla_decode(q_nope, q_rope, rows, w_uk, w_uv, *, scale: float, reduce: str = "outputs",
                rope_mode: str = "replicate", shard_logit_scale: float = 1.0, lengths=None, valid=None,
                backend: str | None = None) -> torch.Tensor:
    """One decode step of TPLA (or MLA with ``reduce="logits"``) over sharded latent rows.

    Args:
        q_nope ``[B, H, dn]``, q_rope ``[B, H, dr]`` (rotary applied); rows ``[B, g, T, dk_r]`` (``shard_rows``,
        any strides); w_uk ``[H, dn, dc]``, w_uv ``[H, dv, dc]`` (folded); ``lengths [B]``; ``valid [B, T]``.
        shard_logit_scale: multiplies every shard's logits (1.0 = the paper's independent softmax per shard)
        [INFER knob of methods.md 3.2].
    Returns: per-head outputs ``[B, H, dv]`` (before ``o_proj``), the sum over shards.
    """
    g = rows.shape[1]
    dc = w_uk.shape[-1]
    lb = shard_bounds(dc, g)
    dr = q_rope.shape[-1]
    rb = shard_bounds(dr, g) if rope_mode == "split" else [(0, dr)] * g
    q_lat = absorbed_query(q_nope, w_uk)
    if reduce == "logits":
        return _exact_reduce(q_lat, q_rope.float(), rows, w_uv, lb, rb, rope_mode, scale, lengths, valid)
    if reduce != "outputs":
        raise AccelError(f"tpla: reduce must be 'outputs' (TPLA) or 'logits' (exact), got {reduce!r}")
    out = None
    for r, ((a, b), (c, d)) in enumerate(zip(lb, rb)):
        q_r = torch.cat([q_lat[..., a:b], q_rope[..., c:d].float()], -1)
        o_lat, _ = latent_decode(q_r, rows[:, r], lengths, b - a, valid=valid, scale=scale * shard_logit_scale,
                                 backend=backend)
        o_r = torch.einsum("bhc,hvc->bhv", o_lat, w_uv[:, :, a:b])
        out = o_r if out is None else out + o_r
    return out


def _exact_reduce(q_lat, q_rope, rows, w_uv, lb, rb, rope_mode, scale, lengths, valid):
    """Partial logits of every shard summed before one softmax: exactly MLA."""
    B, g, T, _ = rows.shape
    s = None
    for r, ((a, b), (c, d)) in enumerate(zip(lb, rb)):
        w = b - a
        part = torch.einsum("bhc,btc->bht", q_lat[..., a:b], rows[:, r, :, :w].float())
        if rope_mode == "split" or r == 0:  # the replicated rotary key is counted once
            part = part + torch.einsum("bhc,btc->bht", q_rope[..., c:d], rows[:, r, :, w:].float())
        s = part if s is None else s + part
    s = s * scale
    mask = torch.ones(B, T, dtype=torch.bool, device=s.device)
    if lengths is not None:
        mask &= torch.arange(T, device=s.device)[None] < lengths.to(s.device).long()[:, None]
    if valid is not None:
        mask &= valid[:, :T].bool()
    p = torch.softmax(s.masked_fill(~mask[:, None], float("-inf")), -1).nan_to_num(0.0)
    out = None
    for r, (a, b) in enumerate(lb):
        o_lat = torch.einsum("bht,btc->bhc", p, rows[:, r, :, : b - a].float())
        o_r = torch.einsum("bhc,hvc->bhv", o_lat, w_uv[:, :, a:b])
        out = o_r if out is None else out + o_r
    return out


def mla_reference(q_nope, q_rope, lat, kr, w_uk, w_uv, *, scale: float, mask=None) -> torch.Tensor:
    """Naive (non-absorbed) MLA from the stored latent: the exactness yardstick.
    q ``[B, H, T, *]``, lat ``[B, S, dc]``, kr ``[B, S, dr]``; mask ``[B, 1|H, T, S]`` bool (True = attend) or
    None (causal aligned to the end). Returns ``[B, H, T, dv]``."""
    k_nope = torch.einsum("bsc,hnc->bhsn", lat.float(), w_uk)
    v = torch.einsum("bsc,hvc->bhsv", lat.float(), w_uv)
    s = torch.einsum("bhtn,bhsn->bhts", q_nope.float(), k_nope) + torch.einsum("bhtr,bsr->bhts", q_rope.float(), kr.float())
    s = s * scale
    T, S = s.shape[-2], s.shape[-1]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=s.device).tril(S - T)[None, None]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return p @ v
