"""Random KV caches for speed-only runs (``accel bench --synthetic-kv``, ``accel calibrate-cost``): the decode cost of
these policies depends on how many keys a step touches, not on which."""
from __future__ import annotations

import torch


def synthetic_cache(model, batch: int, length: int, for_hf: bool):
    """A cache of ``length`` random tokens per layer (speed-only runs): AccelCache, or a DynamicCache
    copy of it for the unpatched baseline."""
    from ..cache.accel_cache import AccelCache
    from .runner import fork_cache
    from ..models.registry import get_adapter

    info = get_adapter(model).info()
    p0 = next(model.parameters())
    dt = p0.dtype
    cache = AccelCache(model.config, reserve=length + 64)
    g = torch.Generator().manual_seed(0)
    for i in range(info.num_layers):
        kv = torch.randn(batch, info.num_kv_heads, length, info.head_dim, generator=g).to(device=p0.device, dtype=dt)
        cache.update(kv, kv.clone(), i)
    return fork_cache(cache, for_hf=True) if for_hf else cache


def compress_synthetic(cache, handle) -> None:
    """Speed-only runs of KV-cache policies: compress the random cache with each policy's own budgets
    (random window queries / attention statistics stand in for the prompt's; which tokens are kept does
    not change the decode cost, how many does)."""
    g = torch.Generator().manual_seed(1)
    info = handle.runtime.info
    stats = {}
    for i, layer in enumerate(cache.layers):
        if layer.keys is None:
            continue
        B, _, T, D = layer.keys.shape
        stats[i] = {"q_window": torch.randn(B, info.num_heads, 64, D, generator=g).to(layer.keys.device, layer.keys.dtype),
                    "colsum": torch.rand(B, info.num_heads, T, generator=g).to(layer.keys.device)}
    cache.prefill_stats = stats
    for p in handle.runtime.kv:
        p.compress_recorded(cache, handle.runtime)
