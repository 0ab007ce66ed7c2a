"""Decode attention over accel's cache: the primitives every policy's ``decode`` is written with.

* ``dense_decode``: exact attention of one query per sequence over the layer's cache, with accel's kernel.
* ``dense_with_scores``: the same, also returning the scaled logits and log-sum-exp (the C++ kernel writes them
  while it computes attention, so a layer that selects from its own attention does not read K twice).
* ``own_scores``: the logits alone (a scoring pass over K only).
* ``sparse_attend``: attention over per-head index lists with the sparse kernel (no gather).
* ``ragged_decode`` / ``ragged_with_scores`` / ``ragged_sparse_attend`` / ``ragged_prefill``: the same over a
  compressed layer (``accel.cache.ragged``), where each KV head keeps its own tokens; selections travel between
  layers as absolute token positions and a layer maps them to the rows its heads still hold.
* ``count_kv_read``: every primitive adds the K/V bytes it read to ``runtime.stats["kv_read_bytes"]``, so
  ``accel bench`` reports what a step read instead of assuming a dense read.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..errors import AccelError
from ..ops.attention import decode_attention
from .hf import hf_sdpa
from .masks import step_valid


def dense_decode(ctx, query, key, value, attention_mask, scaling):
    """Exact decode attention with accel's kernel. query [B, H, 1, D], key/value [B, Hkv, T, D]
    (or a compressed layer's row pools, read through its per-head offsets)."""
    if ctx.cache_layer is not None and ctx.cache_layer.ragged is not None:
        return ragged_decode(ctx, query, scaling)
    B, H, _, D = query.shape
    if key.shape[-1] != value.shape[-1]:
        return hf_sdpa(ctx.module, query, key, value, attention_mask, scaling=scaling)[0]
    # the model builds one mask per step (one more for sliding layers) and hands the same tensor to
    # every layer: convert it once, not once per layer
    ok, valid = step_valid(ctx, attention_mask, B, key.shape[2])
    if not ok:
        return hf_sdpa(ctx.module, query, key, value, attention_mask, scaling=scaling)[0]
    out = decode_attention(query[:, :, 0, :], key, value, valid=valid, scale=scaling)
    count_kv_read(ctx, key.shape[0] * key.shape[1] * key.shape[2], key, value)
    return out.unsqueeze(1)  # [B, 1, H, D], the layout HF attention functions return


def ragged_decode(ctx, query, scaling, return_scores: bool = False):
    """Decode attention over a compressed layer (``accel.cache.ragged.RaggedKV``): every KV head
    attends its own kept tokens. When the layer's KV policy asks for it (``ctx.accumulate``), the
    attention each kept token receives (mean over the GQA group) is added to its eviction score
    (H2O-style), from the kernel's fused logits output, without a second pass over K.
    ``return_scores``: also return the logits of each head's slots [B, H, W] and the lse [B, H]
    (a layer-reuse anchor over a compressed cache selects from them)."""
    rg = ctx.cache_layer.ragged
    B, H, _, D = query.shape
    Hkv = rg.shape[1]
    q = query[:, :, 0, :]
    sc = lse = None
    if ctx.accumulate or return_scores:
        W = max(1, int(rg.lengths.max()))
        sc = torch.empty(B, H, W, device=q.device)
        out, lse = decode_attention(q, rg.k, rg.v, rg.lengths, offsets=rg.offsets, scale=scaling, return_lse=True,
                                    scores=sc)
        if ctx.accumulate:
            if _ext.HAS_CPU_EXT and q.device.type == "cpu":
                _ext.cpu_ext().ragged_accumulate(sc, lse.float().contiguous(), rg.offsets.reshape(-1),
                                                 rg.lengths.view(-1), rg.score)
            else:
                rows, live = rg.rows(W)
                p = torch.exp(sc - lse.float().unsqueeze(-1)).view(B, Hkv, H // Hkv, W).mean(2)
                rg.score.index_add_(0, rows[live], p.cpu()[live])  # eviction scores live with the CPU metadata
    else:
        out = decode_attention(q, rg.k, rg.v, rg.lengths, offsets=rg.offsets, scale=scaling)
    ctx.runtime.stats["kv_read_bytes"] += int(rg.lengths.sum()) * rg.row_bytes()
    if return_scores:
        return out.unsqueeze(1), sc, lse
    return out.unsqueeze(1)


def ragged_prefill(ctx, query, scaling):
    """Several new queries on a compressed layer (a prompt continued after compression): the new
    tokens were appended to every head; query i sees the kept tokens and the new ones up to itself."""
    rg = ctx.cache_layer.ragged
    B, H, Q, D = query.shape
    Hkv = rg.shape[1]
    kk, vv, live = rg.padded()
    rows, _ = rg.rows(kk.shape[2])
    pos = rg.pos[rows]  # [B, Hkv, W]
    qpos = ctx.cache_layer.cumulative_length - Q + torch.arange(Q)
    allowed = live.unsqueeze(2) & (pos.unsqueeze(2) <= qpos.view(1, 1, Q, 1))  # [B, Hkv, Q, W]
    G = H // Hkv
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), kk.float().repeat_interleave(G, 1), vv.float().repeat_interleave(G, 1),
        attn_mask=allowed.repeat_interleave(G, 1).to(query.device), scale=scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous()


def count_kv_read(ctx, rows: int, key, value, values_too: bool = True) -> None:
    """Add ``rows`` K (and V) rows to the runtime's decode KV-read counter."""
    per = key.shape[-1] * key.element_size() + (value.shape[-1] * value.element_size() if values_too else 0)
    ctx.runtime.stats["kv_read_bytes"] += int(rows) * per



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


def dense_with_scores(ctx, query, key, value, attention_mask, scaling):
    """Exact decode attention plus scaled logits and lse. Returns (out [B, 1, H, D], scores
    [B, H, T], lse [B, H], valid) or None when the mask has a form the kernel does not take."""
    B, H, _, D = query.shape
    T = key.shape[2]
    ok, valid = step_valid(ctx, attention_mask, B, T)
    if not ok or key.shape[-1] != value.shape[-1]:
        return None
    scores = torch.empty(B, H, T, dtype=torch.float32, device=query.device)
    out, lse = decode_attention(query[:, :, 0, :], key, value, valid=valid, scale=scaling, return_lse=True,
                                scores=scores)
    count_kv_read(ctx, B * key.shape[1] * T, key, value)
    return out.unsqueeze(1), scores, lse, valid


def sparse_attend(ctx, query, key, value, attention_mask, scaling, idx, counts, head_mask=None):
    """Decode attention over the selected positions only. idx [B, Hs, n] (Hs = Hkv or 1); ``head_mask`` [B, Hkv, n]
    (int64, with Hs = Hkv): query head kh * G + g attends the entries whose bit g is set, every listed row read once
    for the group (``decode_attention``'s ``head_mask``)."""
    B, H, _, D = query.shape
    T = key.shape[2]
    ok, valid = step_valid(ctx, attention_mask, B, T)
    if not ok:
        raise AccelError("sparse decode got a per-head attention mask it cannot apply; use policy='dense' for this model")
    Hkv = key.shape[1]
    if idx.shape[1] == 1 and Hkv > 1:
        idx = idx.expand(B, Hkv, idx.shape[2]).contiguous()
        counts = counts.reshape(B, 1).expand(B, Hkv).contiguous()
    out = decode_attention(query[:, :, 0, :], key, value, lengths=counts, indices=idx, valid=valid, scale=scaling,
                           head_mask=head_mask)
    rows = int(counts.sum())
    if head_mask is not None and key.device.type != "cpu":  # the GPU backends read each query head's rows apart
        live = torch.arange(idx.shape[-1], device=idx.device) < counts.unsqueeze(-1).to(idx.device)
        g = torch.arange(query.shape[1] // key.shape[1], device=head_mask.device)
        rows = int((((head_mask.unsqueeze(-1) >> g) & 1).sum(-1) * live).sum())  # one sync, not one per head
    count_kv_read(ctx, rows, key, value)
    return out.unsqueeze(1)


def own_scores(query, key, attention_mask, ctx, scaling):
    """Scaled logits of the decode query over the whole cache (a SELECT layer's scoring pass), with
    lse and the validity mask: (scores [B, H, T], lse [B, H], valid)."""
    B, H, _, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    ok, valid = step_valid(ctx, attention_mask, B, T)
    s = torch.einsum("bhgd,bhtd->bhgt", query[:, :, 0, :].float().reshape(B, Hkv, H // Hkv, D),
                     key.float()).reshape(B, H, T) * scaling
    if valid is not None:
        s = s.masked_fill(~valid.view(B, 1, T), float("-inf"))
    count_kv_read(ctx, B * Hkv * T, key, key, values_too=False)
    return s, torch.logsumexp(s, dim=-1), valid


def ragged_with_scores(ctx, query, scaling):
    """Exact attention over a compressed layer plus position-indexed logits: (out [B, 1, H, D], scores
    [B, H, T] with -inf at positions the head does not keep, lse [B, H], T = tokens seen so far)."""
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

