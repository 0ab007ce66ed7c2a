"""FasterVLM (Zhang et al., 2024, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster", arXiv 2412.01818; methods.md 6.1): keep the image patches the vision tower's [CLS] token attends
to most. Towers without [CLS] (Qwen2-VL) use the mean attention each patch receives (VisPruner-style)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .registry import register_policy
from .visual import VisualPolicy, heads_of


def cls_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float | None = None,
                  cls_index: int = 0) -> torch.Tensor:
    """Softmax attention of the [CLS] query over every key, averaged over heads.

    Args:
        q, k: the layer's projected queries and keys, ``[B, T, H*d]`` (T includes [CLS]).
        scale: the layer's softmax scale (default ``d ** -0.5``).
    Returns:
        ``[B, T]`` attention probabilities (row sums 1), including the [CLS] column itself; FasterVLM
        then reads the patch columns.
    """
    qh = heads_of(q[:, cls_index:cls_index + 1], num_heads)  # [B, H, 1, d]
    kh = heads_of(k, num_heads)  # [B, H, T, d]
    scale = qh.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)  # [B, H, 1, T]
    return probs.mean(dim=1)[:, 0]


def received_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float | None = None,
                       chunk: int = 1024) -> torch.Tensor:
    """Mean softmax attention each key receives from all queries and heads, ``[B, T]`` (VisPruner's
    importance for encoders without [CLS]). Queries are processed in chunks so memory stays O(chunk * T)."""
    qh, kh = heads_of(q, num_heads), heads_of(k, num_heads)
    scale = qh.shape[-1] ** -0.5 if scale is None else scale
    t = qh.shape[2]
    acc = torch.zeros(qh.shape[0], kh.shape[2], dtype=torch.float32, device=q.device)
    for s in range(0, t, chunk):
        p = torch.softmax((qh[:, :, s:s + chunk] @ kh.transpose(-1, -2)) * scale, dim=-1)
        acc += p.sum(dim=(1, 2))
    return acc / (t * qh.shape[1])



@register_policy("fastervlm")
@dataclass
class FasterVLMPolicy(VisualPolicy):
    """FasterVLM: keep the patches the [CLS] token attends to most.

    Score = softmax attention of the [CLS] query at ``select_layer`` of the vision tower, averaged over
    heads, read at the patch columns; top-``keep`` kept, sorted. Towers without [CLS] (Qwen2-VL) use the
    mean attention each patch receives instead (VisPruner-style).

    Args:
        select_layer: vision layer whose attention scores the patches; None = the layer the VLM takes
            its features from (``vision_feature_layer``, -2 for LLaVA-1.5), as in the paper.
    """

    method: ClassVar[str] = "cls"
    select_layer: int | None = None

