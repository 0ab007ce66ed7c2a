"""The visual pruner on a model: one forward pre-hook on the VLM's inner model.

Prefill (a call with ``pixel_values``): the adapter scores the image tokens and returns the kept
features; the hook drops the pruned placeholder positions from the sequence and hands the language
model ``inputs_embeds`` of the kept tokens, the matching attention mask, and the kept tokens'
*original* position ids (kept tokens keep their order and positions; text after the image keeps its
positions too). Decode calls on the same cache: the hook drops the same columns from the (longer)
attention mask that ``generate`` keeps for the unpruned prompt and, when no position ids are given,
continues from the original positions. ``model.generate`` therefore works unchanged.
"""
from __future__ import annotations

import logging
import weakref

import torch

from ..errors import AccelError, InputError, UnsupportedModelError
from .. import compat
from ..patching.handle import PATCHED, GenerateGuard, HandleBase, check_generate_request, refuse_if_patched

logger = logging.getLogger("accel")

PROBE_NAME = "accel_probe"
_probe_registered = False


class _ProbeDone(Exception):
    """Carries the probed layer's attention inputs out of the forward (the rest is not run)."""

    def __init__(self, query, key, value, attention_mask, scaling):
        self.query, self.key, self.value = query, key, value
        self.attention_mask, self.scaling = attention_mask, scaling

    def probs(self) -> torch.Tensor:
        """Softmax attention of every query row of the probed layer, head mean: ``[B, T, S]``."""
        return _attention_probs(self)


def _ensure_probe_registered() -> None:
    """Register the probing attention (``fastv``, FlowCut's LLM stage) on first use."""
    global _probe_registered
    if not _probe_registered:
        from ..patching.attention_fn import register_attention

        register_attention(PROBE_NAME, _probe_attention)
        _probe_registered = True


_PROBE = {"layer": None}  # the decoder layer whose attention inputs the probe hands back


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA for the layers before the probed one; at the probed layer, its query / key / value (rotary
    applied, as the layer uses them) are handed back by raising ``_ProbeDone``."""
    from ..attention.hf import hf_sdpa

    if getattr(module, "layer_idx", None) != _PROBE["layer"]:
        return hf_sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    d = query.shape[-1]
    raise _ProbeDone(query, key, value, attention_mask, d ** -0.5 if scaling is None else scaling)


def _run_probe(lm, layer: int, embeds, mask, pos) -> _ProbeDone:
    """Run the language model's layers ``0..layer`` over a prompt and return decoder layer ``layer``'s
    attention inputs (``query [B, H, T, d]``, ``key`` / ``value [B, KV, T, d]``, its mask and scaling)."""
    cfg = lm.config
    _ensure_probe_registered()
    _PROBE["layer"] = layer
    saved = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = PROBE_NAME
    try:
        with torch.no_grad():
            lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
    except _ProbeDone as done:
        return done
    finally:
        cfg._attn_implementation_internal = saved
        _PROBE["layer"] = None
    raise UnsupportedModelError(  # pragma: no cover - the probed layer always runs
        "visual pruning: the language model's attention layers do not report layer_idx")


def _attention_probs(p: _ProbeDone) -> torch.Tensor:
    """Softmax attention of every query row of the probed layer, head mean: ``[B, T, S]``."""
    q = p.query
    t = q.shape[2]
    k = _repeat_kv(p.key, q.shape[1])
    scores = (q.float() @ k.float().transpose(-1, -2)) * p.scaling
    if p.attention_mask is not None:
        m = p.attention_mask[:, :, :, : k.shape[2]]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    else:
        causal = torch.ones(t, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - t)
        scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(dim=1)


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


class VisualRuntime:
    def __init__(self, model, adapter, policy):
        self.model_ref = weakref.ref(model)
        self.adapter = adapter
        self.policy = policy
        self.state: dict | None = None
        #: features encoded by ``image_features`` for the prefill that follows (generate's path)
        self.pending: dict | None = None
        self._orig_mask = None
        #: what the last prefill did (tokens per image, kept per image, prompt tokens before / after)
        self.last: dict = {}
        #: a guide run made by ``generate`` for the prefill that follows (``sgl``): (input_ids, mask, run)
        self.guide_stash = None
        #: the guide run the last prefill used (``sgl``)
        self.last_guide = None
        #: which rows of the last ``generate()`` took the guide's answer (``sgl``), and every row's answer score
        self.last_exit = None
        #: the 2-D attention mask of the call under way (layer-wise pruning builds its layers' masks from it)
        self._call_mask = None
        self._call_past = 0
        self._phase = None
        #: the pruned layers' position embeddings and mask for the call under way (built by the first of them)
        self._layer_args = None

    # -- image features (what generate pre-encodes) -----------------------------------------------------
    def image_features(self, pixel_values, *args, **kw):
        """Stands in for the VLM's ``get_image_features`` while patched. transformers' ``generate``
        encodes the images before the first forward and hands the features over as
        ``mm_encoder_outputs``, so the encoder-side pruning has to happen here (there is no public hook
        between the tower and the projector). Returns the kept features (all of them for ``fastv``, which
        scores in the LLM) and records which tokens were kept for the prefill that follows."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        for name, val in zip(self.adapter.feature_arg_names, args):
            kw.setdefault(name, val)
        enc = self._encode(pixel_values, kw)
        self.pending = enc
        return BaseModelOutputWithPooling(pooler_output=list(enc["feats"]))

    def _encode(self, pv, kw) -> dict:
        """``{"feats": [k_i, D] per image, "flags": bool [N_i] per image (None = not pruned yet),
        "fixed": bool [N_i] tokens always kept (or None), "trace": ...}``."""
        self.adapter.trace = {}
        self.adapter.llm_stage = None
        return self.policy.encode(self, pv, kw)

    def probe(self, layer: int, embeds, mask, pos) -> _ProbeDone:
        """Decoder layer ``layer``'s attention inputs over a prompt (for policies that score in the LM)."""
        return _run_probe(self.adapter.language_model(), layer, embeds, mask, pos)

    def run_guide(self, ids, pixel_values, mask, new_tokens: int):
        """The policy's guide answering this prompt with its attention recorded (``accel.vlm.guide.run_guide``)."""
        from .guide import run_guide

        return run_guide(self.policy.guide, ids, pixel_values, mask, new_tokens, self.policy.exit_score)

    def check_guide_tokens(self, pixel_values, kw) -> None:
        from .guide import check_tokens

        check_tokens(self.adapter, self.policy, pixel_values, kw)

    def take_guide_run(self, ids, mask, pixel_values):
        """The guide run ``generate`` made for exactly this prompt and these images (``sgl``), rows repeated as
        generate expands them for beams or several return sequences; None if there is none."""
        st, self.guide_stash = self.guide_stash, None  # one prefill takes it
        if st is None:
            return None
        sids, smask, spv, run = st
        if ids.shape[1] != sids.shape[1] or ids.shape[0] % sids.shape[0]:
            return None
        r = ids.shape[0] // sids.shape[0]
        if r > 1:
            sids, spv, run = sids.repeat_interleave(r, 0), spv.repeat_interleave(r, 0), run.repeat(r)
            smask = smask.repeat_interleave(r, 0) if smask is not None else None
        same = torch.equal(sids.to(ids.device), ids) and spv.shape == pixel_values.shape and torch.equal(
            spv.to(pixel_values.device), pixel_values)
        m1 = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        m2 = smask.to(ids.device).bool() if smask is not None else torch.ones_like(ids, dtype=torch.bool)
        return run if same and torch.equal(m1, m2) else None

    # -- the hook --------------------------------------------------------------------------------------
    def pre_forward(self, module, args, kwargs):
        self._phase = None  # the layer hooks act only on a prefill or decode step this hook set up
        self._layer_args = None
        if args:  # transformers' VLMs call their inner model with keywords; be safe anyway
            names = ["input_ids", "pixel_values", "attention_mask", "position_ids",
                     compat.cache_arg_name(type(module).forward), "inputs_embeds"]
            for n, a in zip(names, args):
                kwargs.setdefault(n, a)
            args = ()
        pv = kwargs.get("pixel_values")
        if kwargs.get("pixel_values_videos") is not None:
            raise InputError(f"{self.policy.name}: visual-token pruning covers images, not videos; remove the patch "
                             "for video prompts")
        mm = kwargs.get("mm_encoder_outputs") or {}
        pre = mm.get("image") if isinstance(mm, dict) else None
        pkv = compat.peek_cache(kwargs)
        past = pkv.get_seq_length() if pkv is not None else 0
        if pv is not None or pre is not None:
            if kwargs.get("input_ids") is None:
                raise InputError(
                    f"{self.policy.name}: visual-token pruning needs input_ids (with the image placeholder tokens), "
                    "not inputs_embeds, on the call that carries the images"
                )
            if past > 0:
                raise InputError(
                    f"{self.policy.name}: images after a cached prefix are not supported by visual-token pruning; "
                    "pass the whole prompt with its images in one call (generate does)"
                )
            if pv is not None:
                kw = {k: kwargs.get(k) for k in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes",
                                                 *self.adapter.extra_image_kwargs)}
                enc = self._encode(pv, kw)
            else:
                enc = self.pending
                if enc is None:
                    raise InputError(
                        f"{self.policy.name}: pre-computed image features (mm_encoder_outputs) cannot be pruned; pass "
                        "pixel_values so accel scores the image tokens in the vision tower"
                    )
                self.pending = None
                got = len(pre.pooler_output)
                if got % len(enc["feats"]):
                    raise InputError(f"{self.policy.name}: the image features changed between encoding and prefill")
                reps = got // len(enc["feats"])
                if reps > 1:  # generate expanded the batch (num_return_sequences / beams)
                    enc = {k: ([x for x in v for _ in range(reps)] if isinstance(v, list) else v) for k, v in enc.items()}
            kwargs["mm_encoder_outputs"] = None
            kwargs = self._prefill(module, kwargs, enc)
            for k in ("image_sizes", *self.adapter.extra_image_kwargs):
                kwargs.pop(k, None)
            return args, kwargs
        st = self.state
        if st is not None and pkv is not None and past > 0 and st["cache"]() is pkv:
            kwargs = self._decode(kwargs, past)
            self._call_mask = kwargs.get("attention_mask")
            self._call_past, self._phase = past, "decode"
            return args, kwargs
        if past == 0:
            self.state = None
        return args, kwargs

    # -- prefill ---------------------------------------------------------------------------------------
    def _prefill(self, module, kwargs, enc) -> dict:
        ids = kwargs["input_ids"]
        b, length = ids.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise InputError(f"{self.policy.name}: visual-token pruning needs a 2-D attention_mask [batch, tokens], got {mask.dim()}-D")
        img = ids == self.adapter.image_token_id
        feats = list(enc["feats"])
        sizes = [int(f.shape[0]) for f in feats] if enc["flags"] is None else [int(f.numel()) for f in enc["flags"]]
        if int(img.sum()) != sum(sizes):
            raise InputError(
                f"{self.policy.name}: the prompt has {int(img.sum())} image placeholder tokens but the {len(sizes)} "
                f"image(s) give {sum(sizes)} tokens; build the prompt with the model's processor"
            )
        self._orig_mask = mask
        pos = self.adapter.prompt_positions(kwargs, ids, mask)
        if pos.dim() != 2 and not self.adapter.multi_axis_positions:
            raise InputError(f"{self.policy.name}: position_ids must be [batch, tokens] for this model, got {tuple(pos.shape)}")
        full_feats = list(feats)
        # the policy's language-model stage (FastV scores there; FlowCut's second stage on anyres models)
        flags, feats = self.policy.language_model_stage(self, module, ids, img, feats, enc["flags"], enc, mask, pos)
        c = self.compact(module, ids, img, feats, flags, mask, pos)
        layer = int(getattr(self.policy, "prune_layer", 0) or 0)
        lw = None
        if layer > 0 and not all(bool(fl.all()) for fl in flags):
            # the first `layer` decoder layers see every token; the layers from `layer` on the kept ones (with every
            # token kept, the plain path below is the same forward, without the hooks' explicit masks)
            red = c
            c = self.compact(module, ids, img, full_feats, [torch.ones_like(f) for f in flags], mask, pos)
            # the full layout's column of every original column (padding goes to an extra column, then dropped)
            inv = torch.zeros(b, length + 1, dtype=torch.long, device=ids.device)
            cols = torch.arange(c["src"].shape[1], device=ids.device).expand_as(c["src"])
            inv.scatter_(1, torch.where(c["real"], c["src"], torch.full_like(c["src"], length)), cols)
            inv = inv[:, :length]
            rows = torch.where(red["real"], inv.gather(1, red["src"].clamp_min(0)), torch.zeros_like(red["src"]))
            lm_cfg = self.adapter.language_model().config
            lw = {"layer": layer, "rows": rows, "mask": red["mask"], "full_len": c["src"].shape[1],
                  "red_len": red["src"].shape[1], "additive": lm_cfg._attn_implementation == "eager"}
        keep_cols, src, real, gidx = c["keep_cols"], c["src"], c["real"], c["gidx"]
        new_len = src.shape[1]
        embeds, new_mask, new_pos = c["embeds"], c["mask"], c["pos"]
        pkv = compat.take_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.adapter.language_model().config, "use_cache", True)
        if pkv is None and use_cache and not module.training:
            from transformers import DynamicCache

            pkv = DynamicCache(config=self.adapter.language_model().config)
        kwargs.update(input_ids=None, pixel_values=None, inputs_embeds=embeds, attention_mask=new_mask,
                      position_ids=new_pos)
        kwargs[compat.cache_arg_name(type(module).forward)] = pkv
        self.adapter.after_prefill_rewrite(self, kwargs, ids, keep_cols, gidx, real)
        self.state = {"cache": weakref.ref(pkv) if pkv is not None else (lambda: None), "src": src,
                      "prompt_len": length, "dropped": length - new_len, "next_pos": self.adapter.next_positions(kwargs),
                      "layerwise": lw}
        self._call_mask, self._phase = None, "prefill"
        if lw is not None:
            new_len = lw["red_len"]
        kept = [int(f.sum()) for f in flags]
        idx = [torch.nonzero(f).flatten().cpu() for f in flags]
        self.last = {"tokens_per_image": sizes[0] if len(set(sizes)) == 1 else sizes,
                     "kept_per_image": kept[0] if len(set(kept)) == 1 else kept, "images": len(sizes),
                     "prompt_tokens": length, "lm_prompt_tokens": new_len,
                     "kept_indices": torch.stack(idx) if len(set(kept)) == 1 else idx, **enc["trace"]}
        logger.info("%s: kept %s of %s visual tokens per image; LM prompt %d -> %d tokens",
                    self.policy.name, self.last["kept_per_image"], self.last["tokens_per_image"], length, new_len)
        return kwargs

    def layer_hook(self, index: int, module, args, kwargs):
        """Forward pre-hook of the decoder layers from the policy's ``prune_layer`` on (layer-wise pruning, ``sgl``):
        the first such layer drops the pruned rows of the prefill's hidden states; every such layer gets the kept
        rows' position embeddings and a mask over its own (shorter) cache. The layers before it run unchanged."""
        st = self.state
        lw = st.get("layerwise") if st is not None else None
        if lw is None or self._phase is None:
            return None
        hs = args[0] if args else kwargs["hidden_states"]
        B, q = hs.shape[0], hs.shape[1]
        prefill = self._phase == "prefill"
        if prefill:
            if index == lw["layer"]:
                rows = lw["rows"].to(hs.device)
                if q != lw["full_len"]:
                    raise InputError(f"{self.policy.name}: the prefill reached layer {index} with {q} rows, expected "
                                     f"{lw['full_len']}")
                hs = hs.gather(1, rows[..., None].expand(B, rows.shape[1], hs.shape[-1]))
                if args:
                    args = (hs,) + tuple(args[1:])
                else:
                    kwargs["hidden_states"] = hs
        if self._layer_args is None:  # the same for every pruned layer of this call: built once
            self._layer_args = self._pruned_layer_args(lw, kwargs, hs.dtype, hs.device, B, q, prefill)
        kwargs.update(self._layer_args)
        return args, kwargs

    def _pruned_layer_args(self, lw, kwargs, dtype, device, B: int, q: int, prefill: bool) -> dict:
        """The kept rows' position embeddings and ids (prefill) and the mask over a pruned layer's cache."""
        out = {}
        rows = lw["rows"].to(device)
        if prefill:
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                out["position_embeddings"] = tuple(
                    t.expand(B, *t.shape[1:]).gather(1, rows[..., None].expand(B, rows.shape[1], t.shape[-1]))
                    for t in pe)
            p = kwargs.get("position_ids")
            if p is not None and p.dim() == 2:
                out["position_ids"] = p.expand(B, p.shape[1]).gather(1, rows)
            keymask = lw["mask"].to(device).bool()
            n = keymask.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            allowed = (keymask[:, None, :] & causal) | torch.eye(n, dtype=torch.bool, device=device)
        else:
            m2 = self._call_mask
            extra_n = self._call_past + q - lw["full_len"]
            extra = (m2[:, lw["full_len"]:].to(device).bool() if m2 is not None
                     else torch.ones(B, extra_n, dtype=torch.bool, device=device))
            if extra.shape[1] != extra_n:
                raise InputError(f"{self.policy.name}: the attention mask covers {m2.shape[1]} tokens, the cache and "
                                 f"this call {self._call_past + q}")
            keymask = torch.cat([lw["mask"].to(device).bool(), extra], 1)
            kv = keymask.shape[1]
            qpos = torch.arange(q, device=device).view(q, 1) + (kv - q)
            causal = torch.arange(kv, device=device).view(1, kv) <= qpos
            allowed = keymask[:, None, :] & causal
        allowed = allowed[:, None]  # [B, 1, q, kv]
        if lw.get("additive"):
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        out["attention_mask"] = allowed
        return out

    def compact(self, module, ids, img, feats, flags, mask, pos) -> dict:
        """The prompt with only the kept image tokens: ``inputs_embeds``, mask and original positions,
        rows re-left-padded to the longest; ``src`` maps every new column to its old one (-1 = pad)."""
        b, length = ids.shape
        dev = ids.device
        keep_cols = torch.ones_like(img)
        keep_cols[img] = torch.cat([f.to(dev) for f in flags])  # placeholders in row-major order = images in order
        if mask is not None:  # padding columns carry nothing: re-pad from scratch below
            keep_cols &= mask.bool()
        new_len = int(keep_cols.sum(1).max())
        # source column of every new position (-1 = left padding for rows that became shorter)
        src = torch.full((b, new_len), -1, dtype=torch.long, device=dev)
        for r in range(b):
            cols = torch.nonzero(keep_cols[r]).flatten()
            src[r, new_len - cols.numel():] = cols
        real = src >= 0
        gidx = src.clamp_min(0)
        embed = module.get_input_embeddings()(ids)
        embeds = torch.gather(embed, 1, gidx[..., None].expand(-1, -1, embed.shape[-1])) * real[..., None]
        img_new = real & torch.gather(img, 1, gidx)
        embeds = embeds.masked_scatter(img_new[..., None], torch.cat(feats, 0).to(embeds.dtype))
        base_mask = mask if mask is not None else torch.ones(b, length, dtype=torch.long, device=dev)
        new_mask = torch.gather(base_mask, 1, gidx) * real
        new_pos = self.adapter.gather_positions(pos, gidx, real) if self.adapter.multi_axis_positions else \
            torch.gather(pos.expand(b, length), 1, gidx).masked_fill(~real, 1)
        return {"keep_cols": keep_cols, "src": src, "real": real, "gidx": gidx, "img": img_new,
                "embeds": embeds, "mask": new_mask, "pos": new_pos}

    # -- decode ----------------------------------------------------------------------------------------
    def _decode(self, kwargs, past: int) -> dict:
        st = self.state
        mask = kwargs.get("attention_mask")
        length = st["prompt_len"]
        src = st["src"]
        if isinstance(mask, torch.Tensor):
            if mask.dim() != 2 or mask.shape[0] != src.shape[0] or mask.shape[1] < length:
                raise InputError(
                    f"{self.policy.name}: decode-step attention_mask of shape {tuple(mask.shape)} does not extend the "
                    f"pruned prompt ({src.shape[0]} rows, {length} tokens)"
                )
            head = torch.gather(mask[:, :length], 1, src.clamp_min(0)) * (src >= 0)
            kwargs["attention_mask"] = torch.cat([head, mask[:, length:]], dim=1)
        if kwargs.get("position_ids") is None:
            ref = kwargs.get("input_ids")
            if ref is None:
                ref = kwargs.get("inputs_embeds")
            pos = self.adapter.decode_positions(st, ref, past)
            if pos is not None:
                kwargs["position_ids"] = pos
        return kwargs

class VisualPatchHandle(HandleBase):
    """Returned by ``accel.patch`` for a visual policy (optionally composed with an LM policy);
    ``remove()`` removes the pruner and the LM patch, leaving the model exactly as it was."""

    def __init__(self, model, runtime: VisualRuntime, hooks, lm_handle=None):
        self._model_ref = weakref.ref(model)
        self.runtime = runtime
        self._hooks = list(hooks)
        self.lm_handle = lm_handle
        self.active = True

    @property
    def policy(self):
        return self.runtime.policy

    @property
    def plan(self):
        return self.lm_handle.plan if self.lm_handle is not None else None

    @property
    def cache(self):
        return self.lm_handle.cache if self.lm_handle is not None else None

    @property
    def last(self) -> dict:
        """What the last prefill kept (tokens per image, kept per image, LM prompt length)."""
        return dict(self.runtime.last)

    @property
    def last_exit(self) -> dict | None:
        """``sgl``: which rows of the last ``generate()`` took the guide's answer (``exited``) and each row's answer
        score (``score``); None before any."""
        return self.runtime.last_exit

    def summary(self) -> str:
        s = f"accel visual policy={self.policy.name} ({type(self.runtime.adapter).__name__})"
        return s + ("; " + self.lm_handle.summary() if self.lm_handle is not None else "")

    def remove(self) -> None:
        if not self.active:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        model = self._model_ref()
        if self.lm_handle is not None:
            self.lm_handle.remove()
        if model is not None and PATCHED.get(model) is self:
            PATCHED.pop(model, None)
        self.runtime.state = None
        self.active = False


def split_visual(policy, overrides: dict):
    """Split a policy spec into its visual part and its LM part.

    Returns ``(visual_policy or None, lm_spec or None, lm_overrides)``; ``None`` visual means the spec has
    no visual policy (the caller patches the LM as usual). Unprefixed overrides go to the first policy
    named (as in ``make_policy``); ``name.knob`` targets one policy.
    """
    from ..policies.registry import get_policy_class, split_spec
    from ..policies.visual import VisualPolicy

    if isinstance(policy, VisualPolicy):
        return policy, None, dict(overrides)
    if isinstance(policy, str):
        parts = [p.strip() for p in policy.split("+") if p.strip()]
    elif isinstance(policy, (list, tuple)) and all(isinstance(p, str) for p in policy):
        parts = list(policy)
    else:
        return None, policy, overrides
    specs = [split_spec(p) for p in parts]
    try:
        kinds = [getattr(get_policy_class(n), "kind", "") for n, _ in specs]
    except AccelError:
        return None, policy, overrides  # make_policy reports unknown names
    vis = [i for i, k in enumerate(kinds) if k == "visual"]
    if not vis:
        return None, policy, overrides
    if len(vis) > 1:
        raise AccelError(f"at most one visual-token policy per model, got {[specs[i][0] for i in vis]}")
    vname, vopts = specs[vis[0]]
    vo, lo = {}, {}
    for key, val in overrides.items():
        if "." in key:
            pname, knob = key.split(".", 1)
            if pname == vname:
                vo[knob] = val
            else:
                lo[key] = val
        elif vis[0] == 0:
            vo[key] = val
        else:
            lo[key] = val
    vo.update(vopts)
    vpol = get_policy_class(vname).from_overrides(**vo)
    rest = [p for i, p in enumerate(parts) if i != vis[0]]
    return vpol, ("+".join(rest) if rest else None), lo


def patch_vlm(model, vpol, lm_spec, plan=None, lm_overrides=None, **patch_kwargs) -> VisualPatchHandle:
    """Install ``vpol`` on a VLM and, if given, the LM-side policy ``lm_spec`` on its language model."""
    from .adapters import get_vision_adapter

    compat.check_transformers_version()
    refuse_if_patched(model)
    adapter = get_vision_adapter(model)
    lm_handle = None
    if lm_spec is not None:
        from ..patching.lm import patch_lm

        lm_handle = patch_lm(model, (lm_spec, dict(lm_overrides or {})), plan=plan, **patch_kwargs)
    elif plan is not None:
        raise AccelError(f"plan= is for an LM-side policy; {vpol.name} alone takes none (compose, e.g. '{vpol.name}+hylra')")
    layer = int(getattr(vpol, "prune_layer", 0) or 0)
    try:
        if getattr(vpol, "guided", False):
            from .guide import check_pair

            check_pair(model, adapter, vpol)
        if layer > 0:
            lm = adapter.language_model()
            layers = getattr(lm, "layers", None)
            if lm_spec is not None:
                raise AccelError(f"{vpol.name}: pruning from decoder layer {layer} does not compose with a language-model "
                                 f"policy ({lm_spec}); use layer=0 to compose")
            if layers is None:
                raise UnsupportedModelError(f"{vpol.name}: this language model has no decoder layer list to prune from "
                                            f"layer {layer}; use layer=0")
            if layer >= len(layers):
                raise AccelError(f"{vpol.name}: layer {layer} is past the language model's {len(layers)} layers")
            types = set(getattr(lm.config, "layer_types", None) or [])
            if getattr(lm.config, "sliding_window", None) is not None or types - {"full_attention"}:
                raise UnsupportedModelError(
                    f"{vpol.name}: pruning from layer {layer} builds full causal masks, and this language model has "
                    "sliding-window layers; use layer=0")
            if lm.config._attn_implementation not in ("sdpa", "eager"):
                raise UnsupportedModelError(
                    f"{vpol.name}: pruning from layer {layer} needs the language model's attention to be 'sdpa' or "
                    f"'eager', not {lm.config._attn_implementation!r}; set it with model.set_attn_implementation('sdpa')")
        runtime = VisualRuntime(model, adapter, vpol)
        hooks = [adapter.hook_module().register_forward_pre_hook(runtime.pre_forward, with_kwargs=True),
                 model.register_forward_pre_hook(_refuse_labels(vpol.name), with_kwargs=True),
                 _InstanceOverride(adapter.hook_module(), "get_image_features", _with_signature_of(
                     adapter.hook_module().get_image_features, runtime.image_features))]
        if True:  # visual pruning is never dense, whatever the composed LM policy: its own guard, outermost
            limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
            def check(m, a, k):
                check_generate_request(m, a, k, policy_name=vpol.name, dense=False,
                                       context_limit=limit if patch_kwargs.get("check_context", True) else None)

            hooks.append(GenerateGuard(model, check))
        if layer > 0:
            import functools

            hooks += [layers[i].register_forward_pre_hook(functools.partial(runtime.layer_hook, i), with_kwargs=True)
                      for i in range(layer, len(layers))]
        if getattr(vpol, "guided", False):  # outermost, so removed first
            from .guide import GuidedGenerate

            hooks.insert(0, GuidedGenerate(model, runtime, vpol, check))
    except BaseException:
        if lm_handle is not None:
            lm_handle.remove()
        raise
    handle = VisualPatchHandle(model, runtime, hooks, lm_handle)
    PATCHED[model] = handle
    logger.info("%s", handle.summary())
    return handle


def _with_signature_of(original, fn):
    """``fn`` presenting ``original``'s signature: ``generate`` picks the arguments it passes to
    ``get_image_features`` by inspecting it."""
    import inspect

    def override(*args, **kwargs):
        return fn(*args, **kwargs)

    override.__signature__ = inspect.signature(original)
    override.__doc__ = fn.__doc__
    return override


class _InstanceOverride:
    """Shadows a method on one module instance (not its class) and restores it on ``remove()``. Used
    only for ``get_image_features``, which ``generate`` calls before any forward hook can run."""

    _MISSING = object()

    def __init__(self, obj, name, fn):
        self.obj, self.name = obj, name
        self.saved = obj.__dict__.get(name, self._MISSING)
        object.__setattr__(obj, name, fn)

    def remove(self):
        if self.saved is self._MISSING:
            self.obj.__dict__.pop(self.name, None)
        else:
            object.__setattr__(self.obj, self.name, self.saved)


def _refuse_labels(name):
    def hook(module, args, kwargs):
        if kwargs.get("labels") is not None and kwargs.get("pixel_values") is not None:
            raise InputError(
                f"{name}: labels cannot be scored on a pruned prompt (the LM sees fewer tokens than the labels "
                "cover); remove the patch for training or loss computation"
            )
        return args, kwargs

    return hook


def claim(policy, overrides: dict):
    """The VLM patcher's part of ``accel.patch``: ``(visual policy, LM spec, LM overrides)`` when the spec holds a
    visual-token policy, else None."""
    vpol, lm_spec, lm_overrides = split_visual(policy, overrides)
    return None if vpol is None else (vpol, lm_spec, lm_overrides)


def patch_claimed(model, request, *, plan=None, **patch_kwargs):
    vpol, lm_spec, lm_overrides = request
    return patch_vlm(model, vpol, lm_spec, plan=plan, lm_overrides=lm_overrides, **patch_kwargs)
