"""Sparse-attention ops: token selection and block-sparse prefill, with backend dispatch.

Backends: the C++ CPU kernels (accel._C) on CPU tensors, else the pure-torch references
(``_selection_reference``, ``block_sparse_prefill_ref``) that are also the test oracles.
Block patterns are 64-token blocks; helpers build per-head sink+window and vertical/slash lists.
"""
from __future__ import annotations

import math

import torch

from .. import _ext
from ..errors import AccelError
from ._selection_reference import select_topk_ref
from .attention import choose_backend, on_device

BLOCK = 64
AGGS = {"max": 0, "mean": 1, "sum": 2, "shared": 3}


def select_topk(q, k, lengths, budget: int, *, agg: str = "max", chunk: int = 1, sink: int = 0, recent: int = 0,
                scale: float | None = None, backend: str | None = None):
    """Selected token positions per KV head (or shared): (indices [B, Hsel, S] int32 sorted, -1
    padded; counts [B, Hsel] int32). See ``_selection_reference.select_topk_ref``."""
    if agg not in AGGS:
        raise AccelError(f"aggregation must be one of {sorted(AGGS)}, got {agg!r}")
    if budget < 1 or chunk < 1 or sink < 0 or recent < 0:
        raise AccelError(f"budget and chunk must be >= 1 and sink/recent >= 0 (got budget={budget}, chunk={chunk}, "
                         f"sink={sink}, recent={recent})")
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    lengths = torch.as_tensor(lengths, dtype=torch.int32).reshape(-1)
    backend = backend or choose_backend(q.device)
    if backend == "cpp":
        return _ext.cpu_ext().select_topk(q, k, lengths, int(budget), AGGS[agg], int(chunk), int(sink), int(recent), scale)
    if backend in ("triton", "cuda") and chunk & (chunk - 1) == 0:
        from accel.kernels.attention.select import select_topk_triton

        return select_topk_triton(q, k, lengths, budget, agg=agg, chunk=chunk, sink=sink, recent=recent, scale=scale)
    rows = []
    for b in range(q.shape[0]):
        rows.append(select_topk_ref(q[b : b + 1], k[b : b + 1], int(lengths[b]), budget, agg=agg, chunk=chunk,
                                    sink=sink, recent=recent, scale=scale))
    n = max(r.shape[-1] for r in rows)
    idx = torch.full((q.shape[0], rows[0].shape[1], n), -1, dtype=torch.int32, device=q.device)
    for b, r in enumerate(rows):
        idx[b, :, : r.shape[-1]] = r.int()
    return idx, (idx >= 0).sum(-1).int()


def block_sparse_prefill_ref(q, k, v, blocks, counts, scale: float | None = None):
    """Dense attention under the block mask (and the causal mask). q [B, H, Tq, D], k/v [B, Hkv, Tk, D]."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = torch.zeros(H, Tq, Tk, dtype=torch.bool)
    blocks, counts = blocks.cpu(), counts.cpu()
    for h in range(H):
        for qb in range(blocks.shape[1]):
            for j in blocks[h, qb, : counts[h, qb]].tolist():
                mask[h, qb * BLOCK : (qb + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = True
    mask &= torch.arange(Tk)[None, :] <= (torch.arange(Tq)[:, None] + Tk - Tq)
    mask = mask.to(q.device)
    s = (q.float() @ k.float().repeat_interleave(G, 1).transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return p @ v.float().repeat_interleave(G, 1)


def block_sparse_prefill(q, k, v, blocks, counts, scale: float | None = None, backend: str | None = None):
    """Causal attention where query block i of head h attends to key blocks ``blocks[h, i, :counts[h, i]]``."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    backend = backend or choose_backend(q.device)
    if backend in ("cuda", "triton"):
        blocks, counts = on_device(q.device, blocks, counts)
    if backend == "cpp":
        return _ext.cpu_ext().block_sparse_prefill(q, k, v, blocks, counts, scale).to(q.dtype)
    if backend == "cuda":
        return _ext.cuda_ext().block_sparse_prefill(q, k, v, blocks, counts, scale).to(q.dtype)
    if backend == "triton":
        from accel.kernels.attention.block_sparse import block_sparse_prefill_triton

        return block_sparse_prefill_triton(q, k, v, blocks, counts, scale)
    return block_sparse_prefill_ref(q, k, v, blocks, counts, scale).to(q.dtype)


def _pack(lists, num_heads: int, nqb: int):
    """Per-head, per-query-block lists of key blocks -> (blocks [H, nqb, width], counts [H, nqb])."""
    width = max(len(x) for per_h in lists for x in per_h)
    blocks = torch.zeros(num_heads, nqb, width, dtype=torch.int32)
    counts = torch.zeros(num_heads, nqb, dtype=torch.int32)
    for h, per_h in enumerate(lists):
        for qb, sel in enumerate(per_h):
            blocks[h, qb, : len(sel)] = torch.tensor(sel, dtype=torch.int32)
            counts[h, qb] = len(sel)
    return blocks, counts


def sink_window_blocks(num_heads: int, q_len: int, k_len: int, sink: int | list[int], window: int | list[int]):
    """Block lists for sink + sliding-window attention per head (token counts rounded up to blocks).

    ``sink``/``window`` may differ per head (MoA-style heterogeneous spans). Returns (blocks, counts)."""
    nqb = (q_len + BLOCK - 1) // BLOCK
    nkb = (k_len + BLOCK - 1) // BLOCK
    off = k_len - q_len
    sinks = sink if isinstance(sink, list) else [sink] * num_heads
    wins = window if isinstance(window, list) else [window] * num_heads
    lists = []
    for h in range(num_heads):
        sb = (sinks[h] + BLOCK - 1) // BLOCK
        wb = (wins[h] + BLOCK - 1) // BLOCK
        per_h = []
        for qb in range(nqb):
            last = min(nkb - 1, (off + min(q_len, (qb + 1) * BLOCK) - 1) // BLOCK)
            first_q = (off + qb * BLOCK) // BLOCK
            sel = set(range(min(sb, last + 1))) | set(range(max(0, first_q - wb), last + 1))
            per_h.append(sorted(sel))
        lists.append(per_h)
    return _pack(lists, num_heads, nqb)


def vertical_slash_blocks(num_heads: int, q_len: int, k_len: int, vertical: list[list[int]], slash: list[list[int]]):
    """Block lists from vertical (fixed key blocks) and slash (diagonal offsets in blocks) patterns per
    head, after MInference's vertical-slash shape; the diagonal block is always included."""
    nqb = (q_len + BLOCK - 1) // BLOCK
    off_b = (k_len - q_len) // BLOCK
    lists = []
    for h in range(num_heads):
        per_h = []
        for qb in range(nqb):
            diag = qb + off_b
            sel = {v for v in vertical[h] if v <= diag} | {diag - s for s in slash[h] if 0 <= diag - s} | {diag}
            per_h.append(sorted(sel))
        lists.append(per_h)
    return _pack(lists, num_heads, nqb)
