"""Decode-step timing of MLA models with a synthetic latent cache (shared by ``accel bench`` on MLA models and
``bench/bench_tpla.py``): prefill of 8K-32K tokens takes minutes on a CPU, and decode cost does not depend on
the cache's content, so the cache is filled directly with structured latents."""
from __future__ import annotations
from .. import compat

import statistics
import time

import torch


def hf_latent_cache(model, context: int, batch: int = 1):
    """A transformers ``DynamicCache`` holding ``context`` tokens of latents, as unpatched DeepSeek stores them."""
    from transformers import DynamicCache

    from .tpla_errors import structured_latents

    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        x = structured_latents(batch * context, a.kv_lora_rank, seed=1000 * i).view(batch, 1, context, a.kv_lora_rank)
        with torch.no_grad():
            cache.update(a.kv_a_layernorm(x), torch.randn(batch, 1, context, a.qk_rope_head_dim), i)
    return cache


def time_decode(model, cache, context: int, steps: int, batch: int = 1) -> float:
    """Median seconds of ``steps`` decode steps (after one warm-up step) continuing ``cache`` at ``context``."""
    tok = torch.full((batch, 1), 5, dtype=torch.long)
    times = []
    with torch.no_grad():
        for s in range(steps + 1):
            pos = torch.full((batch, 1), context + s, dtype=torch.long)
            t0 = time.perf_counter()
            model(input_ids=tok, position_ids=pos, use_cache=True, **compat.cache_kwargs(model, cache))
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
