"""The guide of a guided visual policy (``sgl``): the small VLM's recorded run, the checks of the pair, and the
``generate()`` wrapper that runs the guide first and lets confident rows exit (SGL's SEE).

Zhao et al., "A Stitch in Time Saves Nine: Small VLM is a Precise Guidance for Accelerating Large VLMs", CVPR 2025.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AccelError, InputError, UnsupportedModelError

GUIDE_ATTN = "accel_sgl_guide"
_registered = False
#: the recorder of a guide run: which query rows count and the attention each key column received
_REC: dict = {"acc": None, "rows": None, "prompt_len": 0}


def _ensure_registered() -> None:
    global _registered
    if not _registered:
        from ..patching.attention_fn import register_attention

        register_attention(GUIDE_ATTN, _guide_attention)
        _registered = True


def _guide_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The guide's attention: transformers' eager attention of the module's architecture, whose probabilities are
    added, for the rows the recorder counts (the prompt's text tokens in the prefill, every row's new token after),
    summed over heads, into the recorder's per-key-column total."""
    from ..attention.hf import hf_eager

    out, probs = hf_eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    acc = _REC["acc"]
    if acc is not None and probs is not None:
        q_len, kv = probs.shape[2], probs.shape[3]
        if q_len == _REC["prompt_len"]:
            rows = _REC["rows"].to(probs.device, probs.dtype)  # [B, T] the prompt's text rows
        else:
            rows = torch.ones(probs.shape[0], q_len, device=probs.device, dtype=probs.dtype)
        got = torch.einsum("bhqk,bq->bk", probs.float(), rows.float())
        n = min(kv, acc.shape[1])
        acc[:, :n] += got[:, :n]
    return out, probs


@dataclass
class GuideRun:
    """What the guide did on one prompt: the attention each prompt column received ``[B, T]``, its answer tokens
    ``[B, n]`` and each row's answer score (``exit_score`` of its tokens' probabilities) ``[B]``."""

    received: torch.Tensor
    sequences: torch.Tensor
    score: torch.Tensor


def run_guide(guide, input_ids, pixel_values, attention_mask, new_tokens: int, exit_score: str = "min",
              **generate_kwargs) -> GuideRun:
    """Greedy ``generate`` of ``new_tokens`` tokens on the guide with its attention recorded (see module doc)."""
    _ensure_registered()
    from .adapters import get_vision_adapter

    lm = get_vision_adapter(guide).language_model()
    cfg = lm.config
    B, T = input_ids.shape
    img = input_ids == guide.config.image_token_id
    rows = ~img
    if attention_mask is not None:
        rows &= attention_mask.bool()
    _REC.update(acc=torch.zeros(B, T + new_tokens, dtype=torch.float32, device=input_ids.device), rows=rows,
                prompt_len=T)
    saved = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = GUIDE_ATTN
    try:
        with torch.no_grad():
            out = guide.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                 max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, **generate_kwargs)
        received = _REC["acc"][:, :T].clone()
    finally:
        cfg._attn_implementation_internal = saved
        _REC.update(acc=None, rows=None, prompt_len=0)
    seq = out.sequences[:, T:]
    probs = torch.stack([torch.softmax(s.float(), -1).gather(1, seq[:, i:i + 1])[:, 0]
                         for i, s in enumerate(out.scores)], 1)  # [B, n] each answer token's probability
    eos = guide.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    live = torch.ones_like(probs, dtype=torch.bool)  # tokens after a row's end of sequence do not count
    if eos:
        ended = torch.isin(seq, torch.tensor(eos, device=seq.device))
        live[:, 1:] = ~(ended.cumsum(1) > 0)[:, :-1]
    if exit_score == "min":
        score = probs.masked_fill(~live, 1.0).amin(1)
    else:
        score = (probs * live).sum(1) / live.sum(1).clamp_min(1)
    return GuideRun(received=received, sequences=seq, score=score)


def check_pair(model, adapter, policy) -> None:
    """Refuse, in one line, a guide the large model cannot be guided by."""
    from ..patching.handle import PATCHED
    from .adapters import get_vision_adapter

    g = policy.guide
    if g is model:
        raise AccelError(f"{policy.name}: the guide is the large model itself; pass a smaller VLM of the same family")
    kinds = {type(adapter).__name__, type(get_vision_adapter(g)).__name__}
    if kinds != {"LlavaAdapter"}:
        raise UnsupportedModelError(f"{policy.name}: the guide and the large model must both be LLaVA models "
                                    f"(LlavaForConditionalGeneration); got {type(g).__name__} guiding "
                                    f"{type(model).__name__}")
    if PATCHED.get(g) is not None:
        raise AccelError(f"{policy.name}: the guide model is patched by accel; remove its patch (the guide runs "
                         "unpatched)")
    gi, mi = getattr(g.config, "image_token_id", None), getattr(model.config, "image_token_id", None)
    if gi is None or gi != mi:
        raise AccelError(f"{policy.name}: the guide's image token id ({gi}) differs from the large model's ({mi}); the "
                         "two must share a tokenizer and image processor")


def check_tokens(adapter, policy, pixel_values, kw) -> None:
    """The guide must give each image the large model's number of visual tokens."""
    from .adapters import get_vision_adapter

    n_large = adapter.tokens_per_image(pixel_values, kw)
    n_guide = get_vision_adapter(policy.guide).tokens_per_image(pixel_values, kw)
    if n_large != n_guide:
        raise InputError(f"{policy.name}: the guide makes {n_guide} visual tokens per image and the large model "
                         f"{n_large}; the two must share an image processor and patch grid")


class GuidedGenerate:
    """``generate()`` of a model patched with ``sgl``: the guide answers first (its attention ranks the visual tokens
    of the large model's prefill, which follows) and, with ``exit_threshold``, the rows whose guide answer scores at
    least the threshold take that answer while the large model generates for the others only (SEE). Installed as an
    instance attribute ``generate`` and deleted by ``remove()``, as accel's generate guard is."""

    def __init__(self, model, runtime, policy):
        import inspect
        import weakref

        self._model_ref = weakref.ref(model)
        self._had = "generate" in model.__dict__
        self._previous = model.__dict__.get("generate")
        self.runtime, self.policy = runtime, policy

        def generate(*args, **kwargs):
            return self._run(args, kwargs)

        bound = model.generate
        generate.__signature__ = inspect.signature(bound)
        generate.__doc__, generate.__name__ = bound.__doc__, "generate"
        self.fn = generate
        model.generate = generate

    def remove(self) -> None:
        m = self._model_ref()
        if m is not None and m.__dict__.get("generate") is self.fn:
            if self._had:
                m.generate = self._previous
            else:
                del m.__dict__["generate"]

    def _run(self, args, kwargs):
        m = self._model_ref()
        orig = self._previous if self._had else type(m).generate.__get__(m)
        pol = self.policy
        kwargs = dict(kwargs)
        if args:
            if "input_ids" in kwargs or len(args) > 1:
                return orig(*args, **kwargs)  # the guard behind refuses what generate itself would
            kwargs["input_ids"] = args[0]
        ids, pv = kwargs.get("input_ids"), kwargs.get("pixel_values")
        self.runtime.last_exit = None
        if ids is None or pv is None:  # nothing to guide: a text-only prompt
            return orig(**kwargs)
        gc = kwargs.get("generation_config") or m.generation_config
        n = kwargs.get("max_new_tokens", gc.max_new_tokens)
        if n is None:
            raise InputError("sgl: generate() needs max_new_tokens (the guide answers first, with as many tokens)")
        exiting = pol.exit_threshold is not None
        if exiting:
            bad = [k for k in ("num_beams", "num_return_sequences") if (kwargs.get(k) or getattr(gc, k, None) or 1) != 1]
            bad += [k for k in ("do_sample", "return_dict_in_generate", "output_scores", "streamer", "assistant_model")
                    if kwargs.get(k, getattr(gc, k, None))]
            if bad:
                raise InputError(f"sgl: exit_threshold serves greedy generate() returning token ids, not {bad}; set "
                                 "exit_threshold=None to guide the pruning only")
            if pol.guide_tokens is not None and pol.guide_tokens < n:
                raise InputError(f"sgl: with exit_threshold the guide's answer is returned, so it must be "
                                 f"max_new_tokens={n} tokens long; leave guide_tokens unset (it is {pol.guide_tokens})")
            per_row = (ids == m.config.image_token_id).sum(1)
            if pv.shape[0] != ids.shape[0] or bool((per_row == 0).any()):
                raise InputError("sgl: exit_threshold needs exactly one image per prompt (rows exit one by one)")
        check_tokens(self.runtime.adapter, pol, pv, {})
        mask = kwargs.get("attention_mask")
        run = run_guide(pol.guide, ids, pv, mask, pol.guide_tokens or n, pol.exit_score)
        out = (run.score >= float(pol.exit_threshold)) if exiting else torch.zeros_like(run.score, dtype=torch.bool)
        self.runtime.last_exit = {"exited": out.tolist(), "score": run.score.tolist()}
        if not bool(out.any()):
            self.runtime.guide_stash = (ids, mask, run)
            return orig(**kwargs)
        stay = ~out
        pad = gc.pad_token_id if gc.pad_token_id is not None else (
            gc.eos_token_id if isinstance(gc.eos_token_id, int) else (gc.eos_token_id or [0])[0])
        parts = {}
        if bool(stay.any()):
            sub = dict(kwargs, input_ids=ids[stay], pixel_values=pv[stay])
            if mask is not None:
                sub["attention_mask"] = mask[stay]
            self.runtime.guide_stash = (ids[stay], mask[stay] if mask is not None else None,
                                        GuideRun(run.received[stay], run.sequences[stay], run.score[stay]))
            parts["large"] = orig(**sub)
        guide_seq = torch.cat([ids[out], run.sequences[out][:, :n].to(ids.device)], 1)
        width = max(guide_seq.shape[1], parts["large"].shape[1] if "large" in parts else 0)
        res = torch.full((ids.shape[0], width), int(pad), dtype=ids.dtype, device=ids.device)
        res[out.to(ids.device), :guide_seq.shape[1]] = guide_seq
        if "large" in parts:
            res[stay.to(ids.device), :parts["large"].shape[1]] = parts["large"].to(ids.device)
        return res
