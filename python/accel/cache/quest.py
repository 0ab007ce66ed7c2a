"""Quest page metadata (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context
LLM Inference"): per KV page of ``page_size`` tokens and per KV head, the elementwise min and max of
the keys, maintained incrementally as the cache grows, and the page upper bound
``U = sum_d max(q_d * M_d, q_d * m_d)`` >= q.k for every key of the page.

Full pages are summarised once, when they fill; the last partial page is recomputed on each query
(at most ``page_size - 1`` keys). Vectorised torch ops, so the same code serves CPU and GPU tensors.
"""
from __future__ import annotations

import torch


class QuestMetadata:
    def __init__(self, page_size: int = 16):
        if page_size < 1:
            from ..errors import AccelError

            raise AccelError(f"Quest page_size must be >= 1, got {page_size}")
        self.page = page_size
        self.kmin: torch.Tensor | None = None  # [B, Hkv, cap_pages, D]
        self.kmax: torch.Tensor | None = None
        self.full_pages = 0

    def _grow(self, keys: torch.Tensor, n_pages: int) -> None:
        B, H, _, D = keys.shape
        cap = 0 if self.kmin is None else self.kmin.shape[2]
        if n_pages <= cap:
            return
        new_cap = max(n_pages, int(cap * 1.5) + 16)
        kmin = keys.new_empty(B, H, new_cap, D, dtype=torch.float32)
        kmax = keys.new_empty(B, H, new_cap, D, dtype=torch.float32)
        if self.kmin is not None:
            kmin[:, :, : self.full_pages] = self.kmin[:, :, : self.full_pages]
            kmax[:, :, : self.full_pages] = self.kmax[:, :, : self.full_pages]
        self.kmin, self.kmax = kmin, kmax

    def update(self, keys: torch.Tensor) -> None:
        """``keys`` [B, Hkv, T, D]: the layer's keys so far (a view of the cache)."""
        T = keys.shape[2]
        n_full = T // self.page
        if n_full <= self.full_pages:
            return
        self._grow(keys, n_full)
        lo, hi = self.full_pages * self.page, n_full * self.page
        blk = keys[:, :, lo:hi].float().unflatten(2, (n_full - self.full_pages, self.page))
        self.kmin[:, :, self.full_pages : n_full] = blk.amin(dim=3)
        self.kmax[:, :, self.full_pages : n_full] = blk.amax(dim=3)
        self.full_pages = n_full

    def bounds(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kmin, kmax) of every page including the partial last one: [B, Hkv, n_pages, D]."""
        self.update(keys)
        T = keys.shape[2]
        mn = self.kmin[:, :, : self.full_pages] if self.kmin is not None else keys.new_empty(*keys.shape[:2], 0, keys.shape[3])
        mx = self.kmax[:, :, : self.full_pages] if self.kmax is not None else mn
        if T % self.page:
            tail = keys[:, :, self.full_pages * self.page :].float()
            mn = torch.cat([mn.float(), tail.amin(dim=2, keepdim=True)], dim=2)
            mx = torch.cat([mx.float(), tail.amax(dim=2, keepdim=True)], dim=2)
        return mn, mx

    def page_scores(self, q: torch.Tensor, keys: torch.Tensor, agg: str = "max") -> torch.Tensor:
        """Upper bounds [B, Hkv, n_pages] for queries q [B, H, D], aggregated over each GQA group."""
        mn, mx = self.bounds(keys)
        B, H, D = q.shape
        Hkv = mn.shape[1]
        qq = q.float().view(B, Hkv, H // Hkv, 1, D)
        ub = torch.maximum(qq * mx.unsqueeze(2), qq * mn.unsqueeze(2)).sum(-1)  # [B, Hkv, G, n_pages]
        if agg == "max":
            return ub.amax(dim=2)
        if agg == "mean":
            return ub.mean(dim=2)
        if agg == "sum":
            return ub.sum(dim=2)
        from ..errors import AccelError

        raise AccelError(f"Quest aggregation must be max, mean or sum, got {agg!r}")
