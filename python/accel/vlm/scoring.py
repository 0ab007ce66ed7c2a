"""Visual-token scores and keep-sets: the maths of the pruning policies, in plain torch.

Everything here works on one layer's projected queries / keys / values, shaped ``[B, T, H, d]`` (the
vision tower's token axis before the head axis, as the projections produce them), so the adapters only
have to hand over what the layer computed anyway; no second attention pass and no ``output_attentions``
(every layer keeps its fast attention path).

* ``cls_attention``: FasterVLM's score (Zhang et al., arXiv 2412.01818): the [CLS] query's softmax
  attention over all keys, averaged over heads.
* ``flowcut_scores`` / ``flowcut_prune_count``: FlowCut's per-layer score and adaptive prune count
  (Tong et al., arXiv 2505.19536; methods.md 6.2).
* ``received_attention``: the mean attention each token *receives* from all queries (VisPruner-style
  importance for towers without [CLS], e.g. Qwen2-VL).
* ``keep_topk``: top-k with the kept indices sorted, so kept tokens keep their original order.
"""
from __future__ import annotations

import math

import torch


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, T, H*d]`` -> ``[B, H, T, d]`` in fp32."""
    b, t, _ = x.shape
    return x.reshape(b, t, num_heads, -1).transpose(1, 2).float()


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
    qh = _heads(q[:, cls_index:cls_index + 1], num_heads)  # [B, H, 1, d]
    kh = _heads(k, num_heads)  # [B, H, T, d]
    scale = qh.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)  # [B, H, 1, T]
    return probs.mean(dim=1)[:, 0]


def received_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float | None = None,
                       chunk: int = 1024) -> torch.Tensor:
    """Mean softmax attention each key receives from all queries and heads, ``[B, T]`` (VisPruner's
    importance for encoders without [CLS]). Queries are processed in chunks so memory stays O(chunk * T)."""
    qh, kh = _heads(q, num_heads), _heads(k, num_heads)
    scale = qh.shape[-1] ** -0.5 if scale is None else scale
    t = qh.shape[2]
    acc = torch.zeros(qh.shape[0], kh.shape[2], dtype=torch.float32, device=q.device)
    for s in range(0, t, chunk):
        p = torch.softmax((qh[:, :, s:s + chunk] @ kh.transpose(-1, -2)) * scale, dim=-1)
        acc += p.sum(dim=(1, 2))
    return acc / (t * qh.shape[1])


def keep_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores per row, sorted ascending (original order kept). ``[B, k]``.
    Ties go to the lower index (stable), so the result is deterministic."""
    n = scores.shape[-1]
    if k >= n:
        return torch.arange(n, device=scores.device).expand(scores.shape[0], n)
    # stable: sort descending by score, ascending by index among equals
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=-1).values


def flowcut_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                   scale: float | None = None, cls_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut's per-patch score for one layer and the entropy of the [CLS] attention.

    score = (r + s) * ||v||_1 with r the [CLS]-to-patch attention (head mean) renormalised over patches,
    s the per-head softmax over tokens of the (unscaled) dot product of the [CLS] value with every value,
    head mean, renormalised over patches, and ||v||_1 the L1 norm of each patch's head-averaged value.

    Args:
        q, k, v: ``[B, T, H*d]`` projections of the layer (T includes [CLS] at ``cls_index``).
    Returns:
        ``(score [B, T-1], entropy [B])`` over the patch tokens (the [CLS] column removed), entropy of
        ``r`` in nats.
    """
    t = k.shape[1]
    patches = torch.tensor([i for i in range(t) if i != cls_index], device=k.device)
    attn = cls_attention(q, k, num_heads, scale, cls_index)[:, patches]  # [B, N]
    r = attn / attn.sum(-1, keepdim=True).clamp_min(1e-30)
    vh = _heads(v, num_heads)  # [B, H, T, d]
    sim = vh[:, :, cls_index:cls_index + 1] @ vh.transpose(-1, -2)  # [B, H, 1, T], no 1/sqrt(d) (FlowCut)
    s = torch.softmax(sim, dim=-1).mean(dim=1)[:, 0][:, patches]
    s = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
    vnorm = vh.mean(dim=1)[:, patches].abs().sum(-1)  # [B, N]
    entropy = -(r * torch.log(r.clamp_min(1e-30))).sum(-1)
    return (r + s) * vnorm, entropy


def flowcut_llm_scores(q_last: torch.Tensor, k_vis: torch.Tensor, v_last: torch.Tensor, v_vis: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """FlowCut's second, in-LLM stage (anyres models): scores of one image's visual tokens from one
    decoder layer, seen from the last instruction token.

    relation = softmax over the image's tokens of ``scale * q_last . k`` (head mean), semantic = softmax
    of ``scale * v_last . v`` (head mean), score = (relation + semantic) * ||v||_1 with ||v||_1 the L1
    norm of each token's head-averaged value (the same combination as the encoder stage).

    Args:
        q_last: ``[H, d]`` query of the last prompt token (rotary applied, as the layer uses it).
        k_vis: ``[H, N, d]`` keys of the image's tokens (KV heads already repeated to ``H``).
        v_last: ``[H, d]`` value of the last prompt token; v_vis: ``[H, N, d]``.
    Returns: ``[N]``.
    """
    rel = torch.softmax((k_vis.float() @ q_last.float()[..., None])[..., 0] * scale, dim=-1).mean(0)
    sem = torch.softmax((v_vis.float() @ v_last.float()[..., None])[..., 0] * scale, dim=-1).mean(0)
    vnorm = v_vis.float().mean(0).abs().sum(-1)
    return (rel + sem) * vnorm


def flowcut_prune_count(n: int, target: int, remaining_layers: int, entropy: float) -> int:
    """How many patches FlowCut removes at a layer with ``remaining_layers`` (rpl) layers left before
    the select layer: ``(n - target) / sqrt(rpl) * (1 - (H / log n)^2)``, everything above the target at
    rpl = 0, never below the target. Flat [CLS] attention (H near log n) prunes less."""
    if n <= target:
        return 0
    if remaining_layers <= 0:
        return n - target
    h_max = math.log(n) if n > 1 else 1.0
    frac = 1.0 - min(1.0, max(0.0, entropy / h_max)) ** 2
    return int(max(0, min(n - target, math.floor((n - target) / math.sqrt(remaining_layers) * frac))))
