"""Quest page metadata (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context
LLM Inference"): per KV page of ``page_size`` tokens and per KV head, the elementwise min and max of
the keys, maintained incrementally as the cache grows, and the page upper bound
``U = sum_d max(q_d * M_d, q_d * m_d)`` >= q.k for every key of the page.

Full pages are summarised once, when they fill; the last partial page is recomputed on each query
(at most ``page_size - 1`` keys) into a spare slot after them. Vectorised torch ops, so the same code serves CPU and
GPU tensors.
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
        """Room for ``n_pages`` page summaries plus one slot for the partial last page."""
        B, H, _, D = keys.shape
        cap = 0 if self.kmin is None else self.kmin.shape[2]
        if n_pages + 1 <= cap:
            return
        new_cap = max(n_pages + 1, int(cap * 1.5) + 16)
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
        self._grow(keys, n_full)
        if n_full <= self.full_pages:
            return
        lo, hi = self.full_pages * self.page, n_full * self.page
        blk = keys[:, :, lo:hi].float().unflatten(2, (n_full - self.full_pages, self.page))
        self.kmin[:, :, self.full_pages : n_full] = blk.amin(dim=3)
        self.kmax[:, :, self.full_pages : n_full] = blk.amax(dim=3)
        self.full_pages = n_full

    def bounds(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kmin, kmax) of every page including the partial last one: [B, Hkv, n_pages, D] views of the summaries (the
        partial page's min and max are written into the slot after the full pages, so no step copies the others)."""
        self.update(keys)
        T = keys.shape[2]
        n = self.full_pages
        if T % self.page:
            tail = keys[:, :, n * self.page :]
            self.kmin[:, :, n].copy_(tail.amin(dim=2))
            self.kmax[:, :, n].copy_(tail.amax(dim=2))
            n += 1
        return self.kmin[:, :, :n], self.kmax[:, :, :n]

    def page_scores(self, q: torch.Tensor, keys: torch.Tensor, agg: str = "max") -> torch.Tensor:
        """Upper bounds [B, Hkv, n_pages] for queries q [B, H, D], aggregated over each GQA group."""
        return upper_bounds(q, *self.bounds(keys), agg)


def upper_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, agg: str = "max") -> torch.Tensor:
    """Quest's page upper bounds [B, Hkv, n_pages] for queries q [B, H, D] from page summaries [B, Hkv, n_pages, D],
    aggregated over each GQA group (``max``, ``mean`` or ``sum``).

    ``sum_d max(q_d M_d, q_d m_d)`` is ``sum_d max(q_d, 0) M_d + sum_d min(q_d, 0) m_d`` (M >= m): two batched matrix
    products over the summaries, which read each once instead of materialising the [B, Hkv, G, n_pages, D] products
    (the same bound; only the summation order differs)."""
    if agg not in ("max", "mean", "sum"):
        from ..errors import AccelError

        raise AccelError(f"Quest aggregation must be max, mean or sum, got {agg!r}")
    B, H, D = q.shape
    Hkv = kmin.shape[1]
    qq = q.float().view(B, Hkv, H // Hkv, D).transpose(2, 3)  # [B, Hkv, D, G]
    ub = torch.matmul(kmax, qq.clamp(min=0)) + torch.matmul(kmin, qq.clamp(max=0))  # [B, Hkv, n_pages, G]
    if agg == "max":
        return ub.amax(dim=3)
    if agg == "mean":
        return ub.mean(dim=3)
    return ub.sum(dim=3)
