"""Recycled Attention / RefreshKV (Xu, Goyal, Choi; arXiv 2411.05787, ACL 2025; methods.md section 2).

Two caches per layer: the full cache ``C_f`` (accel's cache, never evicted) and a partial cache ``C_p`` of
``K`` tokens. ``C_p`` is held as positions into ``C_f`` and read in place by the sparse kernel, which is
the same computation as a separate compact copy without the copy.

* After prefill (or at a layer's first decode step when the prompt KV came from elsewhere) and at every
  *full step*: attention over ``C_f``, then the current query's probabilities, max over the query heads
  of each KV head, 1-D max pooling with kernel 7, top-K tokens -> ``C_p``, kept in ascending score order.
* *Partial steps* attend to ``C_p`` only. Each new token joins ``C_p`` and the lowest-scored member of the
  last full step leaves it, so ``|C_p|`` stays ``K``; ``C_f`` receives every token as usual (the paper's
  lazy flush gives the same ``C_f`` at every full step).
* Schedule, per layer: ``fixed`` (a full step every ``stride`` steps) or ``dynamic`` (every ``qc`` steps,
  the mean over the layer's query heads of the current query is compared with the one stored at the
  last full step; cosine below ``threshold`` -> full step). The query compared is pre-RoPE ([INFER] per
  the spec: post-RoPE queries drift with position), read by a forward hook on the layer's query
  projection; ``similarity_query="post_rope"`` uses the attention input instead. In a batch the layer
  takes a full step when any sequence falls below the threshold ([INFER], conservative).

Defaults from the paper: ``K = L_in / 8``, kernel 7, GQA max, ``qc = 5``; ``threshold`` 0.85 (their
Llama-3.1 value; 0.95 for Qwen2); fixed ``stride`` 10. ``refresh=False`` never refreshes ``C_p`` (the
method then degenerates to SnapKV with window 1 and kernel 7, as the paper notes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.decode import count_kv_read, dense_decode, dense_with_scores, gather_rows, own_scores, sparse_attend
from ..attention.masks import first_valid_positions
from ..attention.selection import check_budget_knobs, select_from_scores, token_budget
from ..errors import AccelError
from ..attention.context import LayerContext
from .base import AttentionPolicy
from .registry import register_policy


@register_policy("recycled")
@dataclass
class RecycledPolicy(AttentionPolicy):
    """Args:
        topk / topk_ratio: ``K``, the partial cache size per KV head, in tokens or as a fraction of the
            current context (default 1/8, the paper's ``L_in/8``; with a ratio ``K`` follows the context
            as it grows, so ``topk_ratio=1`` keeps every token).
        schedule: 'dynamic' (RefreshKV) or 'fixed' (Recycled Attention v1).
        stride: fixed schedule: a full step every ``stride`` decode steps (1 = always dense).
        qc: dynamic schedule: query-similarity check every ``qc`` steps.
        threshold: dynamic schedule: full step when cosine similarity < threshold (>= 1: every check).
        pool_kernel: max-pooling window over tokens before top-K (7).
        agg: GQA aggregation of the group's probabilities ('max' in the paper's ablation winner).
        sink, recent: tokens always kept in C_p and never evicted (the paper: 0; [INFER] knob).
        refresh: re-select C_p at full steps (False: never refresh, SnapKV-like).
        similarity_query: 'pre_rope' (hook on the query projection) or 'post_rope'.
        compact: hold C_p as its own small contiguous cache (the paper's design; partial steps then
            stream it) when the batch has no padding; False (or padded batches) reads C_p in place from
            the full cache through an index list. Both attend to the same tokens.
        min_topk: with ``topk_ratio``, ``K`` is at least this many tokens ([INFER], 64: the paper's
            ``L_in/8`` would keep one token of an 8-token prompt).
    """

    topk: int | None = None
    topk_ratio: float | None = 0.125
    schedule: str = "dynamic"
    stride: int = 10
    qc: int = 5
    threshold: float = 0.85
    pool_kernel: int = 7
    agg: str = "max"
    sink: int = 0
    recent: int = 0
    refresh: bool = True
    similarity_query: str = "pre_rope"
    compact: bool = True
    min_topk: int = 64

    def tensor_parallel_problem(self, plan=None) -> str | None:
        return "its refresh scores use the query averaged over all of a layer's heads"

    def validate(self) -> None:
        check_budget_knobs("recycled", self.topk, self.topk_ratio, self.sink, self.recent, 1)
        if not isinstance(self.min_topk, int) or self.min_topk < 0:
            raise AccelError(f"recycled: min_topk must be a non-negative integer, got {self.min_topk!r}")
        if self.schedule not in ("dynamic", "fixed"):
            raise AccelError(f"recycled: schedule must be 'dynamic' or 'fixed', got {self.schedule!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise AccelError(f"recycled: stride must be a positive integer, got {self.stride!r}")
        if not isinstance(self.qc, int) or self.qc < 1:
            raise AccelError(f"recycled: qc must be a positive integer, got {self.qc!r}")
        if not (-1.0 <= float(self.threshold) <= 1.0 + 1e-9):
            raise AccelError(f"recycled: threshold is a cosine similarity in [-1, 1], got {self.threshold!r}")
        if self.pool_kernel < 0 or (self.pool_kernel > 1 and self.pool_kernel % 2 == 0):
            raise AccelError(f"recycled: pool_kernel must be 0/1 (off) or odd, got {self.pool_kernel}")
        if self.agg not in ("max", "mean", "sum"):
            raise AccelError(f"recycled: agg must be 'max', 'mean' or 'sum' (selection is per KV head), got {self.agg!r}")
        if self.similarity_query not in ("pre_rope", "post_rope"):
            raise AccelError(f"recycled: similarity_query must be 'pre_rope' or 'post_rope', got {self.similarity_query!r}")

    # -- hooks: the pre-RoPE query of the decode token, per layer ------------------------------------
    def install(self, runtime, adapter) -> list:
        if self.schedule != "dynamic" or self.similarity_query != "pre_rope":
            return []
        handles = []
        info = runtime.info
        hd = info.num_heads * info.head_dim
        for i, attn in enumerate(adapter.attention_modules()):
            proj, width = getattr(attn, "q_proj", None), hd
            if proj is None and getattr(attn, "qkv_proj", None) is not None:  # phi3: fused q|k|v
                proj = attn.qkv_proj
            if proj is None:
                continue
            layer = getattr(attn, "layer_idx", i)

            def hook(mod, inp, out, layer=layer, width=width):
                x = out[:, -1, :width].float()
                runtime.shared[("q_pre", layer)] = x.view(x.shape[0], info.num_heads, info.head_dim).mean(1)

            handles.append(proj.register_forward_hook(hook))
        return handles

    def _query_summary(self, ctx: LayerContext, query) -> torch.Tensor:
        q = ctx.runtime.shared.get(("q_pre", ctx.layer_idx)) if self.similarity_query == "pre_rope" else None
        if q is None:
            q = query[:, :, -1, :].float().mean(1)
        return q

    # -- selection -------------------------------------------------------------------------------------
    def _refresh(self, ctx: LayerContext, scores, lse, valid, T: int, Hkv: int, query, key=None, value=None) -> None:
        st = ctx.state
        if ctx.cache_layer is not None:
            st["version"] = ctx.cache_layer.version  # rows of this state follow the cache's batch rows
        K = token_budget(T, self.topk, self.topk_ratio, self.min_topk)
        B = scores.shape[0]
        fv = first_valid_positions(valid, B)
        if K >= T:
            order = torch.arange(T).view(1, 1, T).expand(B, Hkv, T)
        else:
            idx, counts, a = select_from_scores(scores, lse, Hkv, K, agg=self.agg, chunk=1, sink=self.sink,
                                                  recent=self.recent, first_valid=fv, pool_kernel=self.pool_kernel,
                                                  T=T, return_scores=True)
            pos = idx.long().clamp(min=0)
            rank = a.gather(2, pos)
            forced = (pos < (fv + self.sink).view(B, 1, 1)) & (pos >= fv.view(B, 1, 1)) if self.sink else torch.zeros_like(pos, dtype=torch.bool)
            if self.recent:
                forced |= pos >= T - self.recent
            rank = rank.masked_fill(forced, float("inf")).masked_fill(idx < 0, float("-inf"))
            order = pos.gather(2, rank.argsort(dim=-1, stable=True))  # ascending score: evicted first
            order = order[:, :, int((idx < 0).sum(-1).max()):]  # drop padding slots (all rows equal length)
        st["order"] = order.contiguous()
        st.pop("kp", None)
        if self.compact and valid is None and key is not None and order.shape[-1] < T:
            # C_p as its own small cache, slots in ascending score order: eviction of the lowest-scored
            # member is a moving start pointer, new tokens are appended at the end, and partial steps
            # read one contiguous span (streaming bandwidth instead of scattered rows)
            n = order.shape[-1]
            room = n + max(16, n // 4)
            kp = key.new_empty(B, Hkv, room, key.shape[-1])
            vp = value.new_empty(B, Hkv, room, value.shape[-1])
            kp[:, :, :n] = gather_rows(key, order)
            vp[:, :, :n] = gather_rows(value, order)
            st["kp"], st["vp"], st["cp_lo"], st["cp_hi"] = kp, vp, 0, n
            st["cp_next"] = T  # the position of the next token C_p must receive
        st["t_full"] = T
        st["q_ref"] = self._query_summary(ctx, query)
        st["since_full"] = 0
        st["since_check"] = 0

    def _partial_compact(self, ctx: LayerContext, key, value, T: int):
        """Append the current token to the compact C_p, evict down to K, return the live K/V span."""
        st = ctx.state
        kp, vp, lo, hi = st["kp"], st["vp"], st["cp_lo"], st["cp_hi"]
        if hi == kp.shape[2]:  # full: move the live span to the front (and grow if it fills the buffer)
            n = hi - lo
            if n + 16 > kp.shape[2]:
                nk = kp.new_empty(kp.shape[0], kp.shape[1], n + max(16, n // 2), kp.shape[3])
                nv = vp.new_empty(vp.shape[0], vp.shape[1], n + max(16, n // 2), vp.shape[3])
            else:
                nk, nv = kp, vp
            nk[:, :, :n] = kp[:, :, lo:hi].clone()
            nv[:, :, :n] = vp[:, :, lo:hi].clone()
            kp, vp, lo, hi = nk, nv, 0, n
        kp[:, :, hi] = key[:, :, T - 1]
        vp[:, :, hi] = value[:, :, T - 1]
        hi += 1
        lo = max(lo, hi - token_budget(T, self.topk, self.topk_ratio, self.min_topk))
        st["kp"], st["vp"], st["cp_lo"], st["cp_hi"] = kp, vp, lo, hi
        return kp[:, :, lo:hi], vp[:, :, lo:hi]

    def _partial_set(self, ctx: LayerContext, T: int):
        st = ctx.state
        order, t_full = st["order"], st["t_full"]
        K = token_budget(T, self.topk, self.topk_ratio, self.min_topk)
        B, Hkv, n = order.shape
        s = T - t_full
        evict = max(0, n + s - K)
        if evict >= n:
            lo = max(0, T - K)
            idx = torch.arange(lo, T).view(1, 1, -1).expand(B, Hkv, T - lo)
        else:
            new = torch.arange(t_full, T).view(1, 1, -1).expand(B, Hkv, s)
            idx = torch.cat([order[:, :, evict:], new], dim=-1).sort(dim=-1).values
        idx = idx.to(torch.int32).contiguous()
        counts = torch.full((B, Hkv), idx.shape[-1], dtype=torch.int32)
        return idx, counts

    def _full_due(self, ctx: LayerContext, query) -> bool:
        st = ctx.state
        if "order" not in st:
            return True
        st["since_full"] += 1
        if self.schedule == "fixed":
            return st["since_full"] >= self.stride
        st["since_check"] += 1
        if st["since_check"] < self.qc:
            return False
        st["since_check"] = 0
        if self.threshold >= 1.0:
            return True
        cos = torch.nn.functional.cosine_similarity(self._query_summary(ctx, query), st["q_ref"], dim=-1)
        return bool((cos < self.threshold).any())

    # -- the policy ------------------------------------------------------------------------------------
    def prefill(self, ctx: LayerContext, query, key, value, attention_mask, scaling, **kwargs):
        out = super().prefill(ctx, query, key, value, attention_mask, scaling, **kwargs)
        cl = ctx.cache_layer
        if cl is None or getattr(cl, "is_sliding", False):
            return out
        T = key.shape[2]
        m = attention_mask[:, :, -1:, :] if attention_mask is not None and attention_mask.dim() == 4 else attention_mask
        q1 = query[:, :, -1:, :]
        scores, lse, valid = own_scores(q1, key, m, ctx, scaling)
        ctx.runtime.shared.pop("valid_mask", None)  # that memo was for the prefill's last row only
        ctx.state.clear()
        self._refresh(ctx, scores, lse, valid, T, key.shape[1], q1, key, value)
        return out

    def decode(self, ctx: LayerContext, query, key, value, attention_mask, scaling, **kwargs):
        cl = ctx.cache_layer
        T = key.shape[2]
        if cl is None or getattr(cl, "is_sliding", False):
            return dense_decode(ctx, query, key, value, attention_mask, scaling)
        st = ctx.state
        if st.get("t_full", 0) > T or st.get("version", cl.version) != cl.version:
            st.clear()  # the cache was cropped, replaced or reordered (beam search): start over with a full step
        if self._full_due(ctx, query):
            if "order" in st and not self.refresh:
                st["since_full"] = 0
                return dense_decode(ctx, query, key, value, attention_mask, scaling)
            res = dense_with_scores(ctx, query, key, value, attention_mask, scaling)
            if res is None:
                return dense_decode(ctx, query, key, value, attention_mask, scaling)
            out, scores, lse, valid = res
            self._refresh(ctx, scores, lse, valid, T, key.shape[1], query, key, value)
            return out
        if "kp" in st and st["cp_next"] != T - 1:  # a token went by without this layer: use the index path
            st.pop("kp")
        if "kp" in st:
            st["cp_next"] = T
            kspan, vspan = self._partial_compact(ctx, key, value, T)
            from ..ops.attention import decode_attention

            out = decode_attention(query[:, :, 0, :], kspan, vspan, scale=scaling)
            count_kv_read(ctx, kspan.shape[0] * kspan.shape[1] * kspan.shape[2], key, value)
            return out.unsqueeze(1)
        idx, counts = self._partial_set(ctx, T)
        if idx.shape[-1] >= T:  # C_p holds every token: exact
            return dense_decode(ctx, query, key, value, attention_mask, scaling)
        return sparse_attend(ctx, query, key, value, attention_mask, scaling, idx, counts)
