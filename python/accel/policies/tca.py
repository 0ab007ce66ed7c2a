"""TCA-Attention (You, Chen, Zhang et al., "Training-free Context-adaptive Attention", arXiv 2512.09238; methods.md
7.2): per-head token quotas from one offline calibration pass, and an online choice of the least redundant tokens of
every block of keys, in the prefill and during decode, which shrinks each head's KV cache.

**Calibration** (``accel plan --policy tca``, ``accel.calibration.tca``): candidate configurations are distributions
over how many tokens a block of ``block`` keys keeps, ``k in {1, 2, 4, ..., block}`` with log-Gaussian proportions
``p_k ~ exp(-(log2 k - mu)^2 / (2 sigma^2))``; a configuration's quota is ``round(sum_k p_k k)`` tokens per block.
One dense forward over calibration text records each layer's queries, keys and values; every KV head gets the
sparsest configuration whose attention output (this policy's attention, last queries of the text) stays within
``tolerance`` relative L2 error of dense attention. The plan's heads carry their quota (``budget``), ``mu``
(``alpha``), ``sigma`` (``beta``) and their error (``score``); each layer keeps every head's error at every quota, so
``tolerance=`` picks other quotas at patch time without calibrating again.

**Online selection.** A head's keys after the first ``sink`` tokens are cut into blocks of ``block`` tokens. Once a
block is ``window`` tokens behind the newest token (block ``j`` when ``sink + (j + 1) * block + window`` tokens are
before the newest one) it is compressed: it keeps the head's quota of its least redundant tokens and the rest leave the
ragged cache (real bytes). [INFER] redundancy of a key = cosine of its (unit) key with the mean unit key of the
``window`` tokens that follow its block (the window the block leaves: ``metric="context"``, the shipped plan's), or
with the mean unit key of its own block (``metric="cosine"``); the lowest are kept (ties: the earlier token). Sinks
and the last ``window`` to ``window + block`` tokens are always kept. With ``sparse_prefill=True`` the prefill runs
the same rule per query, as the paper's prefill does: a query attends to the sinks, the kept tokens of the blocks
compressed before its token arrived and every token after them, so a prompt prefilled at once and the same prompt fed
one token at a time attend to the same keys. [INFER] it is off by default: the prefill is exact and the prompt's cache
is then compressed by the same rule. A configuration that keeps ``block`` of ``block`` tokens in every head is exact
dense attention.

[INFER] switchable: block 16, sink 16, window 64 (a multiple of the block, so a 16-query block shares one mask),
sigma 1, the redundancy metric above. The prefill is computed as masked attention over every key (exact semantics,
dense cost); the decode step reads only the kept rows. Layers with a sliding window are left alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention.masks import first_valid_positions, prompt_valid, step_valid, valid_from_mask
from ..errors import AccelError
from ..models.base import ModelInfo
from ..plan import Plan
from ..plan.shipped import require_shipped_plan
from .budgeted import _NEG, FORCED, BudgetedKVPolicy
from .registry import register_policy


def block_sizes(block: int) -> list[int]:
    """The per-block kept counts of the log-Gaussian family: 1, 2, 4, ..., block (block a power of two)."""
    return [1 << i for i in range(int(math.log2(block)) + 1)]


def log_gaussian(mu: float, sigma: float, block: int) -> list[float]:
    """Proportions ``p_k ~ exp(-(log2 k - mu)^2 / (2 sigma^2))`` over ``block_sizes(block)`` (sigma 0: all mass on
    the k nearest to ``2**mu``)."""
    ks = block_sizes(block)
    if sigma <= 0:
        best = min(range(len(ks)), key=lambda i: (abs(i - mu), i))
        return [1.0 if i == best else 0.0 for i in range(len(ks))]
    w = [math.exp(-((i - mu) ** 2) / (2 * sigma * sigma)) for i in range(len(ks))]
    s = sum(w)
    return [x / s for x in w]


def config_quota(mu: float, sigma: float, block: int) -> int:
    """Tokens a block keeps under configuration (mu, sigma): ``round(sum_k p_k k)``, at least 1."""
    p = log_gaussian(mu, sigma, block)
    return max(1, min(block, int(math.floor(sum(pk * k for pk, k in zip(p, block_sizes(block))) + 0.5))))


def family(block: int, sigma: float, step: float = 0.125) -> dict[int, float]:
    """quota -> the smallest mu of the log-Gaussian family that gives it (mu from -2 to log2(block) + 4 sigma);
    a quota of ``block`` is always reachable (sigma 0, mu = log2(block): every block keeps all its tokens)."""
    top = math.log2(block)
    out: dict[int, float] = {}
    mu = -2.0
    while mu <= top + 4 * max(sigma, 0.25) + 1e-9:
        out.setdefault(config_quota(mu, sigma, block), round(mu, 6))
        mu += step
    out.setdefault(block, round(top, 6))
    return dict(sorted(out.items()))


def pick(errors: list[float], reachable: dict[int, float], tolerance: float, block: int) -> int:
    """The smallest reachable quota whose error is within ``tolerance`` (``block`` when none is)."""
    for qt in sorted(reachable):
        if errors[qt - 1] <= tolerance:
            return qt
    return block


def compressed_blocks(n: torch.Tensor | int, sink: int, window: int, block: int):
    """Blocks compressed when a row holds ``n`` real tokens: block j once ``sink + (j + 1) * block + window <= n - 1``."""
    if isinstance(n, torch.Tensor):
        return ((n - 1 - sink - window).div(block, rounding_mode="floor")).clamp(min=0)
    return max(0, (n - 1 - sink - window) // block)


#: redundancy metrics of a key (lower = less redundant = kept first)
METRICS = ("context", "cosine", "deviation", "norm")
_NEEDS_WINDOW = "tca: metric='context' compares each block with the window after it; set window >= block"


def _unit(k: torch.Tensor) -> torch.Tensor:
    k = k.float()
    return k / k.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def block_keep(kb: torch.Tensor, quota: torch.Tensor, metric: str = "cosine", ref: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The tokens each block keeps: ``kb`` [..., Hkv, nb, block, D] keys, ``quota`` [Hkv] (or broadcastable to
    [..., Hkv]) tokens per block; returns bool [..., Hkv, nb, block], the ``quota`` least redundant keys of each block
    (ties to the earlier token). Redundancy (``metric``): 'context', the cosine of the key with ``ref``
    [..., Hkv, nb, D], the mean unit key of the ``window`` tokens after each block (``context_refs``); 'cosine', the
    cosine of the key with the block's mean unit key; 'deviation', minus the key's distance from the block's mean key;
    'norm', minus the key's norm."""
    k = kb.float()
    if metric == "context":
        if ref is None:
            raise AccelError("tca: metric='context' needs the mean unit key of the window after each block")
        red = (_unit(k) * ref.float().unsqueeze(-2)).sum(-1)  # [..., nb, block]
    elif metric == "cosine":
        u = _unit(k)
        red = (u * u.mean(-2, keepdim=True)).sum(-1)  # [..., nb, block]
    elif metric == "deviation":
        red = -(k - k.mean(-2, keepdim=True)).norm(dim=-1)
    elif metric == "norm":
        red = -k.norm(dim=-1)
    else:
        raise AccelError(f"tca: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    order = torch.sort(red, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    q = quota.to(rank.device)
    return rank < q.view(*q.shape, 1, 1)


def select(keys: torch.Tensor, first: torch.Tensor, quota: torch.Tensor, sink: int, window: int, block: int,
           metric: str = "cosine"):
    """Which tokens the cache keeps once every compressible block of the prompt is compressed: ``keys`` [B, Hkv, T, D]
    (row b's real tokens from ``first[b]``), ``quota`` [Hkv]. Returns (kept [B, Hkv, T] bool, True for every real
    token outside the compressed blocks; block [B, T] int64 block index of each token, -1 for padding and sinks)."""
    B, Hkv, T, _ = keys.shape
    dev = keys.device
    kept = torch.ones(B, Hkv, T, dtype=torch.bool, device=dev)
    t = torch.arange(T, device=dev)
    first = first.to(dev).long()
    rel = t.view(1, T) - first.view(B, 1)
    blk = torch.where(rel >= sink, (rel - sink).div(block, rounding_mode="floor"), torch.full_like(rel, -1))
    kept &= (rel >= 0).view(B, 1, T)
    for b in range(B):
        nb = compressed_blocks(T - int(first[b]), sink, window, block)
        if nb == 0:
            continue
        lo = int(first[b]) + sink
        kb = keys[b, :, lo:lo + nb * block].reshape(Hkv, nb, block, -1)
        ref = context_refs(keys[b], lo, nb, block, window) if metric == "context" else None
        kept[b, :, lo:lo + nb * block] = block_keep(kb, quota, metric, ref).reshape(Hkv, nb * block)
    return kept, blk


def context_refs(keys: torch.Tensor, lo: int, nb: int, block: int, window: int) -> torch.Tensor:
    """``metric="context"``'s reference of blocks ``0..nb-1`` starting at ``lo`` of ``keys`` [Hkv, T, D]: the mean
    unit key of the ``window`` tokens after each block, [Hkv, nb, D]. A block is compressed when it leaves the window,
    so those tokens are in the cache, uncompressed, whether the prompt is prefilled at once or fed token by token
    (``drop_block`` takes the same mean over the same rows)."""
    if window < 1:
        raise AccelError(_NEEDS_WINDOW)
    Hkv, D = keys.shape[0], keys.shape[-1]
    out = torch.empty(Hkv, nb, D, dtype=torch.float32, device=keys.device)
    w = torch.arange(window, device=keys.device)
    for j0 in range(0, nb, 256):  # a bounded gather per chunk of blocks (window rows each)
        j1 = min(nb, j0 + 256)
        t = lo + block + torch.arange(j0, j1, device=keys.device).view(-1, 1) * block + w
        out[:, j0:j1] = _unit(keys[:, t.reshape(-1)]).view(Hkv, j1 - j0, window, D).mean(2)
    return out


def tca_attention(query, key, value, kept, blk, first, scaling: float, sink: int, window: int, block: int,
                  chunk: int = 256) -> torch.Tensor:
    """TCA prefill attention [B, H, Tq, D] for the last ``Tq`` queries over ``T`` keys. Per row and query chunk the
    keys are the kept tokens before the chunk's first open block (gathered once per row, in position order) and every
    token from that block on, under a mask that closes the blocks compressed inside the chunk: the attention reads
    about the kept share of the keys, not all of them. Padding queries get zeros."""
    import torch.nn.functional as F

    B, H, Tq, D = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    G = H // Hkv
    dev = key.device
    out = torch.zeros(B, H, Tq, value.shape[-1], dtype=query.dtype, device=dev)
    ar = torch.arange(T, device=dev)
    for b in range(B):
        f = int(first[b])
        kb = kept[b]  # [Hkv, T]
        cnt = int(kb.sum(-1).max())
        pos = torch.where(kb, ar, T).sort(-1).values[:, :cnt]  # [Hkv, N] kept positions ascending, T = none
        gidx = pos.clamp(max=T - 1).unsqueeze(-1)
        kc = key[b].gather(1, gidx.expand(-1, -1, D))
        vc = value[b].gather(1, gidx.expand(-1, -1, value.shape[-1]))
        for c0 in range(0, Tq, chunk):
            c1 = min(Tq, c0 + chunk)
            q0, q1 = T - Tq + c0, T - Tq + c1
            if q1 <= f:
                continue  # padding queries
            tq = torch.arange(q0, q1, device=dev)
            done = compressed_blocks(tq - f, sink, window, block)  # [C] blocks compressed when each query arrives
            a0 = min(f + sink + int(done[0]) * block, q1)  # the chunk's first open token
            nA = int((pos < a0).sum(-1).max())
            pa = pos[:, :nA]
            ma = (pa < a0).unsqueeze(1) & (pa.unsqueeze(1) <= tq.view(1, -1, 1))  # [Hkv, C, nA]
            tk = torch.arange(a0, q1, device=dev)
            open_ = blk[b, a0:q1].view(1, -1) >= done.view(-1, 1)  # [C, nB]
            mb = (kb[:, a0:q1].unsqueeze(1) | open_.unsqueeze(0)) & (tk.view(1, 1, -1) <= tq.view(1, -1, 1))
            m = torch.cat([ma, mb], -1)  # [Hkv, C, nA + nB]
            C = c1 - c0
            m = m.unsqueeze(1).expand(Hkv, G, C, m.shape[-1]).reshape(Hkv, G * C, -1)
            q = query[b, :, c0:c1].reshape(Hkv, G * C, D)
            k = torch.cat([kc[:, :nA], key[b, :, a0:q1]], 1)
            v = torch.cat([vc[:, :nA], value[b, :, a0:q1]], 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scaling).reshape(H, C, -1)
            out[b, :, c0:c1] = o.nan_to_num(0.0)  # queries with no key: padding
    return out


@register_policy("tca")
@dataclass
class TCAPolicy(BudgetedKVPolicy):
    """TCA-Attention: calibrated per-head quotas, least-redundant tokens per block (see the module docstring).

    Options:
        tolerance: None keeps the plan's quotas; a value re-picks every head's sparsest quota whose calibrated error
            is within it (the plan stores each head's error at every quota).
        sparse_prefill: attend in the prefill as in decode (the paper's prefill); default False: dense prefill, then
            the prompt's cache is compressed by the same rule (on SmolLM2 it answered more passkeys, and accel's sparse
            prefill is no faster than dense on the CPU).
        block, sink, window, sigma: must match the plan's (its quotas were calibrated with them).
        metric: the redundancy of a key: 'context' (against the window after its block), 'cosine' (against its own
            block), 'deviation' or 'norm'; None (default): the plan's ('cosine' for a plan that names none). A value
            must match the plan's.
    """

    budget_ratio: float | None = None  # TCA's budget is the plan's per-head quotas
    tolerance: float | None = None
    sparse_prefill: bool = False
    block: int = 16
    sink: int = 16
    window: int = 64
    sigma: float = 1.0
    metric: str | None = None  # None: the plan's (``cosine`` for a plan that names none)

    evict_by: ClassVar[str] = "score"
    accumulate: ClassVar[bool] = False
    needs_plan: ClassVar[bool] = True
    per_kv_head: ClassVar[bool] = True  # each KV head's quota and selection use its own keys only
    calibrator: ClassVar[str] = "accel.calibration.tca:calibrate_tca"
    plan_modes: ClassVar[tuple] = ("full", "compress")
    head_kinds: ClassVar[tuple] = ("tca",)

    def validate(self) -> None:
        b = self.block
        if not isinstance(b, int) or b < 1 or b & (b - 1):
            raise AccelError(f"tca: block must be a power of two >= 1, got {b!r}")
        if not isinstance(self.sink, int) or self.sink < 0:
            raise AccelError(f"tca: sink must be a number of tokens >= 0, got {self.sink!r}")
        if not isinstance(self.window, int) or self.window < 0 or self.window % b:
            raise AccelError(f"tca: window must be a multiple of block ({b}) >= 0, got {self.window!r}")
        if self.tolerance is not None and not 0 <= float(self.tolerance):
            raise AccelError(f"tca: tolerance must be a relative error >= 0 (or None: the plan's quotas), got "
                             f"{self.tolerance!r}")
        if not isinstance(self.sparse_prefill, bool):
            raise AccelError(f"tca: sparse_prefill must be True or False, got {self.sparse_prefill!r}")
        if self.metric is not None and self.metric not in METRICS:
            raise AccelError(f"tca: metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.metric == "context" and self.window < 1:
            raise AccelError(_NEEDS_WINDOW)
        if not self.sigma >= 0:
            raise AccelError(f"tca: sigma must be >= 0, got {self.sigma!r}")
        if self.decode != "fixed":
            raise AccelError("tca: decode must be 'fixed' (blocks are compressed as they leave the window); "
                             f"got {self.decode!r}")
        self.dense_prefill = not self.sparse_prefill

    def build_plan(self, info: ModelInfo) -> Plan:
        return require_shipped_plan("tca", info, "per-head quotas from calibration")

    def _metric(self, plan) -> str:
        """The redundancy metric in use: the option, else ``plan``'s (``cosine`` for a plan that names none)."""
        return self.metric or ((plan.params or {}).get("metric") if plan is not None else None) or "cosine"

    def check_plan_params(self, plan: Plan) -> None:
        params = plan.params or {}
        if params.get("metric", "cosine") not in METRICS:
            raise AccelError(f"tca: the plan's metric {params['metric']!r} is not one of {', '.join(METRICS)}; "
                             "calibrate a plan with `accel plan --policy tca`")
        if self._metric(plan) == "context" and self.window < 1:
            raise AccelError("tca: the plan's metric 'context' compares each block with the window after it; the "
                             f"window is {self.window}: set window >= block and calibrate a plan with it")
        for knob in ("block", "sink", "window", "sigma", "metric"):
            if knob in params and getattr(self, knob) is not None and params[knob] != getattr(self, knob):
                raise AccelError(f"tca: the plan was calibrated with {knob}={params[knob]!r}, the policy has "
                                 f"{getattr(self, knob)!r}; drop the option or calibrate a plan with it "
                                 f"(`accel plan --policy tca --set {knob}={getattr(self, knob)}`)")
        for i, lp in enumerate(plan.layers):
            for j, hp in enumerate(lp.heads or []):
                if hp.kind == "tca" and not (isinstance(hp.budget, int) and 1 <= hp.budget <= self.block):
                    raise AccelError(f"tca: plan layers[{i}].heads[{j}].budget must be a quota of 1..{self.block} "
                                     f"tokens per block, got {hp.budget!r}")
        if self.tolerance is not None:
            for i, lp in enumerate(plan.layers):
                if lp.heads and len((lp.params or {}).get("errors") or []) != len(lp.heads):
                    raise AccelError(f"tca: tolerance= needs each head's calibrated errors, and plan layers[{i}] has "
                                     "none; calibrate the plan with `accel plan --policy tca`")

    # -- quotas ------------------------------------------------------------------------------------------
    def quotas(self, plan, layer_idx: int, Hkv: int, kv_offset: int = 0) -> torch.Tensor | None:
        """[Hkv] tokens per block each head of the layer keeps (None: the layer is not compressed)."""
        if plan is None:
            raise AccelError("tca: no plan attached (patch the model with a tca plan)")
        lp = plan.layers[layer_idx]
        if not lp.heads:
            return None
        if self.tolerance is None:
            q = [int(h.budget) for h in lp.heads]
        else:  # the calibrator's rule: the sparsest quota of the family within the tolerance
            reachable = family(self.block, self.sigma)
            q = [pick(errs, reachable, float(self.tolerance), self.block) for errs in lp.params["errors"]]
        return torch.tensor(q[kv_offset:kv_offset + Hkv], dtype=torch.long)

    def _layer_quotas(self, ctx, Hkv: int):
        return self.quotas(ctx.runtime.plan, ctx.layer_idx, Hkv, ctx.runtime.kv_offset)

    # -- prefill -------------------------------------------------------------------------------------------
    def prefill_attention(self, ctx, query, key, value, attention_mask, scaling):
        """TCA attention in the prefill (None: dense, where nothing is compressed or the layer is not TCA's)."""
        cl = ctx.cache_layer
        if not self.sparse_prefill or cl is None or cl.is_sliding or key.shape[-1] != value.shape[-1]:
            return None
        B, H, Tq, D = query.shape
        T = key.shape[2]
        quota = self._layer_quotas(ctx, key.shape[1])
        if quota is None or bool((quota >= self.block).all()):
            return None
        valid = prompt_valid(attention_mask, B, T)
        first = first_valid_positions(valid, B)
        if not self._any_block(T, first):
            return None  # no block is compressed for any query: dense attention is TCA's
        kept, blk = select(key, first, quota, self.sink, self.window, self.block, self._metric(ctx.runtime.plan))
        out = tca_attention(query, key, value, kept, blk, first, scaling, self.sink, self.window, self.block)
        ctx.runtime.stats["tca_prefill_layers"] = ctx.runtime.stats.get("tca_prefill_layers", 0) + 1
        return out.transpose(1, 2).contiguous()

    def _any_block(self, T: int, first: torch.Tensor) -> bool:
        """Whether any row of a ``T``-token cache (real tokens from ``first``) has a compressed block."""
        return bool((compressed_blocks(T - first, self.sink, self.window, self.block) > 0).any())

    # -- compression of the prompt's cache (BudgetedKVPolicy.compress calls these) --------------------------
    def budget_floor(self) -> int:
        return 0  # the kept counts are exact: sinks + quotas + the tail

    def head_budgets(self, layer_idx, num_layers, n, Hkv, view, keys, valid, scaling):
        B = keys.shape[0]  # ``compress`` set this layer's quotas (it returns early for a layer that keeps everything)
        self._kept, _ = select(keys, first_valid_positions(valid, B), self._quota, self.sink, self.window, self.block,
                               self._metric(self._plan))
        return self._kept.sum(-1).cpu()

    def growing_heads(self, budgets, n):
        return torch.ones_like(budgets, dtype=torch.bool)  # no budget eviction: blocks are compressed as they age

    def protect(self, budgets):
        return torch.full_like(budgets, self.sink), torch.zeros_like(budgets)

    def token_scores(self, view, keys, valid, budgets, scaling):
        B, Hkv, T, _ = keys.shape
        s = torch.full((B, Hkv, T), _NEG, dtype=torch.float64, device=keys.device)
        return s.masked_fill(self._kept, FORCED)

    def compress(self, cl, layer_idx, num_layers, view, valid, scaling, state, reserve=0, plan=None, kv_offset=0):
        self._plan, self._kv_offset = plan, kv_offset
        quota = self.quotas(plan, layer_idx, cl.keys.shape[1], kv_offset)
        if quota is None or bool((quota >= self.block).all()):
            return  # this layer keeps every token
        B, _, T, _ = cl.keys.shape
        if not self._any_block(T, first_valid_positions(valid, B)):
            return  # nothing to compress yet: blocks are compressed as decoding reaches them
        self._quota = quota
        super().compress(cl, layer_idx, num_layers, view, valid, scaling, state, reserve=reserve, plan=plan,
                         kv_offset=kv_offset)

    # -- decode --------------------------------------------------------------------------------------------
    def after_prefill(self, ctx, query, attention_mask) -> None:
        cl = ctx.cache_layer
        if cl is not None and not cl.is_sliding and cl.ragged is not None:  # more tokens on a compressed cache
            self._compress_ready(ctx, query.shape[2], attention_mask)
            return
        super().after_prefill(ctx, query, attention_mask)

    def after_decode(self, ctx, query, attention_mask) -> None:
        self._compress_ready(ctx, query.shape[2], attention_mask)

    def after_stack(self, rt, attention_mask) -> None:
        """After a decode step that ran the whole stack in one C++ call (the heads grow, nothing is evicted there):
        compress the blocks the step moved out of every layer's window, as ``after_decode`` does per layer. Every
        layer holds the same tokens, so whether a block is due is decided once."""
        s, w, b = self.sink, self.window, self.block
        layers = [(i, cl) for i, cl in enumerate(rt.cache.layers) if not cl.is_sliding]
        if not layers or layers[0][1].cumulative_length <= s + w + b:
            return
        T = layers[0][1].cumulative_length
        first = None
        for i, cl in layers:
            st = rt.layer_state.get(i, {}).get(self.STATE_KEY)
            if cl.ragged is not None and st is not None:
                first = st.current(cl.ragged)[1].view(cl.ragged.shape)[:, 0] - s
                break
        if first is None:
            cl = layers[0][1]
            ok, valid = valid_from_mask(attention_mask, cl.keys.shape[0], cl.keys.shape[2])
            first = first_valid_positions(valid, cl.keys.shape[0]) if ok else None
        if first is not None:
            n = T - first
            if not bool((compressed_blocks(n, s, w, b) > compressed_blocks(n - 1, s, w, b)).any()):
                return
        for i, module in enumerate(rt.adapter.attention_modules()):
            self._compress_ready(rt.context(i, module), 1, attention_mask)

    def _compress_ready(self, ctx, new: int, attention_mask) -> None:
        """Compress the blocks that the last ``new`` tokens moved out of the window."""
        cl = ctx.cache_layer
        if cl is None or cl.is_sliding:
            return
        T = cl.cumulative_length
        s, w, b = self.sink, self.window, self.block
        if cl.ragged is None:  # still dense (a short prompt): compress it once a row's first block is due
            if cl.keys is None or cl.start != 0 or T <= s + w + b:
                return
            B, _, Tk, _ = cl.keys.shape
            ok, valid = step_valid(ctx, attention_mask, B, Tk)
            if not ok:
                raise AccelError("tca got a per-head attention mask it cannot apply; use policy='dense' for this model")
            n = Tk - first_valid_positions(valid, B)
            if not bool((compressed_blocks(n, s, w, b) > compressed_blocks(n - new, s, w, b)).any()):
                return
            scaling = getattr(ctx.module, "scaling", None) or cl.keys.shape[-1] ** -0.5
            from .budgeted import PrefillView

            self.compress(cl, ctx.layer_idx, ctx.runtime.info.num_layers, PrefillView(), valid, scaling,
                          ctx.state, reserve=int(getattr(ctx.runtime, "reserve", 0) or 0), plan=ctx.runtime.plan,
                          kv_offset=ctx.runtime.kv_offset)
            return
        st = ctx.state.get(self.STATE_KEY)
        if st is None:
            raise AccelError(f"tca: layer {ctx.layer_idx} of this cache is compressed but its state is gone (the cache "
                             "was copied other than with copy.deepcopy); continue the cache a patched call returned")
        rg = cl.ragged
        _, sink_end, _ = st.current(rg)
        first = sink_end.view(rg.shape)[:, 0] - s  # [B] each row's first real position
        n = T - first
        lo = compressed_blocks(n - new, s, w, b)
        hi = compressed_blocks(n, s, w, b)
        j0, j1 = int(lo.min()), int(hi.max())
        if j0 >= j1:
            return  # no block left the window (15 steps in 16)
        quota = self._layer_quotas(ctx, rg.shape[1])
        for j in range(j0, j1):
            rows = (lo <= j) & (j < hi)
            if bool(rows.any()):
                drop_block(rg, first + s + j * b, rows, quota, b, T, self._metric(ctx.runtime.plan), w)


def drop_block(rg, start: torch.Tensor, rows: torch.Tensor, quota: torch.Tensor, block: int, T: int,
               metric: str = "cosine", window: int = 0) -> None:
    """Compress one block per selected batch row of the ragged layer ``rg``: the tokens at positions
    ``[start[b], start[b] + block)`` of every head keep the head's ``quota`` least redundant (``metric="context"``:
    against the ``window`` tokens after the block), the rest are evicted by the cache's own eviction (lowest score
    first, with every token before and after the block protected)."""
    from .. import _ext

    B, Hkv = rg.shape
    slots, live = rg.rows()
    pos = rg.pos[slots]
    st = start.view(B, 1, 1)
    inb = live & (pos >= st) & (pos < st + block) & rows.view(B, 1, 1)
    count = inb.sum(-1)  # [B, Hkv]: block on the selected rows, 0 elsewhere
    if not bool(((count == block) | ~rows.view(B, 1)).all()):
        raise AccelError("tca: a block due for compression is not whole in the cache (the cache was edited outside "
                         "accel); start a new cache")
    key = torch.where(inb, pos, torch.iinfo(torch.int64).max)
    order = key.sort(-1).indices[..., :block]  # the block's slots in position order
    brow = slots.gather(-1, order)  # [B, Hkv, block] pool rows
    ref = None
    if metric == "context":  # the window after the block: uncompressed, every row in the cache
        if window < 1:
            raise AccelError(_NEEDS_WINDOW)
        inw = live & (pos >= st + block) & (pos < st + block + window) & rows.view(B, 1, 1)
        if not bool(((inw.sum(-1) == window) | ~rows.view(B, 1)).all()):
            raise AccelError("tca: the window after a block due for compression is not whole in the cache (the cache "
                             "was edited outside accel); start a new cache")
        worder = torch.where(inw, pos, torch.iinfo(torch.int64).max).sort(-1).indices[..., :window]
        ref = _unit(rg.k[slots.gather(-1, worder)]).mean(-2).unsqueeze(2)  # [B, Hkv, 1, D]
    keep = block_keep(rg.k[brow].unsqueeze(2), quota.view(1, Hkv).expand(B, Hkv), metric, ref).squeeze(2)
    sel = rows.view(B, 1, 1).expand(B, Hkv, block)
    rg.score[brow[sel & ~keep]] = -1.0
    rg.score[brow[sel & keep]] = 1.0
    n_drop = (block - quota).view(1, Hkv).expand(B, Hkv)
    budget = torch.where(rows.view(B, 1), rg.lengths.long() - n_drop, torch.iinfo(torch.int64).max)
    sink_end = start.view(B, 1).expand(B, Hkv)  # tokens before the block (sinks, kept tokens) are not candidates
    recent = (T - (start + block)).view(B, 1).expand(B, Hkv)  # neither is anything after it
    budget, sink_end, recent = (x.reshape(-1).long().contiguous() for x in (budget, sink_end, recent))
    if _ext.HAS_CPU_EXT and rg.k.device.type == "cpu":
        _ext.cpu_ext().ragged_evict(rg.k, rg.v, rg.pos, rg.score, rg.offsets.reshape(-1), rg.lengths.view(-1),
                                    budget, sink_end, recent, False)
        return
    from .budgeted import victims

    while True:
        over = rg.lengths.long() > budget.view(B, Hkv)
        if not bool(over.any()):
            return
        rg.evict(victims(rg, sink_end.view(B, Hkv), recent.view(B, Hkv), "score"), over)
