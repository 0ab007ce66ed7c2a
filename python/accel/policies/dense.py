"""Dense attention: exact attention, accel's cache and decode kernel. The baseline every lossy
policy is measured against, and what every policy reduces to when its budget covers the context."""
from __future__ import annotations

from dataclasses import dataclass

from .base import AttentionPolicy
from .registry import register_policy


@register_policy("dense")
@dataclass
class DensePolicy(AttentionPolicy):
    """Exact attention. Prefill: transformers' SDPA; decode: accel's C++/Triton/CUDA kernel over the
    preallocated cache (GQA-aware, reads each K/V row once per step)."""

    lossy = False
    per_kv_head = True
    #: decode reads a compressed (ragged, per-head) cache through the kernels' per-head row offsets
    supports_compressed_cache = True
