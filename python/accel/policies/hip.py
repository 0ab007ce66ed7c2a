"""HiP attention (Lee et al., "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning",
ICLR 2025, arXiv 2406.09827; methods.md 7.4): a top-k key mask found by a hierarchical search, at decode time.

Per KV head, the keys between the sinks and the recent window are split into ``n_blocks`` equal branches. Each
iteration splits every branch in two and scores each child by the logit of one representative key (the query's
``q . k``, the maximum over the GQA group's query heads); the ``n_blocks`` best children are kept. The search stops
when the branches are no longer than ``key_block`` tokens, so it reads ``2 * n_blocks`` keys per iteration and
``log2(T / topk)`` iterations instead of all ``T`` keys. The step then attends exactly over the kept branches, the
first ``sink`` tokens and the last ``window`` tokens, with accel's sparse decode kernel reading them in place.
The mask is searched from the root every ``refresh`` decode steps; in between, as the paper refreshes its levels at
different intervals, the cached branches of a coarser level (``refine_levels`` above the key block) are refined
again with each step's query (the finest levels only: ``2 * n_blocks`` keys per level), the sinks stay and the window
follows the newest tokens. The first ``dense_layers`` layers stay dense. A budget that covers the context is exact
dense attention.

[INFER] choices, switchable: the budget ``topk`` (or ``topk_ratio`` of the context, default 1/8, as accel's other
sparse-attention policies) counts the sinks and the window, and ``n_blocks = ceil((topk - sink - window) /
key_block)``; the representative key of a child is its middle key (``representative="middle"``; ``"first"``: its
first key; ``"max"``: the exhaustive maximum over all its keys, which makes the search an exact block top-k and is
meant for checking); key blocks of 4 tokens (the paper's b_k spans 2-8; with 8, passkey retrieval on SmolLM2 at 2K and
1/8 of the context fell to 1 of 8 where 4 and 2 answered 6, dense 5); a full search every 8 steps with the two finest
levels refined at every step (see docs/methods/hip.md for what reusing the whole mask cost); sink 16 and window 64
tokens; the first two layers dense. The prefill is exact unless ``sparse_prefill=True`` (``prefill_blocks``: the same
search per 64-token query block, on the block-sparse prefill kernel).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import _ext
from ..attention.context import LayerContext
from ..attention.decode import dense_decode, sparse_attend
from ..attention.masks import first_valid_positions, prompt_valid, step_valid
from ..attention.selection import check_budget_knobs, token_budget
from ..errors import AccelError
from ..models.base import ModelInfo
from ..plan import LayerPlan, Plan
from .base import AttentionPolicy
from .registry import register_policy

_REPRESENTATIVES = ("middle", "first", "max")


@register_policy("hip")
@dataclass
class HiPPolicy(AttentionPolicy):
    """Knobs:

    Args:
        topk: tokens attended per KV head and step, the sinks and the window included; None: ``topk_ratio``.
        topk_ratio: fraction of the current context when ``topk`` is None (default 1/8).
        key_block: the branch length at which the search stops (the paper's key block b_k).
        sink: the first tokens of every sequence, always attended.
        window: the most recent tokens, always attended.
        refresh: decode steps between two full mask searches (1: every step).
        refine_levels: the finest levels of the search, run again at every step between full searches from the
            cached coarser branches (0: the whole mask is reused until the next full search).
        representative: the key that scores a branch: 'middle' (default), 'first' or 'max' (exhaustive).
        rep_keys: keys scored per child, from the representative on ('first': the child's first keys; 'middle':
            centred on its middle), the child's score their largest logit (HiP's code scores a child by all keys of
            its first key block); 1 (default): one key.
        dense_layers: the first layers that stay dense; it shapes ``build_plan``, and a plan's per-layer modes decide.
        min_topk: with ``topk_ratio``, attend to at least this many tokens (short prompts stay exact).
        sparse_prefill: the prefill attends per 64-token query block to the key blocks the same search picks (with
            the block-sparse prefill kernel); False (default): an exact prefill.
    """

    per_kv_head = True

    plan_modes: ClassVar[tuple] = ("full", "hip")

    topk: int | None = None
    topk_ratio: float | None = 0.125
    key_block: int = 4
    sink: int = 16
    window: int = 64
    refresh: int = 8
    refine_levels: int = 2
    representative: str = "middle"
    rep_keys: int = 1
    dense_layers: int = 2
    min_topk: int = 128
    sparse_prefill: bool = False
    branches: str = "equal"

    def validate(self) -> None:
        for knob in ("sink", "window", "dense_layers", "min_topk", "refine_levels"):
            if not isinstance(getattr(self, knob), int) or getattr(self, knob) < 0:
                raise AccelError(f"hip: {knob} must be an integer >= 0, got {getattr(self, knob)!r}")
        check_budget_knobs("hip", self.topk, self.topk_ratio, self.sink, self.window, 1, recent_name="window")
        for knob in ("key_block", "refresh", "rep_keys"):
            if not isinstance(getattr(self, knob), int) or getattr(self, knob) < 1:
                raise AccelError(f"hip: {knob} must be an integer >= 1, got {getattr(self, knob)!r}")
        if not isinstance(self.sparse_prefill, bool):
            raise AccelError(f"hip: sparse_prefill must be True or False, got {self.sparse_prefill!r}")
        if self.sparse_prefill and self.representative == "max":
            raise AccelError("hip: sparse_prefill scores branches by one key ('middle' or 'first'); representative='max' "
                             "is for decode checks: use sparse_prefill=False with it")
        if self.branches not in ("aligned", "equal"):
            raise AccelError(f"hip: branches must be 'aligned' (start at key_block * 2**m tokens) or 'equal' (equal "
                             f"splits of the span), got {self.branches!r}")
        if self.representative not in _REPRESENTATIVES:
            raise AccelError(f"hip: representative must be one of {', '.join(_REPRESENTATIVES)}, "
                             f"got {self.representative!r}")
        if self.rep_keys != 1 and (self.representative == "max" or self.sparse_prefill):
            raise AccelError(f"hip: rep_keys={self.rep_keys} applies to decode's 'middle' or 'first' representatives "
                             "(representative='max' reads every key; sparse_prefill scores one key per branch); "
                             "use rep_keys=1 with them")

    def check_plan_params(self, plan: Plan) -> None:
        self.check_plan_knobs(plan)

    def build_plan(self, info: ModelInfo) -> Plan:
        layers = [LayerPlan(mode="full" if i < self.dense_layers else "hip", attention="hip")
                  for i in range(info.num_layers)]
        return Plan(policy="hip", num_layers=info.num_layers, num_kv_heads=info.num_kv_heads,
                    model_type=info.model_type, params=self.knobs(), layers=layers)

    def prefill(self, ctx: LayerContext, query, key, value, attention_mask, scaling, **kwargs):
        ctx.state.pop("hip", None)  # new tokens in the cache: the next decode step searches again
        out = self._sparse_prefill(ctx, query, key, value, attention_mask, scaling)
        if out is None:
            return super().prefill(ctx, query, key, value, attention_mask, scaling, **kwargs)
        return out

    def _sparse_prefill(self, ctx, query, key, value, attention_mask, scaling):
        """HiP's block-sparse prefill ([B, T, H, D]), or None where the prefill stays exact: off by default, dense
        layers, sliding-window layers, a continued cache, padded prompts (the block kernel has no padding mask) and
        budgets that cover the prompt."""
        cl = ctx.cache_layer
        if (not bool(self.plan_knob(ctx, "sparse_prefill")) or ctx.plan.mode != "hip" or cl is None or cl.is_sliding
                or key.shape[-1] != value.shape[-1]):
            return None
        B, H, T, D = query.shape
        if key.shape[2] != T or prompt_valid(attention_mask, B, T) is not None:
            return None
        topk = ctx.plan.topk if ctx.plan.topk is not None else self.plan_knob(ctx, "topk")
        budget = token_budget(T, topk, self.plan_knob(ctx, "topk_ratio"), int(self.plan_knob(ctx, "min_topk")))
        if budget >= T:
            return None
        from ..ops.sparse import block_sparse_prefill

        blocks, counts = prefill_blocks(query, key, scaling, budget, int(self.plan_knob(ctx, "sink")),
                                        int(self.plan_knob(ctx, "window")), self.plan_knob(ctx, "representative"))
        out = torch.cat([block_sparse_prefill(query[b:b + 1], key[b:b + 1], value[b:b + 1], blocks[b], counts[b],
                                              scale=scaling) for b in range(B)])
        ctx.runtime.stats["hip_prefill_blocks"] = ctx.runtime.stats.get("hip_prefill_blocks", 0) + int(counts.sum())
        return out.transpose(1, 2).contiguous()

    def decode(self, ctx: LayerContext, query, key, value, attention_mask, scaling, **kwargs):
        cl = ctx.cache_layer
        if ctx.plan.mode != "hip" or (cl is not None and cl.is_sliding) or key.shape[-1] != value.shape[-1]:
            return dense_decode(ctx, query, key, value, attention_mask, scaling)
        B, H, _, D = query.shape
        T = key.shape[2]
        topk = ctx.plan.topk if ctx.plan.topk is not None else self.plan_knob(ctx, "topk")
        budget = token_budget(T, topk, self.plan_knob(ctx, "topk_ratio"), int(self.plan_knob(ctx, "min_topk")))
        sink, window = int(self.plan_knob(ctx, "sink")), int(self.plan_knob(ctx, "window"))
        kb = int(self.plan_knob(ctx, "key_block"))
        n_blocks = max(0, math.ceil((budget - sink - window) / kb))
        if budget >= T or sink + window + n_blocks * kb >= T:  # the budget covers the context: exact dense attention
            return dense_decode(ctx, query, key, value, attention_mask, scaling)
        ok, valid = step_valid(ctx, attention_mask, B, T)
        if not ok:
            raise AccelError("hip got a per-head attention mask it cannot apply; use policy='dense' for this model")
        first = first_valid_positions(valid, B) if valid is not None else torch.zeros(B, dtype=torch.long)
        first = first.to(key.device)
        version = cl.version if cl is not None else None
        # (cache version, T at the last full search, steps since, coarse branches (lo, hi), the span's start)
        held = ctx.state.get("hip")
        refresh, levels = int(self.plan_knob(ctx, "refresh")), int(self.plan_knob(ctx, "refine_levels"))
        rep = self.plan_knob(ctx, "representative")
        rk = int(self.plan_knob(ctx, "rep_keys"))
        aligned = self.plan_knob(ctx, "branches") == "aligned"
        q = query[:, :, 0, :]
        # reuse the cached branches only while each step since the search appended one token (tokens added by a
        # multi-token forward on the same cache, a second turn, start a new search)
        if (held is None or held[0] != version or held[2] + 1 >= refresh or T != held[1] + held[2] + 1
                or held[3][0].shape[:2] != (B, key.shape[1])):
            lo, hi, start = initial_branches(first, key.shape[1], T, sink, window, n_blocks, kb, aligned)
            _, _, coarse, idx, counts, reads = hip_step(q, key, lo, hi, kb, rep, scaling, kb << levels, first, start,
                                                        sink, window, aligned=aligned, rep_keys=rk)
            ctx.state["hip"] = (version, T, 0, coarse, start)
            ctx.runtime.stats["hip_searches"] = ctx.runtime.stats.get("hip_searches", 0) + 1
        else:  # between full searches: the finest levels again, from the cached coarse branches
            ctx.state["hip"] = (held[0], held[1], held[2] + 1, held[3], held[4])
            _, _, _, idx, counts, reads = hip_step(q, key, held[3][0], held[3][1], kb, rep, scaling, 0, first,
                                                   held[4], sink, window, aligned=aligned, rep_keys=rk)
            ctx.runtime.stats["hip_refinements"] = ctx.runtime.stats.get("hip_refinements", 0) + 1
        # the key rows the search scored count as read, next to the rows the attention reads (sparse_attend)
        ctx.runtime.stats["kv_read_bytes"] += int(reads.sum()) * D * key.element_size()
        return sparse_attend(ctx, query, key, value, attention_mask, scaling, idx, counts)


def search_blocks(q, key, first, sink: int, window: int, n_blocks: int, key_block: int, representative: str = "middle",
                  scaling: float = 1.0):
    """HiP's hierarchical search for decode queries q [B, H, D] over key [B, Hkv, T, D] (each row's real tokens from
    ``first`` [B]): the sink positions and the kept branches between the sinks and the last ``window`` tokens, as
    positions [B, Hkv, n] ascending, -1 padded (the window is added per step by ``with_window``)."""
    lo, hi, start = initial_branches(first, key.shape[1], key.shape[2], sink, window, n_blocks, key_block)
    lo, hi, _, _ = refine(q, key, lo, hi, n_blocks, key_block, representative, scaling)
    return kept_positions(lo, hi, first, start, sink)


_REP_CODE = {"middle": 0, "first": 1}


@functools.lru_cache(maxsize=8)
def _counts_reads(hip_search) -> bool:
    """Whether a built ``hip_search`` takes ``rep_keys`` and returns the rows it scored (a build before them does
    not: the torch path runs instead)."""
    doc = hip_search.__doc__ or ""
    return "rep_keys" in doc and "reads" in doc


def hip_step(q, key, lo, hi, key_block: int, representative: str, scaling: float, coarse_at: int, first, start,
             sink: int, window: int, backend: str | None = None, aligned: bool = False, rep_keys: int = 1):
    """One step's search from the branches (lo, hi) [B, Hkv, n] and its positions: returns (lo, hi, coarse (lo, hi)
    or None, idx [B, Hkv, width] int32 ascending -1 padded, counts [B, Hkv] int32, reads [B, Hkv] int64: the key rows
    the search scored) with the sinks, the kept branches and the window of the current context. On the CPU one C++ call (accel/cpu/hip.h); elsewhere, for
    ``representative="max"`` or with ``backend="torch"``, torch operations: the same positions up to the order of
    summation (a near-tie between two children's scores may go either way)."""
    T = key.shape[2]
    if (backend != "torch" and representative in _REP_CODE and q.device.type == "cpu" and _ext.HAS_CPU_EXT
            and hasattr(_ext.cpu_ext(), "hip_search") and key.stride(-1) == 1
            and _counts_reads(_ext.cpu_ext().hip_search)):
        lo, hi, clo, chi, idx, counts, reads = _ext.cpu_ext().hip_search(
            q, key, lo, hi, key_block, _REP_CODE[representative], scaling, coarse_at, first,
            start.reshape(-1), sink, window, aligned, rep_keys)
        return lo, hi, ((clo, chi) if coarse_at > 0 else None), idx, counts, reads
    lo, hi, coarse, reads = refine(q, key, lo, hi, lo.shape[-1], key_block, representative, scaling,
                            coarse_at=coarse_at if coarse_at > 0 else None, aligned=aligned, rep_keys=rep_keys)
    kept = kept_positions(lo, hi, first, start.view(-1, 1, 1), sink)
    idx, counts = with_window(kept, T, T, window)
    return lo, hi, coarse, idx, counts, reads


def initial_branches(first, Hkv: int, T: int, sink: int, window: int, n_blocks: int, key_block: int = 1,
                     aligned: bool = False):
    """The starting branches [lo, hi) [B, Hkv, n_blocks] between each row's sinks and the window, and the searched
    span's start [B, 1, 1]: ``n_blocks`` equal splits of each row's span (halving ends them between ``key_block / 2``
    and ``key_block`` tokens), or with ``aligned`` branches of ``key_block * 2**m`` tokens, the smallest ``m`` for
    which ``n_blocks`` of them cover the longest row's span (a row's last branch ends at its span's end, unused
    branches are empty at the end), so halving ends on branches of exactly ``key_block`` tokens."""
    B = first.shape[0]
    first = first.to(torch.long).view(B, 1, 1)
    start = (first + sink).clamp(max=max(T - window, 0))
    end = torch.full_like(start, max(T - window, 0))
    i = torch.arange(n_blocks + 1, device=first.device).view(1, 1, -1)
    if aligned:
        span = int((end - start).max()) if B else 0
        length = max(int(key_block), 1)
        while n_blocks and length * n_blocks < span:
            length *= 2
        edges = torch.minimum(start + i * length, end)
    else:
        edges = start + ((end - start) * i) // max(n_blocks, 1)
    lo = edges[..., :-1].expand(B, Hkv, n_blocks).contiguous()
    hi = edges[..., 1:].expand(B, Hkv, n_blocks).contiguous()
    return lo, hi, start


def refine(q, key, lo, hi, n_blocks: int, key_block: int, representative: str = "middle", scaling: float = 1.0,
           coarse_at: int | None = None, aligned: bool = False, rep_keys: int = 1):
    """Split every branch in two and keep the ``n_blocks`` best children until no branch is longer than
    ``key_block``. Returns the final (lo, hi), the branches of the first level no longer than ``coarse_at``
    (the cached coarse level a later step refines from; None without ``coarse_at``) and the key rows scored [B, Hkv]
    (int64; every key once for ``representative="max"``)."""
    B, H, D = q.shape
    Hkv, T = key.shape[1], key.shape[2]
    qg = q.float().reshape(B, Hkv, H // Hkv, D)
    full = None
    reads = torch.zeros(lo.shape[:2], dtype=torch.long, device=lo.device)
    if representative == "max":  # every key's logit, for the exhaustive branch maximum
        full = torch.einsum("bhgd,bhtd->bhgt", qg, key.float()).amax(2) * scaling  # [B, Hkv, T]
        reads += T
    coarse_lo = coarse_hi = recorded = None
    if coarse_at is not None:
        coarse_lo, coarse_hi = lo.clone(), hi.clone()
        recorded = torch.zeros(lo.shape[:2], dtype=torch.bool, device=lo.device)
    while True:  # every (sequence, KV head) stops on its own once its branches are short enough
        longest = (hi - lo).amax(-1) if n_blocks else torch.zeros(lo.shape[:2], dtype=lo.dtype, device=lo.device)
        if coarse_at is not None:
            now = ~recorded & (longest <= coarse_at)
            coarse_lo = torch.where(now.unsqueeze(-1), lo, coarse_lo)
            coarse_hi = torch.where(now.unsqueeze(-1), hi, coarse_hi)
            recorded |= now
        active = longest > key_block
        if not bool(active.any()):
            return lo, hi, ((coarse_lo, coarse_hi) if coarse_at is not None else None), reads
        if aligned:  # children of half the level's length: a row's shorter last branch splits into a full child and
            mid = torch.minimum(lo + ((longest + 1) // 2).unsqueeze(-1), hi)  # its rest, never into many short ones
        else:
            mid = (lo + hi) // 2
        clo = torch.stack((lo, mid), -1).flatten(-2)  # children in order: [lo, mid), [mid, hi)
        chi = torch.stack((mid, hi), -1).flatten(-2)
        score = _child_scores(qg, key, clo, chi, representative, full, scaling, rep_keys)
        # a NaN logit (a NaN key) ranks its child first, as +inf (the C++ search does the same); empty children last
        score = score.masked_fill(score.isnan(), float("inf")).masked_fill(chi <= clo, float("-inf"))
        if representative != "max":  # each non-empty child's keys scored (the C++ search counts the same)
            rep, end = _rep_window(clo, chi, representative, rep_keys, T)
            n_read = (end - rep).clamp(min=1)
            reads += torch.where(active.unsqueeze(-1) & (chi > clo), n_read, torch.zeros_like(n_read)).sum(-1)
        # the n best children, ties to the lower child (as the C++ search), then in position order
        keep = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :n_blocks].sort(dim=-1).values
        a = active.unsqueeze(-1)
        lo, hi = torch.where(a, clo.gather(-1, keep), lo), torch.where(a, chi.gather(-1, keep), hi)


def kept_positions(lo, hi, first, start, sink: int):
    """The sinks (each row's first ``sink`` real tokens) and the tokens of the branches [lo, hi), ascending,
    [B, Hkv, n] with -1 padding."""
    B, Hkv, n_blocks = lo.shape
    L = max(int((hi - lo).max()) if n_blocks else 0, 1)
    pos = (lo.unsqueeze(-1) + torch.arange(L, device=lo.device)).flatten(-2)
    inside = (pos < hi.unsqueeze(-1).expand(B, Hkv, n_blocks, L).flatten(-2))
    sinks = (first.to(device=lo.device, dtype=torch.long).view(B, 1, 1)
             + torch.arange(sink, device=lo.device).view(1, 1, -1)).expand(B, Hkv, sink)
    allpos = torch.cat((sinks, pos), -1)
    ok = torch.cat((sinks < start.expand(B, Hkv, 1), inside), -1)
    order = torch.where(ok, allpos, torch.full_like(allpos, 1 << 40)).sort(dim=-1).values
    return torch.where(order < (1 << 40), order, torch.full_like(order, -1))


def prefill_blocks(query, key, scaling: float, budget: int, sink: int, window: int, representative: str = "middle"):
    """HiP's masks for a prefill, per 64-token query block (the block kernel's size, accel's b_q and prefill key
    block): query block i always attends to the sink blocks and the window blocks up to its own (diagonal) block,
    and to the ``n`` key blocks in between that the hierarchical search picks, a child branch scored by its
    representative key's largest logit over the block's queries and the GQA group's heads. ``n`` keeps the tokens
    within ``budget``. Returns (blocks [B, H, nqb, width] int32 ascending, counts [B, H, nqb] int32)."""
    from ..ops.sparse import BLOCK

    B, H, T, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    nqb = -(-T // BLOCK)
    sb, wb = -(-sink // BLOCK), -(-window // BLOCK)
    n = max(0, -(-(budget - (sb + wb + 1) * BLOCK) // BLOCK))
    dev = query.device
    i = torch.arange(nqb, device=dev)
    lo0 = torch.full((nqb,), sb, device=dev)
    hi0 = (i - wb).clamp(min=sb)  # the searched blocks of query block i: [sb, i - wb)
    if n > 0:
        e = torch.arange(n + 1, device=dev)
        edges = lo0.view(-1, 1) + ((hi0 - lo0).view(-1, 1) * e) // n  # [nqb, n + 1]
        lo = edges[:, :-1].expand(B, Hkv, nqb, n).contiguous()
        hi = edges[:, 1:].expand(B, Hkv, nqb, n).contiguous()
        # the block's queries, padded to whole blocks: [B, Hkv, nqb, G * BLOCK, D]
        qp = torch.nn.functional.pad(query.float(), (0, 0, 0, nqb * BLOCK - T))
        qb = qp.view(B, Hkv, G, nqb, BLOCK, D).permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, nqb, G * BLOCK, D)
        real = (torch.arange(nqb * BLOCK, device=dev) < T).view(nqb, BLOCK).repeat(1, G)  # [nqb, G * BLOCK]
        kf = key.float()
        while True:
            active = (hi - lo).amax(-1) > 1  # [B, Hkv, nqb]
            if not bool(active.any()):
                break
            mid = (lo + hi) // 2
            clo = torch.stack((lo, mid), -1).flatten(-2)
            chi = torch.stack((mid, hi), -1).flatten(-2)
            if representative == "first":
                rep = clo * BLOCK
            else:
                rep = (clo * BLOCK + chi * BLOCK - 1) // 2
            rep = rep.clamp(0, T - 1)
            kr = kf.gather(2, rep.reshape(B, Hkv, -1, 1).expand(B, Hkv, rep[0, 0].numel(), D)).view(
                B, Hkv, nqb, 2 * n, D)
            sc = torch.einsum("bhiqd,bhicd->bhiqc", qb, kr)
            sc = sc.masked_fill(~real.view(1, 1, nqb, G * BLOCK, 1), float("-inf")).amax(3) * scaling
            sc = sc.masked_fill(chi <= clo, float("-inf"))
            keep = torch.sort(sc, dim=-1, descending=True, stable=True).indices[..., :n].sort(dim=-1).values
            a = active.unsqueeze(-1)
            lo, hi = torch.where(a, clo.gather(-1, keep), lo), torch.where(a, chi.gather(-1, keep), hi)
        chosen = torch.where(hi > lo, lo, torch.full_like(lo, -1))  # branches of one block (or empty)
    else:
        chosen = torch.full((B, Hkv, nqb, 0), -1, dtype=torch.long, device=dev)
    # sinks, the chosen blocks and the window, per query block, ascending; repeated over each KV head's query heads
    sink_b = torch.arange(sb, device=dev).view(1, -1).expand(nqb, sb)
    sink_b = torch.where(sink_b <= i.view(-1, 1), sink_b, torch.full_like(sink_b, -1))
    win_b = (i.view(-1, 1) - wb + torch.arange(wb + 1, device=dev).view(1, -1))  # [nqb, wb + 1], up to the diagonal
    win_b = torch.where((win_b >= sb) & (win_b >= 0), win_b, torch.full_like(win_b, -1))
    allb = torch.cat((sink_b.expand(B, Hkv, nqb, sb), chosen, win_b.expand(B, Hkv, nqb, wb + 1)), -1)
    big = 1 << 30
    allb = torch.where(allb >= 0, allb, torch.full_like(allb, big)).sort(-1).values
    counts = (allb < big).sum(-1)
    blocks = torch.where(allb < big, allb, torch.zeros_like(allb)).to(torch.int32)
    blocks = blocks.repeat_interleave(G, dim=1).contiguous()
    return blocks, counts.to(torch.int32).repeat_interleave(G, dim=1).contiguous()


def _rep_window(clo, chi, representative: str, rep_keys: int, T: int):
    """The keys [rep, end) that score each child [clo, chi): ``rep_keys`` from its start (``first``) or centred on its
    middle, clipped to the child and the cache; ``rep`` is clamped into the cache (an empty child keeps one key)."""
    r0 = clo if representative == "first" else torch.maximum(clo, (clo + chi - rep_keys) // 2)
    return r0.clamp(0, T - 1), torch.minimum(r0 + rep_keys, chi).clamp(max=T)


def _child_scores(qg, key, clo, chi, representative: str, full, scaling: float, rep_keys: int = 1):
    """The score of each child branch [clo, chi): its representative keys' largest logit (``rep_keys`` keys from its
    start, or centred on its middle, inside the child), max over the group's heads."""
    B, Hkv, G, D = qg.shape
    T = key.shape[2]
    if representative == "max":
        L = int((chi - clo).max())
        r = clo.unsqueeze(-1) + torch.arange(max(L, 1), device=clo.device)
        inside = r < chi.unsqueeze(-1)
        s = full.unsqueeze(2).expand(B, Hkv, clo.shape[-1], T).gather(-1, r.clamp(max=T - 1))
        return s.masked_fill(~inside, float("-inf")).amax(-1)
    rep, end = _rep_window(clo, chi, representative, rep_keys, T)
    if rep_keys == 1:
        k = key.gather(2, rep.unsqueeze(-1).expand(*rep.shape, D)).float()  # [B, Hkv, n, D]
        return torch.einsum("bhgd,bhnd->bhgn", qg, k).amax(2) * scaling
    n = clo.shape[-1]
    r = rep.unsqueeze(-1) + torch.arange(rep_keys, device=clo.device)  # [B, Hkv, n, rep_keys]
    inside = r < end.unsqueeze(-1)
    inside[..., 0] = True  # at least the representative itself (an empty child's score is masked by the caller)
    k = key.gather(2, r.clamp(max=T - 1).reshape(B, Hkv, n * rep_keys, 1).expand(B, Hkv, n * rep_keys, D)).float()
    s = torch.einsum("bhgd,bhnd->bhgn", qg, k).amax(2).view(B, Hkv, n, rep_keys)
    return s.masked_fill(~inside, float("-inf")).amax(-1) * scaling


def with_window(kept, T_search: int, T: int, window: int):
    """The step's positions: the kept sinks and branches (found at context ``T_search``) and the last ``window``
    tokens of the current context T (the window follows the newest tokens between two searches). Returns
    (idx [B, Hkv, n] int32 ascending, -1 padded; counts [B, Hkv] int32)."""
    B, Hkv, _ = kept.shape
    win = torch.arange(max(T - window, 0), T, device=kept.device).view(1, 1, -1).expand(B, Hkv, -1)
    # kept positions all lie below T_search - window <= T - window: the window never repeats them
    allpos = torch.cat((kept, win), -1)
    counts = (allpos >= 0).sum(-1)
    order = torch.where(allpos >= 0, allpos, torch.full_like(allpos, 1 << 40)).sort(dim=-1).values
    idx = torch.where(order < (1 << 40), order, torch.full_like(order, -1)).to(torch.int32).contiguous()
    return idx, counts.to(torch.int32).contiguous()
