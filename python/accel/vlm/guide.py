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
#: the recorder of a guide run: the prompt's counted rows, the attention the prompt rows paid each key column, and
#: one [B, kv] total per decode step (which rows count there is known only after generate: see ``run_guide``)
_REC: dict = {"acc": None, "rows": None, "prompt_len": 0, "steps": None}

#: generation settings that change a greedy answer; the guide's and the caller's must leave them at their defaults
_ANSWER_CHANGING = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
                    "suppress_tokens", "begin_suppress_tokens", "min_new_tokens", "min_length", "forced_bos_token_id",
                    "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty", "renormalize_logits",
                    "guidance_scale", "watermarking_config", "stop_strings", "low_memory", "penalty_alpha",
                    "epsilon_cutoff", "eta_cutoff", "max_time")


def _ensure_registered() -> None:
    global _registered
    if not _registered:
        from ..patching.attention_fn import register_attention

        register_attention(GUIDE_ATTN, _guide_attention)
        _registered = True


def _guide_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The guide's attention: transformers' eager attention of the module's architecture, whose probabilities are
    recorded, summed over heads: in the prefill over the prompt's text rows, in each decode step per row (one total
    per layer and step, kept apart until ``run_guide`` knows which rows had ended)."""
    from ..attention.hf import hf_eager

    out, probs = hf_eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    acc = _REC["acc"]
    if acc is not None and probs is not None:
        q_len, kv = probs.shape[2], probs.shape[3]
        n = min(kv, acc.shape[1])
        if q_len == _REC["prompt_len"]:
            rows = _REC["rows"].to(probs.device, torch.float32)  # [B, T] the prompt's text rows
            acc[:, :n] += torch.einsum("bhqk,bq->bk", probs.float(), rows)[:, :n]
        else:
            step = torch.zeros_like(acc)
            step[:, :n] = probs.float().sum((1, 2))[:, :n]
            _REC["steps"].append((kv, step))
    return out, probs


@dataclass
class GuideRun:
    """What the guide did on one prompt: the attention each prompt column received ``[B, T]``, its answer tokens
    ``[B, n]`` and each row's answer score (``exit_score`` of its tokens' probabilities) ``[B]``."""

    received: torch.Tensor
    sequences: torch.Tensor
    score: torch.Tensor

    def repeat(self, r: int) -> "GuideRun":
        """Each row ``r`` times in a row (generate's expansion for beams / several return sequences)."""
        return GuideRun(*(t.repeat_interleave(r, 0) for t in (self.received, self.sequences, self.score)))


def answer_changing_settings(gc, kwargs: dict | None = None) -> list[str]:
    """The settings of generation config ``gc`` (and of ``generate`` keywords) that would change a plain greedy
    answer: a guide answering under them, or an exited row returned without them, would not be what was asked."""
    from transformers import GenerationConfig

    ref = GenerationConfig()
    bad = [k for k in _ANSWER_CHANGING if getattr(gc, k, None) != getattr(ref, k, None)]
    for k, v in (kwargs or {}).items():
        if k in _ANSWER_CHANGING and v != getattr(ref, k, None):
            bad.append(k)
        elif k in ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "negative_prompt_ids",
                   "assistant_model", "streamer", "synced_gpus") and v:
            bad.append(k)
    return sorted(set(bad))


def run_guide(guide, input_ids, pixel_values, attention_mask, new_tokens: int, exit_score: str = "min") -> GuideRun:
    """Greedy ``generate`` of ``new_tokens`` tokens on the guide with its attention recorded (see module doc). A decode
    step counts for a row only while the row has not produced its end-of-sequence token, so a row's ranking is the one
    it gets alone, whatever its batch."""
    from ..patching.handle import PATCHED
    from .adapters import get_vision_adapter

    _ensure_registered()
    if PATCHED.get(guide) is not None:
        raise AccelError("sgl: the guide model is patched by accel; remove its patch (the guide runs unpatched)")
    if guide.training:
        raise AccelError("sgl: the guide is in training mode (dropout); call guide.eval()")
    bad = answer_changing_settings(guide.generation_config)
    if bad:
        raise AccelError(f"sgl: the guide's generation_config sets {bad}, which change its greedy answer; reset them "
                         "on guide.generation_config")
    lm = get_vision_adapter(guide).language_model()
    cfg = lm.config
    B, T = input_ids.shape
    img = input_ids == guide.config.image_token_id
    rows = ~img
    if attention_mask is not None:
        rows &= attention_mask.bool()
    outer = dict(_REC)  # a guide run inside another one's (nested patches) leaves the outer recorder as it was
    _REC.update(acc=torch.zeros(B, T + new_tokens, dtype=torch.float32, device=input_ids.device), rows=rows,
                prompt_len=T, steps=[])
    saved = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = GUIDE_ATTN
    try:
        with torch.no_grad():
            out = guide.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                 max_new_tokens=new_tokens, do_sample=False, num_beams=1, num_return_sequences=1,
                                 use_cache=True, output_scores=True, return_dict_in_generate=True)
        received = _REC["acc"].clone()
        steps = list(_REC["steps"])
    finally:
        cfg._attn_implementation_internal = saved
        _REC.clear()
        _REC.update(outer)
    seq = out.sequences[:, T:]
    eos = guide.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    ended = torch.isin(seq, torch.tensor(eos, device=seq.device)) if eos else torch.zeros_like(seq, dtype=torch.bool)
    # decode step s feeds answer token s - 1 back: it counts while no answer token before it ended the row
    for kv, st in steps:
        s = kv - T  # the step feeds answer token s - 1 back (its cache then holds T + s tokens)
        open_ = ~ended[:, :s].any(1)  # a row alone stops once it has produced its end of sequence
        received += st.to(received.device) * open_.to(received.device, st.dtype).unsqueeze(1)
    received = received[:, :T]
    probs = torch.stack([torch.softmax(sc.float(), -1).gather(1, seq[:, i:i + 1])[:, 0]
                         for i, sc in enumerate(out.scores)], 1)  # [B, n] each answer token's probability
    live = torch.ones_like(probs, dtype=torch.bool)  # tokens after a row's end of sequence do not count
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
    gv = g.config.get_text_config(decoder=True).vocab_size
    mv = model.config.get_text_config(decoder=True).vocab_size
    if gv != mv:
        raise AccelError(f"{policy.name}: the guide's vocabulary ({gv} tokens) differs from the large model's ({mv}); "
                         "the two must share a tokenizer")
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

    def __init__(self, model, runtime, policy, check=None):
        import inspect
        import weakref

        self._model_ref = weakref.ref(model)
        self._had = "generate" in model.__dict__
        self._previous = model.__dict__.get("generate")
        self.runtime, self.policy = runtime, policy
        #: the generate guard's request check, run before the guide (the guard behind runs it again)
        self.check = check

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
        if len(args) > 1:
            raise InputError("sgl: pass generate()'s arguments by keyword (input_ids=..., pixel_values=...)")
        if "inputs" in kwargs:  # generate's own name for its first argument
            if "input_ids" in kwargs:
                raise InputError("sgl: generate() got both inputs= and input_ids=; pass input_ids= only")
            kwargs["input_ids"] = kwargs.pop("inputs")
        if args:
            if "input_ids" in kwargs:
                raise InputError("sgl: generate() got input ids both positionally and as input_ids=")
            kwargs["input_ids"] = args[0]
        self.runtime.last_exit = None
        self.runtime.guide_stash = None
        ids, pv = kwargs.get("input_ids"), kwargs.get("pixel_values")
        if ids is None or pv is None:  # nothing to guide: a text-only prompt
            return orig(**kwargs)
        if self.check is not None:
            self.check(m, (), kwargs)
        import copy

        gc = copy.deepcopy(kwargs.get("generation_config") or m.generation_config)  # then generate's keywords on top
        gc.update(**{k: v for k, v in kwargs.items() if k != "generation_config" and hasattr(gc, k)})
        n = gc.max_new_tokens
        if n is None and pol.guide_tokens is None:
            raise InputError("sgl: generate() needs max_new_tokens (the guide answers first, with as many tokens)")
        exiting = pol.exit_threshold is not None
        if exiting:
            bad = [k for k in ("num_beams", "num_return_sequences") if (getattr(gc, k, None) or 1) != 1]
            bad += [k for k in ("do_sample", "return_dict_in_generate", "output_scores", "output_logits")
                    if getattr(gc, k, None)]
            bad += answer_changing_settings(gc, kwargs)
            if bad:
                raise InputError(f"sgl: exit_threshold returns the guide's plain greedy answer, so generate() cannot "
                                 f"take {sorted(set(bad))} with it; drop them or set exit_threshold=None")
            if pol.guide_tokens is not None and pol.guide_tokens != n:
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
        stay = ~out
        try:
            if not bool(out.any()):
                self.runtime.guide_stash = (ids, mask, pv, run)
                return orig(**kwargs)
            pad = gc.pad_token_id if gc.pad_token_id is not None else (
                gc.eos_token_id if isinstance(gc.eos_token_id, int) else (gc.eos_token_id or [0])[0])
            large = None
            if bool(stay.any()):
                sub = dict(kwargs, input_ids=ids[stay], pixel_values=pv[stay])
                if mask is not None:
                    sub["attention_mask"] = mask[stay]
                self.runtime.guide_stash = (ids[stay], mask[stay] if mask is not None else None, pv[stay],
                                            GuideRun(run.received[stay], run.sequences[stay], run.score[stay]))
                large = orig(**sub)
        finally:  # a stored run serves only the prefill of this call
            self.runtime.guide_stash = None
        guide_seq = torch.cat([ids[out], run.sequences[out][:, :n].to(ids.device)], 1)
        width = max(guide_seq.shape[1], large.shape[1] if large is not None else 0)
        res = torch.full((ids.shape[0], width), int(pad), dtype=ids.dtype, device=ids.device)
        res[out.to(ids.device), :guide_seq.shape[1]] = guide_seq
        if large is not None:
            res[stay.to(ids.device), :large.shape[1]] = large.to(ids.device)
        return res
