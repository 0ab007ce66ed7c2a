"""Shared decode-time machinery of the selection policies (HyLRA, DELTA, Recycled Attention).

* ``token_budget``: a layer's token budget from ``topk`` (tokens) or ``topk_ratio`` (of the context).
* ``select_from_scores``: top-k token positions from a decode query's scaled logits: probabilities,
  aggregation over the query heads of a KV head (max / mean / sum) or of the whole layer (shared),
  optional 1-D max pooling (RefreshKV, kernel 7), sum into chunks/pages, forced sink and recent
  chunks, sorted ascending (methods.md section 0, conventions 1-3). Left padding is respected: the
  sink is counted from each row's first real token and padded positions have probability 0.
* ``dense_with_scores``: exact decode attention that also returns the scaled logits (the C++ kernel
  writes them while it computes attention, so an anchor layer does not read K twice).
* ``sparse_attend``: decode attention over index lists with accel's sparse kernel (no gather).
* ``ragged_with_scores`` / ``ragged_sparse_attend``: the same two over a compressed layer
  (``accel.cache.ragged``), where each KV head keeps its own tokens: selections travel between layers
  as absolute token positions, and a reuse layer maps them to its own kept rows (a position -> slot
  table built per step), dropping positions its heads no longer hold.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _ext
from ..errors import AccelError
from ..ops.attention import decode_attention

AGG_CHOICES = ("max", "mean", "sum", "shared")


def check_budget_knobs(name: str, topk, topk_ratio, sink: int, recent: int, chunk: int) -> None:
    if topk is not None and (not isinstance(topk, int) or topk < 1):
        raise AccelError(f"{name}: topk must be a positive number of tokens or None (then topk_ratio applies), got {topk!r}")
    if topk is None and (topk_ratio is None or not (0.0 < float(topk_ratio) <= 1.0)):
        raise AccelError(f"{name}: topk_ratio must be in (0, 1] (fraction of the context kept), got {topk_ratio!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise AccelError(f"{name}: chunk must be a positive integer, got {chunk!r}")
    if sink < 0 or recent < 0:
        raise AccelError(f"{name}: sink and recent must be >= 0, got sink={sink}, recent={recent}")
    if topk is not None and sink + recent > topk:
        raise AccelError(f"{name}: sink + recent ({sink} + {recent}) exceed topk={topk}; the budget includes them, "
                         "so lower sink/recent or raise topk")


def token_budget(T: int, topk: int | None, topk_ratio: float | None, min_tokens: int = 0) -> int:
    """Tokens kept per KV head at context length ``T`` (sink and recent included). With a ratio, never
    fewer than ``min_tokens`` (short prompts stay exact instead of keeping one or two tokens)."""
    if topk is not None:
        return int(topk)
    return max(1, int(min_tokens), int(math.ceil(float(topk_ratio) * T)))


def first_valid_positions(valid: torch.Tensor | None, B: int) -> torch.Tensor:
    """Index of each row's first attendable token ([B] int64; 0 without a mask)."""
    if valid is None:
        return torch.zeros(B, dtype=torch.long)
    return valid.int().argmax(dim=1).long().cpu()


def select_from_scores(scores: torch.Tensor, lse: torch.Tensor, num_kv_heads: int, budget: int, *, agg: str,
                       chunk: int, sink: int, recent: int, first_valid: torch.Tensor | None = None,
                       pool_kernel: int = 0, T: int | None = None, return_scores: bool = False):
    """Top-k positions from decode logits.

    Args:
        scores: [B, H, >=T] scaled logits (-inf for masked tokens); lse: [B, H] log-sum-exp.
        budget: tokens per selection set, including the forced sink/recent chunks; ``budget >= T``
            selects everything.
        agg: 'max' | 'mean' | 'sum' over a KV head's query heads, or 'shared' (max over all heads,
            one set for the layer, DELTA's unified selection).
        pool_kernel: odd window of a 1-D max pooling over tokens before chunking (RefreshKV: 7).
        first_valid: [B] first real token per row (left padding); the sink starts there.
    Returns:
        (indices [B, Hs, n] int32 ascending, -1 padded; counts [B, Hs] int32), and with
        ``return_scores`` the per-token scores [B, Hs, T] the ranking used.
    """
    if agg not in AGG_CHOICES:
        raise AccelError(f"aggregation must be one of {AGG_CHOICES}, got {agg!r}")
    B, H = scores.shape[:2]
    T = scores.shape[2] if T is None else T
    if (not return_scores and pool_kernel <= 1 and scores.device.type == "cpu" and scores.dtype == torch.float32
            and scores.stride(2) == 1 and scores.stride(0) == H * scores.stride(1) and _ext.HAS_CPU_EXT):
        # one C++ call instead of ~25 small torch ops (an anchor layer selects every decode step)
        fv = None if first_valid is None else first_valid.long().cpu()
        return _ext.cpu_ext().select_from_logits(scores, lse.float(), int(T), int(num_kv_heads), int(budget),
                                                 AGG_CHOICES.index(agg), int(chunk), int(sink), int(recent), fv)
    p = torch.exp(scores[:, :, :T].float() - lse.float().unsqueeze(-1))  # exp(-inf) = 0 for masked tokens
    if agg == "shared":
        a = p.amax(dim=1, keepdim=True)
    else:
        g = p.view(B, num_kv_heads, H // num_kv_heads, T)
        a = g.amax(dim=2) if agg == "max" else (g.mean(dim=2) if agg == "mean" else g.sum(dim=2))
    if pool_kernel and pool_kernel > 1:
        a = F.max_pool1d(a, kernel_size=pool_kernel, stride=1, padding=pool_kernel // 2)
    Hs = a.shape[1]
    nC = (T + chunk - 1) // chunk
    cs = F.pad(a, (0, nC * chunk - T)).view(B, Hs, nC, chunk).sum(-1) if chunk > 1 else a.clone()
    fv = torch.zeros(B, dtype=torch.long) if first_valid is None else first_valid.long().cpu()
    cidx = torch.arange(nC)
    forced = torch.zeros(B, nC, dtype=torch.bool)
    if sink > 0:
        forced |= (cidx.view(1, -1) >= (fv // chunk).view(-1, 1)) & (cidx.view(1, -1) * chunk < (fv + sink).view(-1, 1))
    if recent > 0:
        forced |= cidx.view(1, -1) >= max(0, (T - recent) // chunk)
    if budget >= T:
        kc = nC
    else:
        kc = min(nC, max(1, int(forced.sum(1).max()), budget // chunk))
    cs = cs.masked_fill(forced.view(B, 1, nC).to(cs.device), float("inf"))
    top = cs.topk(kc, dim=-1).indices.sort(dim=-1).values  # [B, Hs, kc]
    if chunk > 1:
        pos = (top.unsqueeze(-1) * chunk + torch.arange(chunk, device=top.device)).flatten(-2)
    else:
        pos = top
    inside = pos < T  # only the last (partial) chunk can reach past T, and it sorts last
    counts = inside.sum(-1).to(torch.int32)
    idx = torch.where(inside, pos, torch.full_like(pos, -1)).to(torch.int32).contiguous()
    if return_scores:
        return idx, counts, a
    return idx, counts


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, h, idx[b, h, i], :]`` for a [B, H, T, D] view of a cache buffer, as one ``index_select`` over
    the buffer's rows (about 10x faster than ``torch.gather`` with an index expanded over D on CPU).
    Falls back to ``torch.gather`` when the view's strides are not whole rows."""
    B, H, n = idx.shape
    D = x.shape[-1]
    s0, s1, s2, s3 = x.stride()
    if s3 == 1 and s2 >= D and s0 % s2 == 0 and s1 % s2 == 0 and x.storage_offset() % s2 == 0:
        dev = idx.device
        rows = (x.storage_offset() // s2 + (torch.arange(B, device=dev).view(B, 1, 1) * (s0 // s2)
                + torch.arange(H, device=dev).view(1, H, 1) * (s1 // s2) + idx.long())).reshape(-1).to(x.device)
        n_rows = x.untyped_storage().nbytes() // (x.element_size() * s2)
        base = torch.as_strided(x, (n_rows, D), (s2, 1), 0)
        return base.index_select(0, rows).view(B, H, n, D)
    return torch.gather(x, 2, idx.long().to(x.device).unsqueeze(-1).expand(B, H, n, D))


def valid_mask(ctx, attention_mask, B: int, T: int):
    """The step's [B, T] validity mask (or None), converted once per step and shared by all layers."""
    from ..patching.attention_fn import valid_from_mask

    memo = ctx.runtime.shared.get("valid_mask")
    if memo is not None and memo[0] is attention_mask and memo[1] == T:
        return memo[2]
    res = valid_from_mask(attention_mask, B, T)
    ctx.runtime.shared["valid_mask"] = (attention_mask, T, res)
    return res


def dense_with_scores(ctx, query, key, value, attention_mask, scaling):
    """Exact decode attention plus scaled logits and lse. Returns (out [B, 1, H, D], scores
    [B, H, T], lse [B, H], valid) or None when the mask has a form the kernel does not take."""
    B, H, _, D = query.shape
    T = key.shape[2]
    ok, valid = valid_mask(ctx, attention_mask, B, T)
    if not ok or key.shape[-1] != value.shape[-1]:
        return None
    scores = torch.empty(B, H, T, dtype=torch.float32, device=query.device)
    out, lse = decode_attention(query[:, :, 0, :], key, value, valid=valid, scale=scaling, return_lse=True,
                                scores=scores)
    from ..patching.attention_fn import count_kv_read

    count_kv_read(ctx, B * key.shape[1] * T, key, value)
    return out.unsqueeze(1), scores, lse, valid


def sparse_attend(ctx, query, key, value, attention_mask, scaling, idx, counts):
    """Decode attention over the selected positions only. idx [B, Hs, n] (Hs = Hkv or 1)."""
    B, H, _, D = query.shape
    T = key.shape[2]
    ok, valid = valid_mask(ctx, attention_mask, B, T)
    if not ok:
        raise AccelError("sparse decode got a per-head attention mask it cannot apply; use policy='dense' for this model")
    Hkv = key.shape[1]
    if idx.shape[1] == 1 and Hkv > 1:
        idx = idx.expand(B, Hkv, idx.shape[2]).contiguous()
        counts = counts.reshape(B, 1).expand(B, Hkv).contiguous()
    out = decode_attention(query[:, :, 0, :], key, value, lengths=counts, indices=idx, valid=valid, scale=scaling)
    from ..patching.attention_fn import count_kv_read

    count_kv_read(ctx, int(counts.sum()), key, value)
    return out.unsqueeze(1)


def own_scores(query, key, attention_mask, ctx, scaling):
    """Scaled logits of the decode query over the whole cache (a SELECT layer's scoring pass), with
    lse and the validity mask: (scores [B, H, T], lse [B, H], valid)."""
    B, H, _, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    ok, valid = valid_mask(ctx, attention_mask, B, T)
    s = torch.einsum("bhgd,bhtd->bhgt", query[:, :, 0, :].float().reshape(B, Hkv, H // Hkv, D),
                     key.float()).reshape(B, H, T) * scaling
    if valid is not None:
        s = s.masked_fill(~valid.view(B, 1, T), float("-inf"))
    from ..patching.attention_fn import count_kv_read

    count_kv_read(ctx, B * Hkv * T, key, key, values_too=False)
    return s, torch.logsumexp(s, dim=-1), valid


def ragged_with_scores(ctx, query, scaling):
    """Exact attention over a compressed layer plus position-indexed logits: (out [B, 1, H, D], scores
    [B, H, T] with -inf at positions the head does not keep, lse [B, H], T = tokens seen so far)."""
    from ..patching.attention_fn import ragged_decode

    rg = ctx.cache_layer.ragged
    B, H = query.shape[:2]
    Hkv = rg.shape[1]
    T = int(ctx.cache_layer.cumulative_length)
    out, sc, lse = ragged_decode(ctx, query, scaling, return_scores=True)
    W = sc.shape[-1]
    rows, live = rg.rows(W)
    pos = torch.where(live, rg.pos[rows], torch.full_like(rows, T))  # dead slots land in a spare column
    G = H // Hkv
    full = torch.full((B, H, T + 1), float("-inf"), device=sc.device)
    full.scatter_(2, pos.repeat_interleave(G, 1).to(sc.device), sc)
    return out, full[:, :, :T], lse, T


def ragged_sparse_attend(ctx, query, scaling, idx, counts):
    """Decode attention of a compressed layer over the positions ``idx`` [B, Hs, n] (-1 padded; Hs = Hkv
    or 1 for a layer-wide set) that its heads still hold."""
    rg = ctx.cache_layer.ragged
    T = int(ctx.cache_layer.cumulative_length)
    if _ext.HAS_CPU_EXT and rg.k.device.type == "cpu":
        slot, n = _ext.cpu_ext().ragged_positions_to_slots(rg.pos, rg.offsets.reshape(-1), rg.lengths.reshape(-1),
                                                           idx.to(torch.int32), counts.to(torch.int32), T)
    else:
        slot, n = positions_to_slots(rg, idx, T)
    out = decode_attention(query[:, :, 0, :], rg.k, rg.v, n, indices=slot, offsets=rg.offsets, scale=scaling)
    ctx.runtime.stats["kv_read_bytes"] += int(n.sum()) * rg.row_bytes()
    return out.unsqueeze(1)


def positions_to_slots(rg, idx, T: int):
    """Torch twin of ``accel._C.ragged_positions_to_slots``: ([B, Hkv, n] int32 rows of each head that hold
    the selected positions, ascending, -1 padded; [B, Hkv] int32 counts)."""
    B, Hkv = rg.shape
    if idx.shape[1] == 1 and Hkv > 1:
        idx = idx.expand(B, Hkv, idx.shape[2])
    W = max(1, int(rg.lengths.max()))
    rows, live = rg.rows(W)
    pos = torch.where(live, rg.pos[rows], torch.full_like(rows, T))
    lookup = torch.full((B, Hkv, T + 1), -1, dtype=torch.long)
    lookup.scatter_(2, pos, torch.arange(W).view(1, 1, W).expand(B, Hkv, W))
    lookup[:, :, T] = -1
    want = idx.long().to(lookup.device)  # the ragged metadata lives on the CPU
    slot = torch.gather(lookup, 2, torch.where(want >= 0, want.clamp(max=T), torch.full_like(want, T)))
    big = torch.iinfo(torch.int32).max
    slot = torch.where(slot >= 0, slot, torch.full_like(slot, big)).sort(dim=-1).values  # held slots first, ascending
    n = (slot != big).sum(-1).to(torch.int32)
    slot = torch.where(slot != big, slot, torch.full_like(slot, -1)).to(torch.int32).contiguous()
    return slot, n
