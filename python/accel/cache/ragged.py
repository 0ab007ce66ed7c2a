"""Ragged per-head KV storage: every KV head of a layer keeps its own number of tokens, and the memory
of what it does not keep is really gone.

Peer tools "compress per head" by masking a dense [B, Hkv, T, D] cache, which saves nothing (see the
project notes on kvpress / AdaKV). ``RaggedKV`` instead holds one pool of rows per layer, ``k``/``v``
of shape [R, D], where head (b, h) owns the segment ``[offsets[b, h], offsets[b, h] + caps[b, h])``
and its live tokens are the first ``lengths[b, h]`` rows of it. R is the sum of the per-head
capacities, so the bytes allocated follow the per-head budgets. The decode kernels (C++, Triton,
CUDA) read the pool directly through the per-head row offsets.

Inside a segment the order of tokens is free: keys are cached after RoPE, and attention over a set
does not depend on its order, so eviction is "move the segment's last row into the evicted slot"
(one row copy per head) and the live rows always stay contiguous. Each slot remembers the absolute
position of its token (``pos``) and a policy-owned eviction score (``score``: accumulated attention
for H2O-like policies).

Heads that must grow (DuoAttention retrieval heads, Task-KV heterogeneous heads, policies that keep
the whole decode history) get spare rows; when a segment fills, the pool is re-laid out with
geometric growth of the full segments only (O(log n) copies over a generation).
"""
from __future__ import annotations

import torch


def _offsets(caps: torch.Tensor) -> torch.Tensor:
    """Segment starts [B*Hkv] for per-head capacities ``caps`` laid out back to back."""
    flat = caps.reshape(-1)
    off = torch.zeros(flat.numel(), dtype=torch.long)
    if flat.numel() > 1:
        off[1:] = torch.cumsum(flat, 0)[:-1]
    return off


class RaggedKV:
    """One layer's ragged KV cache.

    Attributes:
        k, v: [R, D] row pools.
        offsets: [B, Hkv] int64 first row of each head's segment.
        caps: [B, Hkv] int64 rows reserved for each head.
        lengths: [B, Hkv] int32 live rows of each head (the first ``lengths`` rows of its segment).
        pos: [R] int64 absolute token position held by each row (-1: unused).
        score: [R] float32 eviction score of each row (meaning chosen by the KV policy).
    """

    def __init__(self, k, v, offsets, caps, lengths, pos, score):
        self.k, self.v = k, v
        self.offsets, self.caps, self.lengths = offsets, caps, lengths
        self.pos, self.score = pos, score
        self.num_reallocations = 0
        #: [B] the batch row each row was at construction (beam search and generate's batch utilities reorder
        #: rows); per-head state kept outside the cache (a KV policy's budgets) is indexed through it
        self.batch_origin = torch.arange(offsets.shape[0])
        #: bumped on every batch reorder, so state derived from ``batch_origin`` knows when to rebuild
        self.batch_version = 0
        self._caps_flat = None

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, counts: torch.Tensor,
                   caps: torch.Tensor, positions: torch.Tensor | None = None, scores: torch.Tensor | None = None):
        """Build from a dense [B, Hkv, T, D] cache view.

        Args:
            keep: [B, Hkv, M] int token indices into ``keys`` (entries past ``counts`` ignored).
            counts: [B, Hkv] number of kept tokens per head.
            caps: [B, Hkv] rows to reserve per head (>= counts).
            positions: [B, T] absolute position of each cached token (default 0..T-1).
            scores: optional [B, Hkv, T] initial eviction score of each token.
        """
        B, Hkv, T, D = keys.shape
        counts, keep = counts.to(torch.long).cpu(), keep.cpu()
        caps = torch.maximum(caps.to(torch.long).cpu(), counts)
        offsets = _offsets(caps)
        R = int(caps.sum())
        M = keep.shape[-1]
        used = torch.arange(M).view(1, 1, M) < counts.view(B, Hkv, 1)
        src_tok = keep.long().clamp(0, max(T - 1, 0))
        dst = (offsets.view(B, Hkv, 1) + torch.arange(M).view(1, 1, M))[used]
        k = keys.new_empty(R, D)
        v = values.new_empty(R, values.shape[-1])
        bi = torch.arange(B).view(B, 1, 1).expand(B, Hkv, M)[used]
        hi = torch.arange(Hkv).view(1, Hkv, 1).expand(B, Hkv, M)[used]
        ti = src_tok[used]
        k[dst] = keys[bi, hi, ti]
        v[dst] = values[bi, hi, ti]
        pos = torch.full((R,), -1, dtype=torch.long)
        if positions is None:
            pos[dst] = ti
        else:
            pos[dst] = positions.long().cpu()[bi, ti]  # metadata lives on the CPU, the pools on the data's device
        score = torch.zeros(R, dtype=torch.float32)
        if scores is not None:
            score[dst] = scores.float().cpu()[bi, hi, ti]
        return cls(k, v, offsets.view(B, Hkv), caps, counts.to(torch.int32), pos, score)

    # -- sizes ---------------------------------------------------------------------------------------
    @property
    def shape(self):
        return tuple(self.offsets.shape)

    def row_bytes(self) -> int:
        return self.k.shape[1] * self.k.element_size() + self.v.shape[1] * self.v.element_size()

    def nbytes(self) -> int:
        """KV bytes of the live tokens of every head."""
        return int(self.lengths.sum()) * self.row_bytes()

    def allocated_bytes(self) -> int:
        """Bytes this layer really holds: the pools plus per-row and per-head metadata."""
        meta = self.pos.numel() * self.pos.element_size() + self.score.numel() * self.score.element_size()
        meta += 3 * self.offsets.numel() * 8
        return self.k.shape[0] * self.row_bytes() + meta

    # -- rows ----------------------------------------------------------------------------------------
    def rows(self, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, Hkv, W] row numbers of each head's first W slots (clamped), [B, Hkv, W] live mask)."""
        W = int(self.lengths.max()) if width is None else int(width)
        W = max(W, 1)
        ar = torch.arange(W).view(1, 1, W)
        live = ar < self.lengths.view(*self.shape, 1)
        rows = (self.offsets.view(*self.shape, 1) + ar).clamp(max=max(self.k.shape[0] - 1, 0))
        return rows, live

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, live) as padded [B, Hkv, W, D] copies (torch fallbacks and tests)."""
        rows, live = self.rows()
        return self.k[rows], self.v[rows], live

    # -- updates -------------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        """Append one token per head (keys/values [B, Hkv, 1, D]) at absolute ``position``; full
        segments grow first."""
        from .. import _ext

        B, Hkv = self.shape
        if _ext.HAS_CPU_EXT and self.k.device.type == "cpu":
            nk = keys.reshape(B * Hkv, -1).to(self.k.dtype).contiguous()
            nv = values.reshape(B * Hkv, -1).to(self.v.dtype).contiguous()
            if self._caps_flat is None:
                self._caps_flat = self.caps.reshape(-1).contiguous()
            ext = _ext.cpu_ext()
            if ext.ragged_append(self.k, self.v, self.pos, self.score, self.offsets.reshape(-1), self.lengths.view(-1),
                                 self._caps_flat, nk, nv, int(position)):
                return
            self._grow(self.lengths.long() >= self.caps)
            self._caps_flat = None
            if not ext.ragged_append(self.k, self.v, self.pos, self.score, self.offsets.reshape(-1),
                                     self.lengths.view(-1), self.caps.reshape(-1).contiguous(), nk, nv, int(position)):
                raise RuntimeError("ragged KV append failed after growing the pool")  # pragma: no cover
            return
        if bool((self.lengths.long() >= self.caps).any()):
            self._grow(self.lengths.long() >= self.caps)
        rows = (self.offsets + self.lengths.long()).flatten()
        self.k[rows] = keys.reshape(B * Hkv, -1).to(self.k.dtype)
        self.v[rows] = values.reshape(B * Hkv, -1).to(self.v.dtype)
        self.pos[rows] = position
        self.score[rows] = 0.0
        self.lengths += 1

    def evict(self, slots: torch.Tensor, which: torch.Tensor) -> None:
        """Evict slot ``slots[b, h]`` of every head where ``which[b, h]`` (bool): the head's last live
        row moves into it and the head shrinks by one."""
        if not bool(which.any()):
            return
        off = self.offsets[which]
        last = off + self.lengths[which].long() - 1
        dst = off + slots[which].long()
        self.k[dst] = self.k[last]
        self.v[dst] = self.v[last]
        self.pos[dst] = self.pos[last]
        self.score[dst] = self.score[last]
        self.pos[last] = -1
        self.lengths[which] -= 1

    def _grow(self, full: torch.Tensor) -> None:
        """Re-lay out the pool with more rows for the heads in ``full`` (x1.5 + 64)."""
        caps = torch.where(full, (self.caps.float() * 1.5).long() + 64, self.caps)
        self.relayout(caps)

    def relayout(self, caps: torch.Tensor) -> None:
        """Copy the live rows into a new pool with per-head capacities ``caps`` (>= lengths)."""
        rows, live = self.rows()
        self._rebuild(rows, live, torch.maximum(caps.long(), self.lengths.long()), self.lengths)
        self.num_reallocations += 1

    # -- batch reordering (beam search, generate's batch utilities) ------------------------------------
    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (and reorder) the batch rows ``index``."""
        rows, live = self.rows()
        index = index.long().cpu()
        self._rebuild(rows[index], live[index], self.caps[index], self.lengths[index])
        self.batch_origin = self.batch_origin[index]
        self.batch_version += 1

    def _rebuild(self, rows, live, caps, lengths) -> None:
        """New pools with segments of ``caps`` rows holding the rows ``rows[live]`` (per head, in order)."""
        B, Hkv = lengths.shape
        offsets = _offsets(caps)
        R = int(caps.sum())
        W = rows.shape[-1]
        dst = (offsets.view(B, Hkv, 1) + torch.arange(W).view(1, 1, W))[live]
        src = rows[live]
        k = self.k.new_empty(R, self.k.shape[1])
        v = self.v.new_empty(R, self.v.shape[1])
        pos = torch.full((R,), -1, dtype=torch.long)
        score = torch.zeros(R, dtype=torch.float32)
        k[dst], v[dst], pos[dst], score[dst] = self.k[src], self.v[src], self.pos[src], self.score[src]
        self.k, self.v, self.pos, self.score = k, v, pos, score
        self.offsets, self.caps = offsets.view(B, Hkv), caps.clone()
        if lengths is not self.lengths:  # a re-layout keeps the tensor the cache layer shares as head_lengths
            self.lengths = lengths.clone()
        self._caps_flat = None
