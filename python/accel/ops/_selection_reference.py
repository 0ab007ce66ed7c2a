"""Pure-torch references for token selection (the oracle for the sparse-attention kernels).

* ``select_topk_ref``: from one decode query per sequence and the cache, the attention
  probabilities of each query head, aggregated over the G query heads of a KV head (max / mean /
  sum, after HyLRA's profiler and RefreshKV) or over all heads (``shared``, DELTA's unified
  selection), pooled into chunks/pages of ``chunk`` tokens (sum of probabilities), top-k chunks with
  the sink and recent chunks forced in (score +inf, methods.md convention 3), expanded back to
  token positions and sorted ascending (convention 2).
* ``page_minmax_ref`` / ``quest_page_scores_ref``: Quest's per-page elementwise key min/max and the
  upper bound ``sum_d max(q_d M_d, q_d m_d)`` of ``q.k`` over a page (Tang et al., 2024).
"""
from __future__ import annotations

import math

import torch


def group_probs_ref(q: torch.Tensor, k: torch.Tensor, length: int, scale: float | None = None) -> torch.Tensor:
    """Softmax probabilities [B, H, T] of queries [B, H, D] over keys [B, Hkv, >=T, D] (GQA)."""
    B, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kk = k[:, :, :length].float().repeat_interleave(G, dim=1)
    s = torch.einsum("bhd,bhtd->bht", q.float(), kk) * scale
    return torch.softmax(s, dim=-1)


def aggregate_ref(p: torch.Tensor, num_kv_heads: int, agg: str) -> torch.Tensor:
    """[B, H, T] -> [B, Hkv, T] (or [B, 1, T] for ``shared``)."""
    B, H, T = p.shape
    if agg == "shared":
        return p.max(dim=1, keepdim=True).values
    g = p.view(B, num_kv_heads, H // num_kv_heads, T)
    if agg == "max":
        return g.max(dim=2).values
    if agg == "mean":
        return g.mean(dim=2)
    if agg == "sum":
        return g.sum(dim=2)
    raise ValueError(f"aggregation must be max, mean, sum or shared, got {agg!r}")


def select_topk_ref(q, k, length: int, budget: int, *, agg: str = "max", chunk: int = 1, sink: int = 0,
                    recent: int = 0, scale: float | None = None) -> torch.Tensor:
    """Selected token positions, [B, Hsel, n] int64 sorted ascending (Hsel = Hkv, or 1 if shared).

    ``budget`` counts tokens and includes the forced sink and recent tokens; with chunks the budget is
    rounded down to whole chunks (at least the forced ones). ``budget >= length`` selects everything.
    """
    p = aggregate_ref(group_probs_ref(q, k, length, scale), k.shape[1], agg)  # [B, Hs, T]
    B, Hs, T = p.shape
    n_chunks = (T + chunk - 1) // chunk
    pc = torch.nn.functional.pad(p, (0, n_chunks * chunk - T)).view(B, Hs, n_chunks, chunk).sum(-1)
    return topk_chunks(pc, T, budget, chunk=chunk, sink=sink, recent=recent)


def topk_chunks(scores: torch.Tensor, length: int, budget: int, *, chunk: int = 1, sink: int = 0,
                recent: int = 0) -> torch.Tensor:
    """Chunk scores [B, Hs, n_chunks] of one length -> token positions [B, Hs, n] (int64, ascending,
    -1 padded): sink/recent chunks forced in (+inf), top-k chunks, expanded to tokens < ``length``.
    Shared by the reference and the Triton host code."""
    B, Hs, n_chunks = scores.shape
    forced = torch.zeros(n_chunks, dtype=torch.bool, device=scores.device)
    forced[: (sink + chunk - 1) // chunk] = True
    if recent > 0:
        forced[max(0, (length - recent) // chunk):] = True
    sc = scores.masked_fill(forced.view(1, 1, -1), float("inf"))
    k_chunks = n_chunks if budget >= length else min(n_chunks, max(1, int(forced.sum()), budget // chunk))
    top = sc.topk(k_chunks, dim=-1).indices.sort(dim=-1).values  # [B, Hs, k_chunks]
    pos = (top.unsqueeze(-1) * chunk + torch.arange(chunk, device=scores.device)).flatten(-2)
    # all rows hold k_chunks chunks; only a row holding the partial last chunk has fewer tokens
    n = int((pos < length).sum(-1).max())
    out = torch.full((B, Hs, n), -1, dtype=torch.long, device=scores.device)
    for b in range(B):
        for h in range(Hs):
            r = pos[b, h][pos[b, h] < length]
            out[b, h, : r.numel()] = r
    return out


def page_minmax_ref(k: torch.Tensor, length: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max of the keys of each page: two [B, Hkv, n_pages, D] tensors."""
    B, Hkv, _, D = k.shape
    n_pages = (length + page - 1) // page
    kmin = torch.empty(B, Hkv, n_pages, D)
    kmax = torch.empty(B, Hkv, n_pages, D)
    for i in range(n_pages):
        blk = k[:, :, i * page : min(length, (i + 1) * page)].float()
        kmin[:, :, i] = blk.min(dim=2).values
        kmax[:, :, i] = blk.max(dim=2).values
    return kmin, kmax


def quest_page_scores_ref(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, agg: str = "max") -> torch.Tensor:
    """Quest upper bound per page, [B, H, n_pages], aggregated to [B, Hkv, n_pages] with ``agg``."""
    B, H, D = q.shape
    Hkv = kmin.shape[1]
    G = H // Hkv
    mn = kmin.repeat_interleave(G, dim=1)
    mx = kmax.repeat_interleave(G, dim=1)
    qq = q.float().unsqueeze(2)
    ub = torch.maximum(qq * mx, qq * mn).sum(-1)
    return aggregate_ref(ub, Hkv, agg) if agg != "none" else ub


def merge_head_selections_ref(idx: torch.Tensor, counts: torch.Tensor, T: int | None = None):
    """The union of G per-query-head selections of each (sequence, KV head): idx [G, B, Hkv, W] int32 (each list sorted
    ascending without repeats in its first counts [G, B, Hkv] entries). Returns (positions [B, Hkv, G * W] int32
    ascending, -1 padded; counts [B, Hkv] int32; head_mask [B, Hkv, G * W] int64, bit g set where selection g holds
    the position), the arguments of ``decode_attention``'s ``head_mask``. ``T``: a bound on the positions (default: the
    largest one + 1)."""
    G, B, Hkv, W = idx.shape
    live = torch.arange(W, device=idx.device) < counts.unsqueeze(-1)  # [G, B, Hkv, W]
    if T is None:
        T = int(idx[live].max()) + 1 if bool(live.any()) else 1
    bits = torch.zeros(B, Hkv, T + 1, dtype=torch.int64, device=idx.device)
    for g in range(G):  # positions are unique within a selection: adding bit g is setting it
        pos = torch.where(live[g], idx[g].long(), torch.full_like(idx[g], T, dtype=torch.long))
        bits.scatter_add_(2, pos, live[g].long() << g)
    bits = bits[:, :, :T]
    held = bits != 0
    n = held.sum(-1)
    at = torch.arange(T, device=idx.device).expand(B, Hkv, T)
    order = torch.where(held, at, T).sort(dim=-1).values[:, :, : G * W]  # held positions first, ascending
    width = order.shape[-1]
    inside = torch.arange(width, device=idx.device) < n.unsqueeze(-1)
    pos = torch.where(inside, order, -1)
    mask = torch.where(inside, bits.gather(2, order.clamp(max=T - 1)), 0)
    if width < G * W:  # pad to the fixed width G * W
        pad = G * W - width
        pos = torch.cat([pos, pos.new_full((B, Hkv, pad), -1)], -1)
        mask = torch.cat([mask, mask.new_zeros(B, Hkv, pad)], -1)
    return pos.to(torch.int32).contiguous(), n.to(torch.int32), mask.contiguous()
