"""Quest page metadata (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context
LLM Inference"): per KV page of ``page_size`` tokens and per KV head, the elementwise min and max of
the keys, maintained incrementally as the cache grows, and the page upper bound
``U = sum_d max(q_d * M_d, q_d * m_d)`` >= q.k for every key of the page.

Full pages are summarised once, when they fill; the last partial page is recomputed on each query
(at most ``page_size - 1`` keys) into a spare slot after them. Vectorised torch ops, so the same code serves CPU and
GPU tensors.

The summaries are kept in float32 or in bfloat16 (``dtype``). In bfloat16 a minimum is rounded down and a maximum up to
the next bfloat16 value (``bf16_outward``), so the bound stays an upper bound of every ``q . k`` of the page; keys that
are already bfloat16 are kept exactly. Half the bytes of float32 summaries, which a step reads in full.
"""
from __future__ import annotations

import torch


def bf16_outward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 ``x`` as bfloat16 rounded outward: to the next bfloat16 value at or above ``x`` (``up``) or at or below
    it; NaN stays NaN. The same bits as the C++ summaries (``bf16_outward`` in accel/cpu/quest.h)."""
    bits = x.float().contiguous().view(torch.int32)
    hi = (bits >> 16) & 0xFFFF
    outward = ((bits & 0xFFFF) != 0) & ((bits < 0) != up)  # truncation moved toward zero
    hi = torch.where(torch.isnan(x), torch.full_like(hi, 0x7FC0), hi + outward.to(torch.int32))
    return torch.where(hi >= 0x8000, hi - 0x10000, hi).to(torch.int16).view(torch.bfloat16)


class QuestMetadata:
    def __init__(self, page_size: int = 16, dtype: torch.dtype = torch.float32):
        if page_size < 1:
            from ..errors import AccelError

            raise AccelError(f"Quest page_size must be >= 1, got {page_size}")
        if dtype not in (torch.float32, torch.bfloat16):
            from ..errors import AccelError

            raise AccelError(f"Quest page summaries are float32 or bfloat16, got {dtype}")
        self.page = page_size
        self.dtype = dtype
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
        kmin = keys.new_empty(B, H, new_cap, D, dtype=self.dtype)
        kmax = keys.new_empty(B, H, new_cap, D, dtype=self.dtype)
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
        self.kmin[:, :, self.full_pages : n_full] = self._store(blk.amin(dim=3), up=False)
        self.kmax[:, :, self.full_pages : n_full] = self._store(blk.amax(dim=3), up=True)
        self.full_pages = n_full

    def _store(self, x: torch.Tensor, up: bool) -> torch.Tensor:
        return bf16_outward(x, up) if self.dtype == torch.bfloat16 else x

    def bounds(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kmin, kmax) of every page including the partial last one: [B, Hkv, n_pages, D] views of the summaries (the
        partial page's min and max are written into the slot after the full pages, so no step copies the others)."""
        self.update(keys)
        T = keys.shape[2]
        n = self.full_pages
        if T % self.page:
            tail = keys[:, :, n * self.page :]
            self.kmin[:, :, n].copy_(self._store(tail.float().amin(dim=2), up=False))
            self.kmax[:, :, n].copy_(self._store(tail.float().amax(dim=2), up=True))
            n += 1
        return self.kmin[:, :, :n], self.kmax[:, :, :n]

    def page_scores(self, q: torch.Tensor, keys: torch.Tensor, agg: str = "max") -> torch.Tensor:
        """Upper bounds [B, Hkv, n_pages] for queries q [B, H, D], aggregated over each GQA group (``none``: each
        query head's own, [G, B, Hkv, n_pages])."""
        return upper_bounds(q, *self.bounds(keys), agg)


def upper_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, agg: str = "max") -> torch.Tensor:
    """Quest's page upper bounds [B, Hkv, n_pages] for queries q [B, H, D] from page summaries [B, Hkv, n_pages, D],
    aggregated over each GQA group (``max``, ``mean`` or ``sum``), or each query head's own (``none``: [G, B, Hkv,
    n_pages], query head kh * G + g at [g, :, kh]).

    ``sum_d max(q_d M_d, q_d m_d)`` is ``sum_d max(q_d, 0) M_d + sum_d min(q_d, 0) m_d`` (M >= m): two batched matrix
    products over the summaries, which read each once instead of materialising the [B, Hkv, G, n_pages, D] products
    (the same bound; only the summation order differs)."""
    if agg not in ("max", "mean", "sum", "none"):
        from ..errors import AccelError

        raise AccelError(f"Quest aggregation must be max, mean, sum or none, got {agg!r}")
    B, H, D = q.shape
    Hkv = kmin.shape[1]
    qq = q.float().view(B, Hkv, H // Hkv, D).transpose(2, 3)  # [B, Hkv, D, G]
    ub = torch.matmul(kmax.float(), qq.clamp(min=0)) + torch.matmul(kmin.float(), qq.clamp(max=0))  # [B, Hkv, n_pages, G]
    if agg == "none":
        return ub.permute(3, 0, 1, 2)
    if agg == "max":
        return ub.amax(dim=3)
    if agg == "mean":
        return ub.mean(dim=3)
    return ub.sum(dim=3)
