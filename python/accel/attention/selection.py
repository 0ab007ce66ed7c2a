"""Token selection for the sparse decode policies (HyLRA, DELTA, Recycled Attention; methods.md section 0):

* ``token_budget``: a layer's token budget from ``topk`` (tokens) or ``topk_ratio`` (of the context).
* ``select_from_scores``: top-k token positions from a decode query's scaled logits: probabilities,
  aggregation over the query heads of a KV head (max / mean / sum) or of the whole layer (shared),
  optional 1-D max pooling (RefreshKV, kernel 7), sum into chunks/pages, forced sink and recent
  chunks, sorted ascending (conventions 1-3). Left padding is respected: the sink is counted from each row's
  first real token and padded positions have probability 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _ext
from ..errors import AccelError


AGG_CHOICES = ("max", "mean", "sum", "shared")


def check_budget_knobs(name: str, topk, topk_ratio, sink: int, recent: int, chunk: int,
                       recent_name: str = "recent") -> None:
    """The budget options of a top-k policy, refused in one line that names the policy's own options (``recent_name``:
    what the policy calls its recent tokens, e.g. hip's ``window``)."""
    if topk is not None and (not isinstance(topk, int) or topk < 1):
        raise AccelError(f"{name}: topk must be a positive number of tokens or None (then topk_ratio applies), got {topk!r}")
    if topk is None and (topk_ratio is None or not (0.0 < float(topk_ratio) <= 1.0)):
        raise AccelError(f"{name}: topk_ratio must be in (0, 1] (fraction of the context kept), got {topk_ratio!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise AccelError(f"{name}: chunk must be a positive integer, got {chunk!r}")
    r = recent_name
    if sink < 0 or recent < 0:
        raise AccelError(f"{name}: sink and {r} must be >= 0, got sink={sink}, {r}={recent}")
    if topk is not None and sink + recent > topk:
        raise AccelError(f"{name}: sink + {r} ({sink} + {recent}) exceed topk={topk}; the budget includes them, "
                         f"so lower sink/{r} or raise topk")


def token_budget(T: int, topk: int | None, topk_ratio: float | None, min_tokens: int = 0) -> int:
    """Tokens kept per KV head at context length ``T`` (sink and recent included). With a ratio, never
    fewer than ``min_tokens`` (short prompts stay exact instead of keeping one or two tokens)."""
    if topk is not None:
        return int(topk)
    return max(1, int(min_tokens), int(math.ceil(float(topk_ratio) * T)))


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

