"""accel's entry in transformers' attention registry (``AttentionInterface``) and the dense helpers.

Registration happens on the first ``accel.patch()`` (never at import). The registered function
looks up the calling attention module in the patch runtime and hands the call to that model's
policy: ``prefill`` for several queries, ``decode`` for one query per sequence. Modules that are not
patched (or calls accel cannot serve, e.g. ``output_attentions``/dropout/softcap) go to
transformers' own implementations, so behaviour is never silently different.
"""
from __future__ import annotations

import logging
import weakref

import torch

from ..ops.attention import decode_attention

logger = logging.getLogger("accel")

ATTN_NAME = "accel"
#: attention module -> (ModelRuntime, layer_idx); weak so a deleted model leaves nothing behind
MODULE_RUNTIME: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_registered = False


def register_attention(name: str, fn) -> None:
    """Register ``fn`` under ``name`` in transformers' attention-function registry, with SDPA-style masks.
    Called on first use only: importing accel registers nothing."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


def ensure_registered() -> None:
    global _registered
    if not _registered:
        register_attention(ATTN_NAME, accel_attention_forward)
        _registered = True


def hf_sdpa(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("sliding_window", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def hf_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention of the module's own architecture (handles softcap etc.).

    accel registers SDPA-style masks, which eager attention cannot take as they are: SDPA's mask function returns
    None when plain causal masking suffices (SDPA's ``is_causal``), and a boolean mask otherwise, while eager
    attention adds its mask to the scores. Both are turned into the additive mask eager attention expects here."""
    import importlib

    mod = importlib.import_module(type(module).__module__)
    fn = getattr(mod, "eager_attention_forward")
    return fn(module, query, key, value, additive_mask(attention_mask, query, key), scaling=scaling, dropout=dropout,
              **kwargs)


def additive_mask(attention_mask, query, key):
    """An SDPA-style mask (None = causal, or bool [B|1, 1, Q, K]) as the additive float mask eager attention adds
    to its scores. The queries are the last ``Q`` positions of the ``K`` keys."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        if q_len == 1:
            return None
        qpos = torch.arange(q_len, device=query.device).view(q_len, 1) + (kv_len - q_len)
        attention_mask = (torch.arange(kv_len, device=query.device).view(1, kv_len) <= qpos).view(1, 1, q_len, kv_len)
    if attention_mask.dtype == torch.bool:
        neg = torch.finfo(query.dtype).min
        return torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(~attention_mask, neg)
    return attention_mask


def valid_from_mask(attention_mask, batch: int, kv_len: int):
    """Turn a decode-step mask (bool or additive, [B|1, 1, 1, T]) into a [B, T] bool validity
    vector for the kernel. Returns (ok, valid): ok=False means the mask has a form the decode kernel
    does not take (per-head masks), and the caller must fall back."""
    if attention_mask is None:
        return True, None
    m = attention_mask
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != 1:
        return False, None
    m = m[:, 0, 0, :kv_len]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    if m.shape[0] != batch:
        m = m.expand(batch, -1)
    if m.shape[1] < kv_len:  # positions past the mask are valid (mask shorter than the cache view)
        m = torch.cat([m, m.new_ones(batch, kv_len - m.shape[1])], dim=1)
    if bool(m.all()):
        return True, None
    return True, m.contiguous()


def dense_decode(ctx, query, key, value, attention_mask, scaling):
    """Exact decode attention with accel's kernel. query [B, H, 1, D], key/value [B, Hkv, T, D]
    (or a compressed layer's row pools, read through its per-head offsets)."""
    if ctx.cache_layer is not None and ctx.cache_layer.ragged is not None:
        return ragged_decode(ctx, query, scaling)
    B, H, _, D = query.shape
    if key.shape[-1] != value.shape[-1]:
        return hf_sdpa(ctx.module, query, key, value, attention_mask, scaling=scaling)[0]
    # the model builds one mask per step (one more for sliding layers) and hands the same tensor to
    # every layer: convert it once, not once per layer
    memo = ctx.runtime.shared.get("valid_mask")
    if memo is not None and memo[0] is attention_mask and memo[1] == key.shape[2]:
        ok, valid = memo[2]
    else:
        ok, valid = valid_from_mask(attention_mask, B, key.shape[2])
        ctx.runtime.shared["valid_mask"] = (attention_mask, key.shape[2], (ok, valid))
    if not ok:
        return hf_sdpa(ctx.module, query, key, value, attention_mask, scaling=scaling)[0]
    out = decode_attention(query[:, :, 0, :], key, value, valid=valid, scale=scaling)
    count_kv_read(ctx, key.shape[0] * key.shape[1] * key.shape[2], key, value)
    return out.unsqueeze(1)  # [B, 1, H, D], the layout HF attention functions return


def ragged_decode(ctx, query, scaling, return_scores: bool = False):
    """Decode attention over a compressed layer (``accel.cache.ragged.RaggedKV``): every KV head
    attends its own kept tokens. When the layer's KV policy asks for it (``accumulate``), the
    attention each kept token receives (mean over the GQA group) is added to its eviction score
    (H2O-style), from the kernel's fused logits output, without a second pass over K.
    ``return_scores``: also return the logits of each head's slots [B, H, W] and the lse [B, H]
    (a layer-reuse anchor over a compressed cache selects from them)."""
    rg = ctx.cache_layer.ragged
    B, H, _, D = query.shape
    Hkv = rg.shape[1]
    q = query[:, :, 0, :]
    sc = lse = None
    if rg.accumulate or return_scores:
        W = max(1, int(rg.lengths.max()))
        sc = torch.empty(B, H, W, device=q.device)
        out, lse = decode_attention(q, rg.k, rg.v, rg.lengths, offsets=rg.offsets, scale=scaling, return_lse=True,
                                    scores=sc)
        if rg.accumulate:
            from .. import _ext

            if _ext.HAS_CPU_EXT and q.device.type == "cpu":
                _ext.cpu_ext().ragged_accumulate(sc, lse.float().contiguous(), rg.offsets.reshape(-1),
                                                 rg.lengths.view(-1), rg.score)
            else:
                rows, live = rg.rows(W)
                p = torch.exp(sc - lse.float().unsqueeze(-1)).view(B, Hkv, H // Hkv, W).mean(2)
                rg.score.index_add_(0, rows[live], p.cpu()[live])  # eviction scores live with the CPU metadata
    else:
        out = decode_attention(q, rg.k, rg.v, rg.lengths, offsets=rg.offsets, scale=scaling)
    ctx.runtime.stats["kv_read_bytes"] += int(rg.lengths.sum()) * rg.row_bytes()
    if return_scores:
        return out.unsqueeze(1), sc, lse
    return out.unsqueeze(1)


def ragged_prefill(ctx, query, scaling):
    """Several new queries on a compressed layer (a prompt continued after compression): the new
    tokens were appended to every head; query i sees the kept tokens and the new ones up to itself."""
    rg = ctx.cache_layer.ragged
    B, H, Q, D = query.shape
    Hkv = rg.shape[1]
    kk, vv, live = rg.padded()
    rows, _ = rg.rows(kk.shape[2])
    pos = rg.pos[rows]  # [B, Hkv, W]
    qpos = ctx.cache_layer.cumulative_length - Q + torch.arange(Q)
    allowed = live.unsqueeze(2) & (pos.unsqueeze(2) <= qpos.view(1, 1, Q, 1))  # [B, Hkv, Q, W]
    G = H // Hkv
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), kk.float().repeat_interleave(G, 1), vv.float().repeat_interleave(G, 1),
        attn_mask=allowed.repeat_interleave(G, 1).to(query.device), scale=scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous()


def count_kv_read(ctx, rows: int, key, value, values_too: bool = True) -> None:
    """Add ``rows`` K (and V) rows to the runtime's decode KV-read counter."""
    per = key.shape[-1] * key.element_size() + (value.shape[-1] * value.element_size() if values_too else 0)
    ctx.runtime.stats["kv_read_bytes"] += int(rows) * per


def accel_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """The registered attention function (under ``torch.compile`` it runs inside the eager decoder call,
    ``accel.patching.core.EagerDecoder``)."""
    entry = MODULE_RUNTIME.get(module)
    if entry is not None:
        entry[0].attn_calls += 1  # the take-over check counts every patched layer's call
    needs_hf = (
        entry is None
        or dropout > 0.0
        or kwargs.get("output_attentions", False)
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
    )
    if needs_hf:
        if kwargs.get("softcap") is not None or kwargs.get("output_attentions", False):
            return hf_eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return hf_sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    runtime, layer_idx = entry
    return runtime.attend(layer_idx, module, query, key, value, attention_mask, scaling, **kwargs)
