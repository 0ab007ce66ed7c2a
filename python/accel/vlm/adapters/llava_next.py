"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "anyres"): each image is a base crop plus a grid of
tiles, all through the same CLIP tower; transformers then unpads the tile grid to the image's aspect
ratio and appends a learned newline token to every row (``pack_image_features``).

Pruning follows FasterVLM's LLaVA-NeXT setting (methods.md 6.1): the budget (``keep`` / ``keep_ratio``)
applies **per crop** (base and every tile), scored in the tower exactly as for LLaVA; the kept tokens
follow the unpadding and reshaping, and the row-end newline tokens are always kept. The packed order is
taken from transformers' own ``pack_image_features`` applied to token indices, so it cannot drift from the
model's layout. ``flowcut`` runs the paper's two stages for anyres (``llm_stage=True``, default): each image's
target is ``keep`` times its crop count, the encoder prunes every crop to ``encoder_share`` of it, and the
runtime's second stage ranks the survivors in an early decoder layer (see ``FlowCutPolicy``); with
``llm_stage=False`` the encoder goes per crop straight to ``keep``. ``fastv`` ranks the packed tokens in the LLM
and keeps ``keep`` per image (``keep_ratio`` of its non-newline tokens); newlines are always kept.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ...errors import InputError, UnsupportedModelError
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)

    def __init__(self, model):
        super().__init__(model)
        if not getattr(self.config, "image_grid_pinpoints", None):
            raise UnsupportedModelError("LLaVA-NeXT config has no image_grid_pinpoints")
        if not hasattr(self.inner, "pack_image_features"):
            raise UnsupportedModelError("this transformers' LlavaNextModel has no pack_image_features")

    def _check_strategy(self, kw):
        _, strat = self._feature_layer(kw)
        if strat != "default":
            raise UnsupportedModelError("visual-token pruning on LLaVA-NeXT supports vision_feature_select_strategy='default'")
        return strat

    def _crops(self, pixel_values, image_sizes):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if image_sizes is None:
            raise InputError("LLaVA-NeXT needs image_sizes with pixel_values (the processor returns them)")
        nums = [image_size_to_num_patches(image_size=s, grid_pinpoints=self.config.image_grid_pinpoints,
                                          patch_size=self.config.vision_config.image_size) for s in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, nums)], 0)
        elif pixel_values.dim() != 4:
            raise InputError(f"LLaVA-NeXT pixel_values must be 4-D or 5-D, got shape {tuple(pixel_values.shape)}")
        return pixel_values, nums

    def _layout(self, nums, image_sizes, per_crop: int, strat: str) -> list[torch.Tensor]:
        """Per image, the packed sequence as crop-token indices (crop * per_crop + token), -1 = newline."""
        fake = [torch.arange(n * per_crop, dtype=torch.float64).view(n, per_crop, 1) for n in nums]
        packed, _ = self.inner.pack_image_features(fake, image_sizes, strat, image_newline=torch.tensor([-1.0], dtype=torch.float64))
        return [p[:, 0].round().long() for p in packed]

    def tokens_per_image(self, pixel_values, kwargs) -> int:  # per crop
        return super().tokens_per_image(pixel_values, kwargs)

    def full_features(self, pixel_values, kw):
        strat = self._check_strategy(kw)
        sizes = kw.get("image_sizes")
        pv, nums = self._crops(pixel_values, sizes)
        feats = self.full_features_tensor(pv, kw)
        packed, _ = self.inner.pack_image_features(list(torch.split(feats, nums)), sizes, strat,
                                                   image_newline=self.inner.image_newline)
        layout = self._layout(nums, sizes, feats.shape[1], strat)
        return list(packed), [(lay < 0).to(feats.device) for lay in layout]

    def select(self, pixel_values, policy, kw):
        strat = self._check_strategy(kw)
        sizes = kw.get("image_sizes")
        pv, nums = self._crops(pixel_values, sizes)
        per_crop = self.tokens_per_image(pv, kw)
        targets = None
        if policy.method == "flowcut" and policy.llm_stage:
            # FlowCut anyres: image target = keep per crop x crops; the encoder keeps a share of it per crop
            targets = [policy.n_keep(per_crop) * n for n in nums]
            parts, start = [], 0
            for n, t in zip(nums, targets):
                enc_keep = min(per_crop, max(1, math.ceil(policy.encoder_share * t)))
                sub = dataclasses.replace(policy, keep=enc_keep, keep_ratio=None)
                parts.append(self.select_tensor(pv[start:start + n], sub, kw))
                start += n
        else:
            feats, idx = self.select_tensor(pv, policy, kw)  # per crop: [C, k, D], [C, k]
            parts = list(zip(torch.split(feats, nums), torch.split(idx, nums)))
        layout = self._layout(nums, sizes, per_crop, strat)
        newline = self.inner.image_newline
        out_f, out_flags = [], []
        for i, n in enumerate(nums):
            feats, idx = parts[i]
            crop_flags = torch.zeros(n, per_crop, dtype=torch.bool, device=idx.device)
            crop_flags.scatter_(1, idx, True)
            crop_flags = crop_flags.flatten()
            buf = feats.new_zeros(n * per_crop, feats.shape[-1])
            buf[crop_flags] = feats.reshape(-1, feats.shape[-1])
            lay = layout[i].to(idx.device)
            fl = torch.where(lay < 0, torch.ones_like(crop_flags[:1]).expand_as(lay), crop_flags[lay.clamp_min(0)])
            kept = lay[fl]
            f = buf[kept.clamp_min(0)]
            if newline is not None:
                f = torch.where((kept < 0)[:, None], newline.to(f.dtype)[None], f)
            out_f.append(f)
            out_flags.append(fl)
        self.trace["crops_per_image"] = nums
        if targets is not None:
            self.trace["encoder_kept_indices"] = [torch.nonzero(f).flatten().cpu() for f in out_flags]
            self.llm_stage = {"targets": targets, "fixed": [(lay < 0).to(idx.device)[fl]
                                                            for lay, fl in zip(layout, out_flags)]}
        return out_f, out_flags
