"""transformers' own attention functions, for the calls accel hands back (softcap, ``output_attentions``, dropout,
masks the decode kernel cannot take) and for exact dense prefill."""
from __future__ import annotations

import torch


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

