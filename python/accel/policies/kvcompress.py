"""KV-cache compression with real per-head memory savings: the common baselines (methods.md section 8).

* ``streaming`` -- StreamingLLM (Xiao et al., 2023): attention sinks + the most recent tokens.
* ``snapkv`` -- SnapKV (Li et al., 2024): prefix tokens scored by the attention of the last ``window``
  prompt queries, smoothed by 1-D pooling, top tokens per KV head plus the window.
* ``pyramidkv`` -- PyramidKV (Cai et al., 2024): SnapKV scoring with layer budgets decreasing
  linearly with depth (same total).
* ``h2o`` -- H2O (Zhang et al., 2023): accumulated attention ("heavy hitters") + recent tokens, with
  the accumulation continued at every decode step.

All of them compress each full-attention layer right after the prompt's KV is written (the prefill
itself is exact), into accel's ragged cache (``accel.cache.ragged``): every KV head keeps its own
tokens in its own rows, and the rest of the memory is released. Under GQA the query heads of a
group are aggregated (``agg``: mean, max or sum) so one KV head keeps one set.

Budgets: ``budget`` tokens per KV head, or ``budget_ratio`` of the prompt's (unpadded) length; a
budget that covers the prompt is a no-op (the cache stays dense and exact). During decode
(``decode="fixed"``, default) each head stays at its budget: every new token evicts one kept token
(the lowest eviction score outside the protected sink / recent tokens), so a long generation does
not grow the cache. ``decode="grow"`` keeps all generated tokens, as the SnapKV and PyramidKV papers
do. [INFER] decode-time eviction for SnapKV/PyramidKV uses H2O-style accumulated attention seeded by
the SnapKV scores, protecting the window; StreamingLLM evicts the oldest non-sink token; H2O is
defined that way.

Left-padded batches: padding is never kept (each row's sinks start at its first real token and its
budget follows its own length).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import AccelError
from .base import KVCachePolicy, LayerContext
from .registry import register_policy

logger = logging.getLogger("accel")

_NEG = float("-inf")
_POS = float("inf")
#: forced tokens (sinks, windows, recent) score FORCED + position, in float64: above any statistic,
#: and when a budget is smaller than the forced set, the newest forced tokens win deterministically
FORCED = 1e12


def prompt_valid(attention_mask, B: int, T: int) -> torch.Tensor | None:
    """[B, T] bool of real (non-padding) prompt tokens from a prefill mask, or None if all are real."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :T]  # the last query sees every real token
        if m.dtype != torch.bool:
            m = m > torch.finfo(m.dtype).min / 2
    elif m.dim() == 2:
        m = m[:, -T:].bool()
    else:
        return None
    if m.shape[0] != B:
        m = m.expand(B, -1)
    if m.shape[1] < T:
        m = torch.cat([m.new_zeros(B, T - m.shape[1]), m], 1)
    return None if bool(m.all()) else m.contiguous()


def group_agg(x: torch.Tensor, Hkv: int, agg: str) -> torch.Tensor:
    """[B, H, T] -> [B, Hkv, T] over the GQA group."""
    B, H, T = x.shape
    x = x.view(B, Hkv, H // Hkv, T)
    if agg == "mean":
        return x.mean(2)
    if agg == "max":
        return x.amax(2)
    return x.sum(2)


def window_attention(q_window, keys, valid, scaling: float) -> torch.Tensor:
    """Attention probabilities of the last ``w`` prompt queries (``q_window`` [B, H, w, D]) over all
    prompt keys, summed over those queries: [B, H, T] (fp32). Causal inside the window; padding keys
    get 0."""
    B, H, w, D = q_window.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    q = q_window.float()
    k = keys.float().repeat_interleave(H // Hkv, 1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, w, T]
    dev = keys.device
    qpos = torch.arange(T - w, T, device=dev).view(1, 1, w, 1)
    mask = torch.arange(T, device=dev).view(1, 1, 1, T) <= qpos
    if valid is not None:
        mask = mask & valid.view(B, 1, 1, T)
    logits = logits.masked_fill(~mask, _NEG)
    return torch.softmax(logits, -1).nan_to_num(0.0).sum(2)


def column_sums(query, keys, valid, scaling: float, max_elems: int = 1 << 24) -> torch.Tensor:
    """H2O's prefill statistic: for every key, the attention it receives summed over all (causal)
    prompt queries, [B, H, T] fp32. Computed in query blocks (bounded memory), each block against the
    keys up to its last query only (causality halves the work)."""
    B, H, T, D = query.shape
    Hkv = keys.shape[1]
    G = H // Hkv
    k = keys.float()
    out = torch.zeros(B, Hkv, G, T, device=keys.device)
    blk = max(16, min(T, max_elems // max(1, B * H * T)))
    for a in range(0, T, blk):
        e = min(T, a + blk)
        qb = query[:, :, a:e].float().reshape(B, Hkv, G * (e - a), D)
        logits = torch.matmul(qb, k[:, :, :e].transpose(-1, -2)).mul_(scaling).view(B, Hkv, G, e - a, e)
        ar = torch.arange(a, e, device=keys.device)
        diag = ar.view(-1, 1) < ar.view(1, -1)  # future keys of the block
        logits[..., a:e].masked_fill_(diag, _NEG)
        if valid is not None:
            logits.masked_fill_(~valid[:, :e].view(B, 1, 1, 1, e), _NEG)
        p = torch.softmax(logits, -1)
        if valid is not None:
            p = p.nan_to_num_(0.0) * valid[:, a:e].view(B, 1, 1, e - a, 1)
        out[..., :e] += p.sum(3)
    return out.view(B, H, T)


class PrefillView:
    """What compression knows about the prompt: the live prefill queries, or statistics recorded
    during a shared dense prefill (the evaluation harness prefills each sample once and forks the
    cache per policy; ``record_prefill_stats``)."""

    def __init__(self, query=None, q_window=None, colsum=None):
        self.query, self.q_window, self.colsum = query, q_window, colsum

    def window_queries(self, w: int) -> torch.Tensor:
        if self.query is not None:
            return self.query[:, :, -w:]
        if self.q_window is None or self.q_window.shape[2] < w:
            raise AccelError(f"prefill statistics hold {0 if self.q_window is None else self.q_window.shape[2]} "
                             f"window queries, {w} needed; record more (record_prefill_stats(window=...))")
        return self.q_window[:, :, -w:]

    def column_sums(self, keys, valid, scaling) -> torch.Tensor:
        if self.query is not None:
            return column_sums(self.query, keys, valid, scaling)
        if self.colsum is None:
            raise AccelError("this policy needs the prompt's attention column sums; record them during the prefill "
                             "(record_prefill_stats(colsum=True))")
        return self.colsum


def pool1d(x: torch.Tensor, kernel: int, mode: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """SnapKV's smoothing of per-token scores [B, Hkv, T] along T (same length). Windows at the
    edges, and next to left padding, average over the real tokens they cover only."""
    if kernel <= 1:
        return x
    B, Hkv, T = x.shape
    pad = kernel // 2
    if mode == "max":
        y = x if valid is None else x.masked_fill(~valid.view(B, 1, T), _NEG)
        y = F.max_pool1d(y.reshape(B * Hkv, 1, T), kernel, stride=1, padding=pad)
        return y[..., :T].reshape(B, Hkv, T)
    w = torch.ones(B, 1, T, device=x.device) if valid is None else valid.view(B, 1, T).float()
    num = F.avg_pool1d((x * w).reshape(B * Hkv, 1, T), kernel, stride=1, padding=pad, count_include_pad=True)
    den = F.avg_pool1d(w.expand(B, Hkv, T).reshape(B * Hkv, 1, T), kernel, stride=1, padding=pad, count_include_pad=True)
    return (num / den.clamp(min=1e-9))[..., :T].reshape(B, Hkv, T)


def sinks_then_newest(keys, valid, sink) -> torch.Tensor:
    """Keep scores of position-based policies (StreamingLLM, DuoAttention's streaming heads, MoA): the
    first ``sink`` real tokens of each row forced (``sink``: int or [B, Hkv]), then the newest tokens."""
    from ._selection import first_valid_positions

    B, Hkv, T, _ = keys.shape
    t = torch.arange(T, device=keys.device).view(1, 1, T)
    fv = first_valid_positions(valid, B).to(keys.device).view(B, 1, 1)
    sk = sink.to(keys.device).view(B, Hkv, 1) if isinstance(sink, torch.Tensor) else sink
    return torch.where((t >= fv) & (t < fv + sk), 2 * FORCED - t, t.double()).expand(B, Hkv, T)


def snapkv_scores(view: "PrefillView", keys, valid, scaling: float, window: int, kernel: int, pooling: str = "avg",
                  agg: str = "mean") -> torch.Tensor:
    """SnapKV's per-token statistic [B, Hkv, T] fp32: the last ``window`` prompt queries' attention,
    aggregated over the GQA group (``agg``), smoothed by 1-D ``pooling`` over ``kernel`` tokens."""
    Hkv, T = keys.shape[1], keys.shape[2]
    a = group_agg(window_attention(view.window_queries(min(window, T)), keys, valid, scaling), Hkv, agg)
    return pool1d(a, kernel, pooling, valid)


def force_sinks_and_recent(score: torch.Tensor, valid, sink: int, recent: int) -> torch.Tensor:
    """``score`` [B, Hkv, T] as float64 with each row's first ``sink`` real tokens and its last ``recent``
    tokens forced in (``FORCED + position``)."""
    from ._selection import first_valid_positions

    B, _, T = score.shape
    t = torch.arange(T, device=score.device).view(1, 1, T)
    fv = first_valid_positions(valid, B).to(score.device).view(B, 1, 1)
    forced = ((t >= fv) & (t < fv + sink)) | (t >= T - recent)
    return torch.where(forced, FORCED + t.double(), score.double())


def keep_top(score: torch.Tensor, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, h): the ``budgets[b, h]`` highest-scoring tokens (-inf never kept), sorted by position.
    Returns (keep [B, Hkv, M] int64, counts [B, Hkv])."""
    B, Hkv, T = score.shape
    M = int(min(T, budgets.max())) if budgets.numel() else 0
    M = max(M, 1)
    top = score.topk(M, dim=-1)
    ok = (torch.arange(M, device=score.device).view(1, 1, M) < budgets.to(score.device).view(B, Hkv, 1)) & (top.values > _NEG)
    counts = ok.sum(-1)
    idx = torch.where(ok, top.indices, T)  # invalid entries sort to the end
    idx = idx.sort(-1).values
    return idx.clamp(max=T - 1).cpu(), counts.cpu()  # cache metadata lives on the CPU


@dataclass
class BudgetedKVPolicy(KVCachePolicy):
    """Shared machinery: budgets, validity, compression into the ragged cache, decode-time eviction.

    Subclasses implement ``token_scores`` (higher = keep; +inf forced, -inf never) and may override
    ``layer_budget`` (per-layer budgets), ``protect`` (sink/recent protected at decode) and
    ``evict_by`` ("score": lowest score first, "age": oldest first).
    """

    budget: int | None = None
    budget_ratio: float | None = 0.25
    decode: str = "fixed"
    #: the fewest tokens a head keeps whatever the budget says (None: the policy's own sink + window + recent,
    #: 0: no floor). Below it the policy's own structure does not fit (SnapKV's observation window alone is 32
    #: tokens), so a short prompt stays whole instead of being cut to a few tokens.
    min_budget: int | None = None

    evict_by: ClassVar[str] = "score"
    accumulate: ClassVar[bool] = True

    def validate(self) -> None:
        if self.budget is None and self.budget_ratio is None:
            raise AccelError(f"{self.name}: give a budget (tokens per KV head) or a budget_ratio in (0, 1]")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise AccelError(f"{self.name}: budget must be a positive number of tokens per KV head, got {self.budget!r}")
        if self.budget is None and not (0 < float(self.budget_ratio) <= 1):
            raise AccelError(f"{self.name}: budget_ratio must be in (0, 1], got {self.budget_ratio!r}")
        if self.decode not in ("fixed", "grow"):
            raise AccelError(f"{self.name}: decode must be 'fixed' (stay at the budget) or 'grow', got {self.decode!r}")
        if self.min_budget is not None and (not isinstance(self.min_budget, int) or self.min_budget < 0):
            raise AccelError(f"{self.name}: min_budget must be a number of tokens >= 0 (or None: sink + window + "
                             f"recent), got {self.min_budget!r}")

    def budget_floor(self) -> int:
        """Tokens per head no budget goes below: ``min_budget``, by default the policy's sink + observation window +
        recent tokens (the part of its kept set that does not depend on the budget)."""
        if self.min_budget is not None:
            return int(self.min_budget)
        return sum(int(getattr(self, a, 0) or 0) for a in ("sink", "window", "recent"))

    # -- budgets -----------------------------------------------------------------------------------------
    def base_budget(self, n: torch.Tensor) -> torch.Tensor:
        """Average tokens per KV head for prompts of ``n`` real tokens ([B] -> [B] int64)."""
        if self.budget is not None:
            return torch.full_like(n, int(self.budget))
        return torch.ceil(n.double() * float(self.budget_ratio)).long().clamp(min=1)

    def layer_budget(self, layer_idx: int, num_layers: int, base: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return base

    def head_budgets(self, layer_idx: int, num_layers: int, n: torch.Tensor, Hkv: int, view, keys, valid,
                     scaling) -> torch.Tensor:
        """[B, Hkv] tokens each head keeps (policies with per-head budgets override)."""
        return self.layer_budget(layer_idx, num_layers, self.base_budget(n), n).view(-1, 1).expand(-1, Hkv).clone()

    def growing_heads(self, budgets: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """[B, Hkv] bool: heads that keep every decode token (``decode="grow"``: all of them)."""
        return torch.full_like(budgets, self.decode == "grow", dtype=torch.bool)

    def protect(self, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, Hkv] sink tokens, [B, Hkv] recent tokens) never evicted during decode."""
        z = torch.zeros_like(budgets)
        return z, z

    # -- compression -----------------------------------------------------------------------------------
    def token_scores(self, view: PrefillView, keys, valid, budgets, scaling) -> torch.Tensor:
        """[B, Hkv, T] keep scores (higher = keep, >= FORCED forced, -inf never)."""
        raise NotImplementedError

    def after_prefill(self, ctx: LayerContext, query, attention_mask) -> None:
        cl = ctx.cache_layer
        if cl is None:
            raise AccelError(
                f"{self.name} compresses accel's cache, but this forward pass uses another cache object; "
                "let accel create the cache (pass no cache, or an empty DynamicCache)"
            )
        if cl.is_sliding:
            return  # window layers are bounded already
        if cl.ragged is not None:  # more prompt tokens on a compressed cache: back down to the budgets
            self._evict_to_budget(cl.ragged)
            return
        T = cl.end - cl.start
        # a prompt continued on a cache the budget covered so far (a second turn, a chunked prompt): compress what
        # the cache holds now, observed by this chunk's queries (they are the newest positions, as a one-shot
        # prefill's observation window is)
        valid = prompt_valid(attention_mask, cl.keys.shape[0], T)
        scaling = getattr(ctx.module, "scaling", None) or query.shape[-1] ** -0.5
        self.compress(cl, ctx.layer_idx, ctx.runtime.info.num_layers, PrefillView(query=query), valid, scaling,
                      reserve=int(getattr(ctx.runtime, "reserve", 0) or 0), plan=ctx.runtime.plan)

    def compress(self, cl, layer_idx: int, num_layers: int, view: PrefillView, valid, scaling: float,
                 reserve: int = 0, plan=None) -> None:
        """Compress one full-attention ``AccelLayer`` holding a prompt (``valid``: [B, T] real tokens)."""
        keys = cl.keys
        B, Hkv, T, _ = keys.shape
        # budget bookkeeping on the CPU (the ragged cache's metadata lives there); scores on the data's device
        n = valid.sum(1).cpu() if valid is not None else torch.full((B,), T, dtype=torch.long)
        self._plan = plan
        budgets = self.head_budgets(layer_idx, num_layers, n, Hkv, view, keys, valid, scaling).clamp(min=1)
        floor = self.budget_floor()
        if floor and bool((budgets < floor).any()):
            log = logger.warning if self.budget is not None else logger.info  # an explicit budget was overridden
            log("%s: layer %d budgets raised to the floor of %d tokens per head (min_budget)", self.name,
                        layer_idx, floor)
            budgets = budgets.clamp(min=floor)
        budgets = torch.minimum(budgets, n.view(B, 1))
        # a head whose budget covers its prompt is not compressed at all: like the dense no-op, it keeps
        # every generated token too (so a padded batch behaves as each row alone)
        grow = self.growing_heads(budgets, n) | (budgets >= n.view(B, 1))
        if valid is None and bool((budgets >= T).all()):
            return  # the budget covers the prompt: nothing to drop, the cache stays dense and exact
        self._raw = None
        score = self.token_scores(view, keys, valid, budgets, scaling)
        if valid is not None:
            score = score.masked_fill(~valid.view(B, 1, T), _NEG)
        seed = None
        if self.evict_by == "score":  # the statistic itself (before forcing), where a policy kept it
            seed = self._raw if self._raw is not None else score.masked_fill(score >= FORCED, 0.0)
        self._raw = None
        sink, recent = self.protect(budgets)
        self._store(cl, score, budgets, grow, valid, reserve, seed, sink, recent)

    def _store(self, cl, score, budgets, grow, valid, reserve: int, seed, sink, recent) -> None:
        """Keep each head's top ``budgets`` tokens of ``score`` in the layer's ragged pool and set up its
        decode-time eviction: heads in ``grow`` keep every new token, the others stay at their budget,
        evicting outside ``sink`` (per row, from its first real token) and ``recent`` ([B, Hkv])."""
        from ._selection import first_valid_positions

        B, Hkv, T = score.shape
        keep, counts = keep_top(score, budgets)
        caps = torch.where(grow, counts + max(64, reserve - T + 1), counts + 1)
        cl.compress(keep, counts, caps, scores=seed)
        rg = cl.ragged
        rg.accumulate = self.accumulate and self.decode == "fixed" and self.evict_by == "score"
        rg.budget = torch.where(grow, torch.iinfo(torch.int64).max, budgets)  # growing heads never evict
        rg.sink_end = first_valid_positions(valid, B).view(B, 1) + sink  # positions below: protected sinks
        rg.recent = recent
        rg.evict_by = self.evict_by

    def needs_stats(self) -> dict:
        """What a shared prefill must record for this policy to compress a copy of its cache later."""
        return {}

    @torch.no_grad()  # statistics and eviction are bookkeeping: never build an autograd graph
    def compress_recorded(self, cache, runtime, attention_mask=None) -> None:
        """Compress a (forked) ``AccelCache`` whose prefill recorded ``prefill_stats`` (the
        evaluation harness prefills each sample once and compresses a copy per policy)."""
        stats = getattr(cache, "prefill_stats", None)
        if stats is None and not self.needs_stats():
            stats = {}  # position-only policies (streaming, duo, moa) need no prompt statistics
        if stats is None:
            raise AccelError(f"{self.name}: this cache has no recorded prefill statistics; prefill with "
                             "runtime.record_stats set (accel.eval does) or let the policy run the prefill itself")
        modules = list(runtime.adapter.attention_modules())
        for i, layer in enumerate(cache.layers):
            if layer.is_sliding or layer.ragged is not None or layer.keys is None:
                continue
            T = layer.end - layer.start
            valid = prompt_valid(attention_mask, layer.keys.shape[0], T) if attention_mask is not None else None
            st = stats.get(i, {})
            view = PrefillView(q_window=st.get("q_window"), colsum=st.get("colsum"))
            scaling = getattr(modules[i], "scaling", None) or layer.keys.shape[-1] ** -0.5
            self.compress(layer, i, len(cache.layers), view, valid, scaling, reserve=int(runtime.reserve or 0),
                          plan=runtime.plan)

    def after_decode(self, ctx: LayerContext, query, attention_mask) -> None:
        cl = ctx.cache_layer
        if cl is None or cl.ragged is None or self.decode != "fixed":
            return
        self._evict_to_budget(cl.ragged)

    @staticmethod
    def _evict_to_budget(rg) -> None:
        budgets = getattr(rg, "budget", None)
        if budgets is None:
            return
        from .. import _ext

        if _ext.HAS_CPU_EXT and rg.k.device.type == "cpu":
            if rg._meta is None:  # flat per-head tensors, rebuilt only when the layout changes
                rg._meta = (budgets.reshape(-1).contiguous(), rg.sink_end.reshape(-1).long().contiguous(),
                            rg.recent.reshape(-1).long().contiguous())
            b, se, rc = rg._meta
            _ext.cpu_ext().ragged_evict(rg.k, rg.v, rg.pos, rg.score, rg.offsets.reshape(-1), rg.lengths.view(-1),
                                        b, se, rc, rg.evict_by != "score")
            return
        while True:
            over = rg.lengths.long() > budgets
            if not bool(over.any()):
                return
            rg.evict(victims(rg), over)


def victims(rg) -> torch.Tensor:
    """[B, Hkv] slot to evict in every head of a compressed layer: the lowest eviction score (or the
    oldest token, ``rg.evict_by == "age"``) outside the protected sink and recent tokens; if every
    live token is protected, the oldest non-sink token."""
    rows, live = rg.rows()
    pos = rg.pos[rows]
    newest = pos.masked_fill(~live, -1).amax(-1, keepdim=True)
    sink_end = rg.sink_end.view(*rg.shape, 1)
    recent = rg.recent.view(*rg.shape, 1)
    protected = (pos < sink_end) | (pos > newest - recent)
    cand = live & ~protected
    if rg.evict_by == "score":
        key = rg.score[rows].masked_fill(~cand, _POS)
        pick = key.argmin(-1)
        has = cand.any(-1)
    else:
        pick = pos.float().masked_fill(~cand, _POS).argmin(-1)
        has = cand.any(-1)
    fallback = live & (pos >= sink_end)
    fb = pos.float().masked_fill(~fallback, _POS).argmin(-1)
    last = pos.float().masked_fill(~live, _POS).argmin(-1)
    return torch.where(has, pick, torch.where(fallback.any(-1), fb, last))


@register_policy("streaming")
@dataclass
class StreamingLLMPolicy(BudgetedKVPolicy):
    """StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks"):
    keep the first ``sink`` tokens and the most recent ``budget - sink``. Keys are cached after RoPE
    with their original positions (methods.md section 8: the positional variant accel implements;
    the paper's in-cache re-rotation is not done). Decode evicts the oldest non-sink token."""

    sink: int = 4

    evict_by: ClassVar[str] = "age"
    accumulate: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        if self.sink < 0:
            raise AccelError(f"streaming: sink must be >= 0, got {self.sink}")

    def protect(self, budgets):
        return torch.full_like(budgets, self.sink), torch.zeros_like(budgets)

    def token_scores(self, view, keys, valid, budgets, scaling):
        return sinks_then_newest(keys, valid, self.sink)


@register_policy("snapkv")
@dataclass
class SnapKVPolicy(BudgetedKVPolicy):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You Are Looking for Before Generation"): each
    prefix token is scored by the attention the last ``window`` prompt queries give it (summed),
    smoothed by 1-D ``pooling`` over ``kernel`` tokens, aggregated over the GQA group (``agg``); every
    KV head keeps its top ``budget - window`` plus the window. Defaults from methods.md: window 32,
    kernel 7, [INFER] average pooling (the SnapKV code offers avg and max)."""

    window: int = 32
    kernel: int = 7
    pooling: str = "avg"
    agg: str = "mean"

    def validate(self) -> None:
        super().validate()
        if self.window < 1 or self.kernel < 1:
            raise AccelError(f"{self.name}: window and kernel must be >= 1, got {self.window}, {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise AccelError(f"{self.name}: pooling must be 'avg' or 'max', got {self.pooling!r}")
        if self.agg not in ("mean", "max", "sum"):
            raise AccelError(f"{self.name}: agg must be mean, max or sum, got {self.agg!r}")

    def protect(self, budgets):
        return torch.zeros_like(budgets), torch.full_like(budgets, self.window).minimum(budgets)

    def needs_stats(self) -> dict:
        return {"window": self.window}

    def token_scores(self, view, keys, valid, budgets, scaling):
        T = keys.shape[2]
        w = min(self.window, T)
        s = snapkv_scores(view, keys, valid, scaling, self.window, self.kernel, self.pooling, self.agg)
        self._raw = s.clone()
        s = s.double()
        s[:, :, T - w :] = FORCED + torch.arange(T - w, T, dtype=torch.float64, device=s.device)
        return s


@register_policy("pyramidkv")
@dataclass
class PyramidKVPolicy(SnapKVPolicy):
    """PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    Information Funneling"): SnapKV scoring; the average capacity ``C = budget - window`` is spread
    over layers linearly from ``2C - C/beta`` (first layer) down to ``C/beta`` (last), so the total
    equals ``L * C``; each layer keeps its capacity plus the window. ``beta`` default 20."""

    beta: float = 20.0

    def validate(self) -> None:
        super().validate()
        if not self.beta >= 1:
            raise AccelError(f"pyramidkv: beta must be >= 1, got {self.beta}")

    def layer_budget(self, layer_idx: int, num_layers: int, base: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        # a budget that covers the prompt keeps everything in every layer (no redistribution)
        return torch.where(base >= n, n, pyramid_budgets(base, num_layers, self.window, self.beta)[layer_idx])


def pyramid_budgets(base: torch.Tensor, L: int, window: int, beta: float) -> list[torch.Tensor]:
    """Per-layer budgets (window included) for per-row average budgets ``base`` [B]."""
    C = (base - window).clamp(min=0).double()
    lo = C / beta
    hi = 2 * C - lo
    out = []
    for l in range(L):
        cap = hi - (l * (hi - lo) / (L - 1) if L > 1 else 0)
        out.append(torch.round(cap).long() + torch.minimum(base, torch.full_like(base, window)))
    return out


@register_policy("h2o")
@dataclass
class H2OPolicy(BudgetedKVPolicy):
    """H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference"): each
    KV head keeps ``recent_ratio`` of its budget as the most recent tokens and the rest as heavy
    hitters, the tokens with the largest attention accumulated over all queries so far (prefill
    column sums, then every decode step; GQA: mean over the group). Evicts the lowest accumulated
    score outside the recent window. Its prefill statistic needs the whole attention matrix, so
    compression costs about one extra attention pass."""

    recent_ratio: float = 0.5
    agg: str = "mean"

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.recent_ratio <= 1:
            raise AccelError(f"h2o: recent_ratio must be in [0, 1], got {self.recent_ratio}")

    def protect(self, budgets):
        return torch.zeros_like(budgets), torch.floor(budgets.double() * self.recent_ratio).long()

    def needs_stats(self) -> dict:
        return {"colsum": True}

    def token_scores(self, view, keys, valid, budgets, scaling):
        B, Hkv, T, _ = keys.shape
        s = group_agg(view.column_sums(keys, valid, scaling), Hkv, self.agg)
        self._raw = s.clone()
        recent = torch.floor(budgets.double() * self.recent_ratio).long().to(s.device)  # [B, Hkv]
        t = torch.arange(T, device=s.device).view(1, 1, T)
        s = torch.where(t >= T - recent.view(B, Hkv, 1), FORCED + t.double(), s.double())
        return s
