"""What every accel patcher shares (the LM runtime, the VLM runtime and TPLA): the registry of patched models, the
handle's context-manager plumbing, the pre-forward checks on the top-level model, the ``generate()`` guard, the
eager decoder under ``torch.compile``, and the refusal of caches accel cannot continue."""
from __future__ import annotations

import weakref

import torch

from ..cache.accel_cache import AccelCache
from .. import compat
from ..errors import AlreadyPatchedError, InputError

#: model -> its active handle (weak: a deleted model leaves nothing behind)
PATCHED: "weakref.WeakKeyDictionary[torch.nn.Module, HandleBase]" = weakref.WeakKeyDictionary()


def dtype_problem(model) -> str | None:
    """Why accel's kernels cannot serve this model's dtype on its device (None: they can). The CPU kernels read float32,
    bfloat16 and float16 models; another dtype (e.g. float64) is refused, and so is fp16 autocast on the CPU (it hands
    the attention fp32 keys beside fp16 values: torch's CPU autocast runs the rotary embedding in fp32 but not the
    value projection). On other devices every dtype goes to kernels that take it."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu":
        return None
    half_autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    if p.dtype in (torch.float32, torch.bfloat16, torch.float16) and not half_autocast:
        return None
    from ..ops.attention import choose_backend

    if choose_backend(p.device) != "cpp":
        return None
    if half_autocast:
        return ("the model runs under fp16 autocast on the CPU, which gives accel's cache fp32 keys beside fp16 values; "
                "convert the model with model.half() instead, or use autocast with dtype=torch.bfloat16")
    return (f"the model is {p.dtype} on the CPU, and accel's CPU kernels read float32, bfloat16 or float16; convert it "
            "with model.float(), model.half() or model.to(torch.bfloat16)")


def refuse_if_patched(model) -> None:
    prev = PATCHED.get(model)
    if prev is not None:
        raise AlreadyPatchedError(
            f"this model is already patched by accel (policy {prev.policy.name!r}); call "
            "handle.remove() (or accel.unpatch(model)) before patching it again"
        )


def prepare_forward(module, args, kwargs, make_cache, context_limit: int | None, cache_arg: str = "past_key_values",
                    policy_name: str = "accel"):
    """What every accel pre-forward hook does on the top-level model: refuse an empty prompt, give a new
    generation (no cache, or transformers' fresh ``DynamicCache``) the cache ``make_cache()`` builds, refuse a
    cache accel cannot decode on (a ``StaticCache``, a filled cache of another class), a sequence longer than
    ``context_limit`` (None = no check) and a right-padded batch. The cache is passed on under ``cache_arg``
    (``cache`` on transformers 5.24+, ``past_key_values`` before), whichever name the caller used. Edits ``kwargs``
    in place; returns the cache the forward will use (or None)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if ref is not None and ref.shape[1] == 0:
        raise InputError("empty prompt: the input has 0 tokens; give at least one token")
    q_len = ref.shape[1] if ref is not None else 0
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", True)
    pkv = compat.take_cache(kwargs)
    if pkv is not None and not isinstance(pkv, AccelCache):
        refuse_foreign_cache(pkv, policy_name)
    if use_cache and not module.training:
        if pkv is None or not isinstance(pkv, AccelCache):
            pkv = make_cache()
    if pkv is not None:
        kwargs[cache_arg] = pkv
    past = pkv.get_seq_length() if pkv is not None else 0
    if context_limit and past + q_len > context_limit:
        raise InputError(
            f"sequence of {past + q_len} tokens ({past} cached + {q_len} new) exceeds the model's context "
            f"window of {context_limit} tokens (config.max_position_embeddings); shorten the prompt or lower "
            "max_new_tokens (or patch with check_context=False to run past it anyway)"
        )
    am = kwargs.get("attention_mask")
    if past == 0 and isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[0] > 1:
        a = am.bool()
        # a row is left-padded (or unpadded) iff once a 1 appears, no 0 follows
        seen = torch.cumsum(a.int(), dim=1) > 0
        if bool((seen & ~a).any()):
            raise InputError(
                "the batch is right-padded (a 0 follows a 1 in attention_mask); decoder-only generation needs "
                "left padding: set tokenizer.padding_side = 'left' before tokenizing"
            )
    return pkv


def check_generate_request(model, args, kwargs, *, policy_name: str, dense: bool, context_limit: int | None) -> None:
    """Refuse, before ``generate()`` produces anything, what accel cannot serve exactly as planned: a cache
    implementation of transformers' own (accel decodes on its cache), assisted / prompt-lookup decoding and
    ``output_attentions`` with a non-dense policy, and a request longer than the context window."""
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def opt(name):
        if kwargs.get(name) is not None:
            return kwargs[name]
        return getattr(gc, name, None) if gc is not None else None

    impl = opt("cache_implementation")
    # "dynamic" builds an empty DynamicCache (accel replaces it); "hybrid", which Gemma checkpoints ship, is dropped
    # by transformers itself; any other cache implementation would be transformers' own preallocated cache
    if impl is not None and impl not in ("dynamic", "hybrid"):
        raise InputError(
            f"generate(cache_implementation={impl!r}) with accel policy {policy_name!r}: accel decodes on its own "
            "preallocated cache; drop cache_implementation (patch(model, reserve=N) preallocates N tokens) or remove "
            "the patch"
        )
    assisted = [n for n in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit") if opt(n)]
    if assisted and not dense:
        raise InputError(
            f"generate({assisted[0]}=...) with accel policy {policy_name!r}: assisted and prompt-lookup decoding verify "
            "several drafted tokens per step and roll the cache back, which this policy's compressed or sparse state "
            "cannot follow; use policy='dense' for assisted decoding, or generate without it"
        )
    oa = opt("output_attentions")
    if oa is None:
        oa = getattr(getattr(model, "config", None), "output_attentions", False)
    if oa and not dense:
        raise InputError(
            f"generate(output_attentions=True) with accel policy {policy_name!r}: the policy does not compute the full "
            "attention matrix transformers would return; drop output_attentions or patch with policy='dense'"
        )
    if context_limit:
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args and isinstance(args[0], torch.Tensor) else None))
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        n_in = int(ids.shape[1]) if ids is not None and ids.dim() >= 2 else 0
        new = opt("max_new_tokens")
        total = n_in + int(new) if new is not None else max(int(opt("max_length") or 0), n_in + 1)
        if total > context_limit:
            raise InputError(
                f"generate() asks for up to {total} tokens ({n_in} in the prompt + {total - n_in} new), which "
                f"exceeds the model's context window of {context_limit} tokens (config.max_position_embeddings); shorten the prompt or lower max_new_tokens (or patch with "
                "check_context=False to run past it anyway)"
            )


class EagerDecoder:
    """Keeps the patched decoder stack out of ``torch.compile`` graphs: an instance-level ``forward`` on the module
    that owns the layers, wrapped in ``torch.compiler.disable``; ``remove()`` deletes it.

    accel's decode runs its own kernels over a cache with per-sequence Python state (positions, growth, policy
    selections). Traced by Dynamo, that state either becomes guards that recompile the graph every step, or -- kept
    out with a break per layer -- splits the graph into per-layer pieces that Dynamo recompiles per ``layer_idx``
    (measured on SmolLM2 at 4K: compiled 0.71x of eager with a break in every attention module). With the decoder as
    one eager call, the compiled graph holds the rest (the LM head, as accel's ``small_m_linear`` custom op) and
    compiled decode runs at eager speed (``bench/bench_compile.py``)."""

    def __init__(self, decoder):
        self._ref = weakref.ref(decoder)
        self._had = "forward" in decoder.__dict__
        self._previous = decoder.__dict__.get("forward")
        self.fn = torch.compiler.disable(decoder.forward)
        decoder.forward = self.fn

    def remove(self) -> None:
        d = self._ref()
        if d is None or d.__dict__.get("forward") is not self.fn:
            return
        if self._had:
            d.forward = self._previous
        else:
            del d.__dict__["forward"]


class GenerateGuard:
    """Checks a ``generate()`` call before it runs. Installed as an instance attribute ``generate`` on the patched
    model (transformers has no pre-generate hook; forward hooks only see the first forward, after generate has
    prepared its caches and candidates) and deleted by ``remove()``, so the class's own ``generate`` is untouched."""

    def __init__(self, model, check):
        import inspect

        self._model_ref = weakref.ref(model)
        self._had = "generate" in model.__dict__
        self._previous = model.__dict__.get("generate")
        ref = self._model_ref

        def generate(*args, **kwargs):
            m = ref()
            check(m, args, kwargs)
            orig = self._previous if self._had else type(m).generate.__get__(m)
            return orig(*args, **kwargs)

        bound = model.generate
        generate.__signature__ = inspect.signature(bound)  # pipelines and generate read the signature
        generate.__doc__, generate.__name__ = bound.__doc__, "generate"
        self.fn = generate
        model.generate = generate

    def remove(self) -> None:
        m = self._model_ref()
        if m is None:
            return
        if m.__dict__.get("generate") is self.fn:
            if self._had:
                m.generate = self._previous
            else:
                del m.__dict__["generate"]


def refuse_foreign_cache(pkv, policy_name: str) -> None:
    """accel decodes on its own ``AccelCache``. transformers' fresh (empty) ``DynamicCache`` is replaced by one;
    any other cache object is refused with what to pass instead."""
    from transformers.cache_utils import DynamicCache, StaticCache

    if isinstance(pkv, StaticCache):
        raise InputError(
            f"a StaticCache (cache_implementation='static' or a user-built one) with accel policy {policy_name!r}: "
            "accel decodes on its own preallocated cache; drop cache_implementation / the cache (patch(model, "
            "reserve=N) preallocates N tokens) or remove the patch"
        )
    if type(pkv) is DynamicCache and pkv.get_seq_length() == 0:
        return
    if not hasattr(pkv, "get_seq_length"):
        raise InputError(f"a cache of type {type(pkv).__name__} was passed; transformers 5 takes Cache objects only "
                         "(pass accel.AccelCache(model.config), the cache a patched call returned, or none)")
    raise InputError(
        f"a {type(pkv).__name__} holding {pkv.get_seq_length()} tokens was passed to a model patched with accel "
        f"policy {policy_name!r}; accel continues only its own cache: pass the cache a patched call returned "
        "(out.cache on transformers 5.24+, out.past_key_values before), an empty accel.AccelCache(model.config), or no cache"
    )


class HandleBase:
    """Context-manager and repr plumbing shared by accel's patch handles (``remove``, ``summary`` and ``active``
    come from the subclass)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        return f"<{type(self).__name__} {'active' if self.active else 'removed'}: {self.summary()}>"

