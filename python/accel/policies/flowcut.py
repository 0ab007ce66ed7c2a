"""FlowCut (Tong et al., 2025, "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language
Models", arXiv 2505.19536; methods.md 6.2): progressive pruning inside the vision encoder with [CLS] as the
information relay, and, on anyres models, a second stage in the language model."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import AccelError
from .fastervlm import cls_attention
from .registry import register_policy
from .visual import VisualPolicy, heads_of, keep_topk


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
    vh = heads_of(v, num_heads)  # [B, H, T, d]
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



@register_policy("flowcut")
@dataclass
class FlowCutPolicy(VisualPolicy):
    """FlowCut: progressive pruning inside the vision encoder, [CLS] as the information relay.

    Per layer up to the select layer: score = (r + s) * ||v||_1 (see ``flowcut_scores``),
    accumulated with ``cum = ema * cum + (1 - ema) * score``; every ``prune_every``-th layer before the
    select layer (when the remaining layer count is a multiple of it) the entropy-adaptive count is
    removed; at the select layer everything down to ``keep``. [CLS] is never pruned.

    Args:
        ema: weight of the running score (0.5 in the paper's code).
        prune_every: prune when the layers left before the select layer are a multiple of this (2).
        adaptive: entropy-adaptive counts; False prunes only at the select layer (one-shot) [INFER].
        llm_stage: anyres models (LLaVA-NeXT): the paper's two-stage form. Each image's target is
            ``keep`` per crop times its crop count (the same LM token budget the per-crop policies give);
            the encoder prunes every crop to ``encoder_share`` of that target, then the LLM's decoder layer
            ``llm_layer`` (0-based) ranks the survivors from the last prompt token
            (``flowcut_llm_scores``) and keeps the target; row-end newlines are always kept. The
            scoring pass runs layers ``0..llm_layer`` over the encoder-pruned prompt, then the LLM runs
            only on the final tokens [INFER: the paper drops the tokens inside layer ``llm_layer``, so its
            first layers still see the encoder survivors]. False: encoder stage only, per crop, to ``keep``.
            Ignored on single-crop models (LLaVA-1.5), where the encoder goes straight to the target.
        llm_layer: the decoder layer of the second stage (1 in the paper's code).
        encoder_share: per-crop encoder budget as a fraction of the image's target (0.5: "~target/2").
    Batches: the adaptive count uses the batch-mean entropy so every image keeps the same count
    [INFER: the authors' code runs one image at a time].
    """

    method: ClassVar[str] = "flowcut"
    ema: float = 0.5
    prune_every: int = 2
    adaptive: bool = True
    llm_stage: bool = True
    llm_layer: int = 1
    encoder_share: float = 0.5

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.llm_stage, bool):
            raise AccelError(f"flowcut: llm_stage must be true or false, got {self.llm_stage!r}")
        if not isinstance(self.llm_layer, int) or isinstance(self.llm_layer, bool) or self.llm_layer < 0:
            raise AccelError(f"flowcut: llm_layer must be an integer >= 0 (0-based decoder layer), got {self.llm_layer!r}")
        if not (isinstance(self.encoder_share, (int, float)) and 0 < self.encoder_share <= 1):
            raise AccelError(f"flowcut: encoder_share must be in (0, 1], got {self.encoder_share!r}")
        if not 0 <= self.ema < 1:
            raise AccelError(f"flowcut: ema must be in [0, 1), got {self.ema!r}")
        if not isinstance(self.prune_every, int) or self.prune_every < 1:
            raise AccelError(f"flowcut: prune_every must be an integer >= 1, got {self.prune_every!r}")

    # -- the encoder stage (the vision adapter runs the tower layer by layer and calls this) ------------------
    def encoder_step(self, q, k, v, num_heads: int, scale, running, remaining_layers: int, target: int):
        """One tower layer: FlowCut's score of the current patches folded into their running score
        (``ema * running + (1 - ema) * score``), and how many patches to drop here (everything above ``target``
        at the feature layer; the entropy-adaptive count every ``prune_every``-th layer before it). Returns
        ``(running [B, N], drop)``."""
        score, ent = flowcut_scores(q, k, v, num_heads, scale)
        running = self.ema * running + (1 - self.ema) * score
        n = running.shape[1]
        if remaining_layers == 0:
            drop = n - target
        elif self.adaptive and remaining_layers % self.prune_every == 0:
            drop = flowcut_prune_count(n, target, remaining_layers, float(ent.mean()))
        else:
            drop = 0
        return running, drop

    # -- the LLM stage (anyres models) ------------------------------------------------------------------------
    def language_model_stage(self, runtime, module, ids, img, feats, flags, enc, mask, pos):
        """FlowCut's second stage for anyres models: over the encoder-pruned prompt, decoder layer ``llm_layer``
        scores each image's surviving tokens from the last prompt token (``flowcut_llm_scores``); the image's
        target count is kept (plus its fixed tokens)."""
        if enc.get("stage_targets") is None:
            return flags, feats
        flags, feats = list(flags), list(feats)
        targets, fixed = enc["stage_targets"], enc["stage_fixed"]
        counts = [int(f.sum()) for f in flags]
        need = [i for i, (n, t, fx) in enumerate(zip(counts, targets, fixed)) if n - int(fx.sum()) > t]
        if not need:
            return flags, feats
        lm = runtime.adapter.language_model()
        nl = lm.config.num_hidden_layers
        if self.llm_layer >= nl:
            raise AccelError(f"flowcut: llm_layer {self.llm_layer} is not a layer of the {nl}-layer language model")
        c = runtime.compact(module, ids, img, feats, flags, mask, pos)
        probe = runtime.probe(self.llm_layer, c["embeds"], c["mask"], c["pos"])
        h = probe.query.shape[1]
        k = probe.key.repeat_interleave(h // probe.key.shape[1], dim=1)
        v = probe.value.repeat_interleave(h // probe.value.shape[1], dim=1)
        where = torch.nonzero(c["img"])  # (row, col) of every kept image token, images in order
        start = 0
        stage = []
        for i, n in enumerate(counts):
            rows, cols = where[start:start + n, 0], where[start:start + n, 1]
            start += n
            if i not in need:
                stage.append(None)
                continue
            r = int(rows[0])
            sc = flowcut_llm_scores(probe.query[r, :, -1], k[r][:, cols], v[r, :, -1], v[r][:, cols], probe.scaling)
            fx = fixed[i].to(sc.device)
            sc = sc.masked_fill(fx, float("inf"))
            sel = keep_topk(sc[None], targets[i] + int(fx.sum()))[0]
            kept_pos = torch.nonzero(flags[i]).flatten()[sel.to(flags[i].device)]
            fl = torch.zeros_like(flags[i])
            fl[kept_pos] = True
            flags[i] = fl
            feats[i] = feats[i][sel.to(feats[i].device)]
            stage.append(int(sel.numel()))
        enc["trace"]["llm_stage_kept"] = stage
        return flags, feats
