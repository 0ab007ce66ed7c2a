"""LLaVA (``LlavaForConditionalGeneration``, CLIP vision tower with [CLS]).

The tower is run layer by layer up to the layer the VLM takes its features from
(``vision_feature_layer``), exactly as transformers' ``get_image_features`` computes it
(``hidden_states[0]`` is the pre-layernorm output, ``hidden_states[i]`` the output of layer ``i - 1``),
so the layers after it are not run at all. The scoring layer's projections are read with forward
hooks on its q/k/v linears: no second attention pass, no ``output_attentions``.
"""
from __future__ import annotations

import torch

from ...errors import UnsupportedModelError
from ...policies.fastervlm import cls_attention
from ...policies.visual import keep_topk
from .base import VisionAdapter


class LlavaAdapter(VisionAdapter):
    model_types = ("llava",)

    def __init__(self, model):
        super().__init__(model)
        tower = self.inner.vision_tower
        self.tower = getattr(tower, "vision_model", tower)  # older transformers wrap CLIPVisionTransformer
        for attr in ("embeddings", "pre_layrnorm", "encoder"):
            if not hasattr(self.tower, attr):
                raise UnsupportedModelError(
                    f"{type(tower).__name__} has no `{attr}`: accel's LLaVA adapter supports CLIP-style vision towers "
                    "(embeddings, pre_layrnorm, encoder.layers with q/k/v projections)"
                )
        for layer in self.tower.encoder.layers:
            a = layer.self_attn
            if not all(hasattr(a, x) for x in ("q_proj", "k_proj", "v_proj", "num_heads")):
                raise UnsupportedModelError(f"{type(a).__name__} lacks q/k/v projections: not a CLIP attention layer")
        if not isinstance(self.config.vision_feature_layer, int):
            raise UnsupportedModelError(
                "visual-token pruning needs one vision feature layer; this LLaVA concatenates layers "
                f"{self.config.vision_feature_layer}"
            )

    # -- facts --------------------------------------------------------------------------------------
    def _feature_layer(self, kwargs) -> tuple[int, str]:
        vfl = kwargs.get("vision_feature_layer")
        vfl = self.config.vision_feature_layer if vfl is None else vfl
        strat = kwargs.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        if not isinstance(vfl, int):
            raise UnsupportedModelError(f"visual-token pruning needs one vision feature layer, got {vfl!r}")
        n = len(self.tower.encoder.layers)
        idx = vfl if vfl >= 0 else n + 1 + vfl  # index into hidden_states
        if not 1 <= idx <= n:
            raise UnsupportedModelError(f"vision_feature_layer {vfl} selects no encoder layer output (tower has {n} layers)")
        if strat not in ("default", "full"):
            raise UnsupportedModelError(f"unknown vision_feature_select_strategy {strat!r}")
        return idx - 1, strat  # the last encoder layer to run, strategy

    # -- the tower ----------------------------------------------------------------------------------
    def _embed(self, pixel_values):
        t = self.tower
        return t.pre_layrnorm(t.embeddings(pixel_values))

    def _run_layer(self, i, h, capture: bool):
        layer = self.tower.encoder.layers[i]
        if not capture:
            return layer(h, None), None
        got = {}
        attn = layer.self_attn
        hooks = [getattr(attn, n).register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o))
                 for n in ("q_proj", "k_proj", "v_proj")]
        try:
            h = layer(h, None)
        finally:
            for hk in hooks:
                hk.remove()
        return h, (got["q_proj"], got["k_proj"], got["v_proj"], attn.num_heads, getattr(attn, "scale", None))

    def tokens_per_image(self, pixel_values, kwargs) -> int:
        _, strat = self._feature_layer(kwargs)
        n = self.tower.embeddings.num_patches if hasattr(self.tower.embeddings, "num_patches") else None
        if n is None:
            n = (pixel_values.shape[-1] // self.tower.config.patch_size) * (pixel_values.shape[-2] // self.tower.config.patch_size)
        return n + (1 if strat == "full" else 0)

    def _project(self, feats):
        return self.inner.multi_modal_projector(feats)

    def full_features(self, pixel_values, kwargs):
        feats = self.full_features_tensor(pixel_values, kwargs)
        return list(feats), None

    def full_features_tensor(self, pixel_values, kwargs) -> torch.Tensor:
        """All image features ``[n_img, N, D]`` (what the unpatched model computes)."""
        last, strat = self._feature_layer(kwargs)
        h = self._embed(pixel_values)
        for i in range(last + 1):
            h, _ = self._run_layer(i, h, False)
        return self._project(h[:, 1:] if strat == "default" else h)

    def select(self, pixel_values, policy, kwargs):
        feats, idx = self.select_tensor(pixel_values, policy, kwargs)
        n = self.tokens_per_image(pixel_values, kwargs)
        flags = torch.zeros(idx.shape[0], n, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)
        return list(feats), list(flags)

    def select_tensor(self, pixel_values, policy, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept features ``[n_img, k, D]`` and their indices ``[n_img, k]`` among the image's tokens."""
        last, strat = self._feature_layer(kwargs)
        n_patch = self.tokens_per_image(pixel_values, kwargs) - (1 if strat == "full" else 0)
        k = policy.n_keep(n_patch + (1 if strat == "full" else 0))
        target = k - 1 if strat == "full" else k  # patches kept besides [CLS] ("full" counts [CLS])
        h = self._embed(pixel_values)
        b = h.shape[0]
        if policy.method == "flowcut":
            h, idx = self._flowcut(h, last, target, policy)
        else:
            score_layer = last
            if policy.method == "cls" and getattr(policy, "select_layer", None) is not None:
                sl = policy.select_layer
                score_layer = sl if sl >= 0 else len(self.tower.encoder.layers) + sl
                if not 0 <= score_layer <= last:
                    raise UnsupportedModelError(
                        f"fastervlm select_layer {sl} must be a vision layer at or before the feature layer ({last})")
            scores = None
            for i in range(last + 1):
                h, cap = self._run_layer(i, h, policy.method == "cls" and i == score_layer)
                if cap is not None:
                    q, kk, _, nh, scale = cap
                    scores = cls_attention(q, kk, nh, scale)[:, 1:]  # [B, N] patch columns
            if policy.method == "cls":
                pidx = keep_topk(scores, target)
            elif policy.method == "random":
                pidx = policy.pick(n_patch, target, b).to(h.device)
            else:  # pragma: no cover - guarded by the runtime
                raise UnsupportedModelError(f"{policy.name}: method {policy.method!r} is not an encoder-side method")
            idx = pidx + 1  # token index in h (0 = [CLS])
            h = torch.gather(h, 1, torch.cat([torch.zeros_like(idx[:, :1]), idx], 1)[..., None].expand(-1, -1, h.shape[-1]))
        # h: [B, 1 + target, C] with [CLS] first, patches in original order; idx: their token indices
        if strat == "default":
            return self._project(h[:, 1:]), idx - 1
        return self._project(h), torch.cat([torch.zeros_like(idx[:, :1]), idx], 1)

    def _flowcut(self, h, last, target, policy):
        """FlowCut inside the tower; returns the select layer's output restricted to [CLS] + kept
        patches and the kept patches' token indices (1-based; 0 is [CLS])."""
        b, t, _ = h.shape
        idx = torch.arange(1, t, device=h.device).expand(b, t - 1)  # current patch token indices
        counts = []
        cum = torch.zeros(b, t, dtype=torch.float32, device=h.device)  # running score by token index
        for i in range(last + 1):
            h, (q, k, v, nh, scale) = self._run_layer(i, h, True)
            cur, drop = policy.encoder_step(q, k, v, nh, scale, torch.gather(cum, 1, idx), last - i, target)
            cum.scatter_(1, idx, cur)
            n = idx.shape[1]
            if drop > 0:
                sel = keep_topk(cur, n - drop)  # positions among the current patches, sorted
                idx = torch.gather(idx, 1, sel)
                rows = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=h.device), sel + 1], 1)
                h = torch.gather(h, 1, rows[..., None].expand(-1, -1, h.shape[-1]))
            counts.append(idx.shape[1])
        self.trace["flowcut_patches_per_layer"] = counts
        return h, idx
