"""Qwen2-VL / Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

The vision tower has no [CLS] token and ends in a patch merger that fuses each 2x2 group of patches into
one LLM token, so pruning happens on the *merged* tokens, after the tower (the merger needs whole
groups): the tower runs unchanged, and one block's attention (the last by default) scores each patch by
the mean softmax attention it receives from all patches of its image and heads (VisPruner-style, for
towers without [CLS]); a merged token's score is the mean over its group. Qwen2.5-VL: the last *full-attention*
block scores (the others attend within windows), and its window permutation of the merge units is undone. ``fastervlm`` keeps the top ``keep``
merged tokens per image in their original order; ``randomprune`` and ``fastv`` work as everywhere.
``flowcut`` needs the [CLS] relay and is refused with a clear error.

Positions: the kept tokens keep their original multimodal rotary (M-RoPE) position ids. transformers'
``generate`` computes them for the unpruned prompt and passes them in, and the pruner gathers the kept
columns; without given position ids they come from the model's own ``get_rope_index``. The model's
``rope_deltas`` (used when a later call has no position ids) are shifted by the pruned count so decode
positions continue the original sequence.
"""
from __future__ import annotations

import torch

from ...errors import InputError, UnsupportedModelError
from ...policies.fastervlm import received_attention
from ...policies.visual import keep_topk
from .base import VisionAdapter


class Qwen2VLAdapter(VisionAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    extra_image_kwargs = ("image_grid_thw",)
    feature_arg_names = ("image_grid_thw",)
    multi_axis_positions = True

    def __init__(self, model):
        super().__init__(model)
        vis = getattr(self.inner, "visual", None)
        if vis is None or not hasattr(vis, "blocks") or not hasattr(vis, "merger"):
            raise UnsupportedModelError(f"{type(model).__name__}: expected `model.visual` with blocks and a merger")
        self.visual = vis
        self.merge = int(getattr(vis, "spatial_merge_size", 2))
        if not hasattr(self.inner, "get_rope_index"):
            raise UnsupportedModelError("this transformers' Qwen2-VL model has no get_rope_index")

    # -- the tower ----------------------------------------------------------------------------------------
    def _grid(self, kw):
        grid = kw.get("image_grid_thw")
        if grid is None:
            raise InputError("Qwen2-VL needs image_grid_thw with pixel_values (the processor returns it)")
        return grid

    def _run(self, pixel_values, grid, score_block: int | None):
        """Merged features per image and, if ``score_block`` is set, each image's patch scores."""
        got = {}
        hook = None
        if score_block is not None:
            blk = self.visual.blocks[score_block]

            def capture(module, args, kwargs):
                got["h"] = args[0] if args else kwargs["hidden_states"]
                got["cu"] = kwargs["cu_seqlens"]
                got["pe"] = kwargs.get("position_embeddings")

            hook = blk.attn.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            out = self.visual(pixel_values.type(next(self.visual.parameters()).dtype), grid_thw=grid)
        finally:
            if hook is not None:
                hook.remove()
        merged = out.pooler_output if hasattr(out, "pooler_output") else out
        sizes = (grid.prod(-1) // self.merge ** 2).tolist()
        feats = list(torch.split(merged, sizes))
        scores = None
        if score_block is not None:
            self._window_index = None
            if hasattr(self.visual, "window_size"):  # Qwen2.5-VL
                from transformers.vision_utils import get_vision_window_index

                self._window_index, _ = get_vision_window_index(grid, self.merge, self.visual.window_size,
                                                                self.visual.patch_size)
            scores = self._patch_scores(self.visual.blocks[score_block].attn, got, sizes)
        return feats, scores

    def _patch_scores(self, attn, got, sizes) -> list[torch.Tensor]:
        import importlib

        rope = getattr(importlib.import_module(type(attn).__module__), "apply_rotary_pos_emb_vision")
        h = got["h"]
        t = h.shape[0]
        nh = attn.num_heads
        q, k, _ = attn.qkv(h).reshape(t, 3, nh, -1).permute(1, 0, 2, 3).unbind(0)
        if got["pe"] is not None:
            cos, sin = got["pe"]
            q, k = rope(q, k, cos, sin)
        cu = got["cu"].tolist()
        out = []
        for i in range(len(cu) - 1):
            qs, ks = q[cu[i]:cu[i + 1]].reshape(1, -1, nh * q.shape[-1]), k[cu[i]:cu[i + 1]].reshape(1, -1, nh * k.shape[-1])
            out.append(received_attention(qs, ks, nh, attn.scaling)[0])
        # one image may span several chunks (frames); per merged token: the mean over its group
        flat = torch.cat(out).view(-1, self.merge ** 2).mean(-1)
        window = getattr(self, "_window_index", None)
        if window is not None:  # Qwen2.5-VL runs its blocks on window-permuted merge units: undo it
            orig = torch.empty_like(flat)
            orig[window.to(flat.device)] = flat
            flat = orig
        return list(torch.split(flat, sizes))

    # -- the adapter interface -------------------------------------------------------------------------------
    def full_features(self, pixel_values, kw):
        feats, _ = self._run(pixel_values, self._grid(kw), None)
        return feats, None

    def select(self, pixel_values, policy, kw):
        grid = self._grid(kw)
        if policy.method == "flowcut":
            raise UnsupportedModelError(
                "flowcut relays information through the vision tower's [CLS] token, which Qwen2-VL's tower does not "
                "have; use fastervlm (mean received attention, VisPruner-style), fastv or randomprune on Qwen2-VL"
            )
        block = None
        if policy.method == "cls":
            sl = getattr(policy, "select_layer", None)
            nb = len(self.visual.blocks)
            full = list(getattr(self.visual, "fullatt_block_indexes", None) or [])
            default = full[-1] if full else nb - 1  # Qwen2.5-VL: the last block with full (not windowed) attention
            block = default if sl is None else (sl if sl >= 0 else nb + sl)
            if full and block not in full:
                raise UnsupportedModelError(
                    f"fastervlm select_layer {sl}: block {block} attends within windows; score with a full-attention "
                    f"block ({full})")
            if not 0 <= block < nb:
                raise UnsupportedModelError(f"fastervlm select_layer {sl} is outside the tower's {nb} blocks")
        feats, scores = self._run(pixel_values, grid, block)
        flags = []
        g = torch.Generator().manual_seed(int(getattr(policy, "seed", 0)))  # one stream over the images
        out = []
        for i, f in enumerate(feats):
            n = f.shape[0]
            k = policy.n_keep(n)
            if policy.method == "cls":
                idx = keep_topk(scores[i][None], k)[0]
            else:
                idx = policy.pick(n, k, 1, generator=g)[0].to(f.device)
            fl = torch.zeros(n, dtype=torch.bool, device=f.device)
            fl[idx] = True
            flags.append(fl)
            out.append(f[fl])
        return out, flags

    # -- positions ----------------------------------------------------------------------------------------
    def prompt_positions(self, kwargs, ids, mask):
        pos = kwargs.get("position_ids")
        if pos is not None:
            return pos
        tt = kwargs.get("mm_token_type_ids")
        if tt is None:
            tt = (ids == self.image_token_id).long()
        pos, deltas = self.inner.get_rope_index(ids, image_grid_thw=kwargs.get("image_grid_thw"), attention_mask=mask,
                                                mm_token_type_ids=tt)
        self.inner.rope_deltas = deltas
        return pos

    def gather_positions(self, pos, gidx, real):
        lead = pos.shape[:-2]
        b, n = gidx.shape
        idx = gidx.expand(*lead, b, n)
        return torch.gather(pos.expand(*lead, b, pos.shape[-1]), -1, idx).masked_fill(~real, 1)

    def after_prefill_rewrite(self, runtime, kwargs, ids, keep_cols, gidx, real) -> None:
        kwargs["mm_token_type_ids"] = None
        d = getattr(self.inner, "rope_deltas", None)
        if d is not None:
            mask = runtime._orig_mask if runtime._orig_mask is not None else torch.ones_like(ids)
            dropped = (mask.bool().sum(1) - real.sum(1)).to(d.device).view(-1, 1)
            self.inner.rope_deltas = d + dropped

    def decode_positions(self, state, ref, past: int):
        return None  # the model's own rope_deltas path (shifted above) continues the original positions
