"""Fused decode layers for the Llama family: a decode step without transformers' per-module dispatch.

A decode step of a small model on the CPU spends as much time in Python and per-operation dispatch as in reading
weights: transformers' decoder layer is ~40 tensor operations (norms, projections, views, the rotary embedding,
residual adds, the gated MLP), each a few microseconds of overhead, in every layer of every step. For
architectures whose adapter declares a ``FusedLayout`` (Llama, Mistral, Qwen2, Qwen3, Phi3), accel binds an
instance ``forward`` to each decoder layer that, for a decode step (one token per sequence), runs

  ``accel._C.fused_attn_in``   RMSNorm, q/k/v projections, optional per-head q/k RMSNorm, rotary embedding;
  the cache append and the *policy's* attention, exactly as on the module path (``accel_attention_forward``);
  ``accel._C.fused_attn_out_mlp``   o projection + residual, RMSNorm, SiLU-gated MLP + residual.

With the dense policy, Quest (an attention policy with ``stack_layer``: its page summaries, page selection and the
attention over the chosen pages run inside the call), or one budgeted KV-cache policy with its default decode
(streaming, snapkv, pyramidkv, h2o, taskkv, duo, moa, tca), on layers that all attend over full-attention caches,
the first layer's forward runs the whole
stack of a decode step in one call, ``accel._C.fused_decode_stack`` (``FusedDecode.run_stack``): per layer the same
two halves, the new k/v written into accel's cache (a plain buffer, or each head's ragged rows), dense decode
attention over the live rows and, for a compressed layer, the accumulated scores and the eviction back to the
budget, with the same roundings, so the result is bit-identical to the layers one by one; the later layers' forwards
pass its output on.
That saves the per-layer Python between the halves (the cache append, the attention function's routing, the kernel's
launcher): 1.2-1.9 ms a step on SmolLM2. It steps aside -- the layers run one by one -- when the hidden states of every
layer are asked for, a hook sits on a decoder layer, the policy has its own decode, or the cache's layers are not all
plain buffers or one KV policy's ragged rows. ``FusedDecode.whole_stack = False`` turns it off (for comparisons).

Everything else stays transformers' own: the embedding, the masks, the rotary cos/sin, the final norm and the LM
head, and the prefill (several tokens) runs the original layer forward. The weights are read from the modules
at every call (nothing is copied, and a model whose parameters are replaced or changed in place stays right).

When the fused path is taken, and when it is not:
  * it is verified once per patch on the model itself: static checks (plain ``nn.Linear`` projections, SiLU,
    transformers' RMSNorm code, no instance forwards inside the layers) and a probe (``probe``): two tokens through
    every layer's original forward against the fused halves with a reference attention; any difference beyond float
    rounding (a transformers release that changed the layer) turns it off for that patch, logged, and decode runs
    the modules;
  * per forward (``FusedDecode.active``): off under autograd, with ``output_attentions``, or when any hook is
    registered on a module inside the layers (a user's hook, a policy's, torch's global ones) -- the module path
    runs them; transformers' own output-capturing hooks are idle unless their output is requested -- or when a
    module inside the layers was replaced after patching (an adapter injected), or the ``forward`` of one of their
    classes was (a monkeypatch);
  * per call: only for one token per sequence and at most ``MAX_ROWS`` sequences, hidden states of the model's
    dtype on the CPU, accel's cache, a full-width rotary, eval mode, no autograd, no autocast.

bf16 and fp16 models: the kernels read the 16-bit weights (half the bytes of fp32) and compute in fp32; q, k and v are
rounded to the model's dtype where transformers rounds them (before the cache and the policy's attention, which see
exactly the dtypes of the module path) and the layer's output is rounded to it. Inside the halves the intermediates
stay fp32 where transformers rounds each one, so the fused result differs from the module path by 16-bit rounding, and
it is the closer of the two to the fp32 arithmetic on the same weights (tests/test_fused_decode.py measures both
against it). The probe runs each layer's own forward on fp32 copies of its parameters
(``torch.func.functional_call``: the same weight values) against the fused halves.
``remove()`` deletes the instance forwards.
"""
from __future__ import annotations

import logging
import types
import weakref

import torch

from .. import _ext
from ..cache.accel_cache import AccelCache
from ..errors import AccelError
from .attention_fn import accel_attention_forward
from .linear import _fast_forward

logger = logging.getLogger("accel")

_CAPTURE_MODULE = "transformers.utils.output_capturing"
#: at most this many sequences per step (the small-M GEMV's range; larger batches are matrix products for BLAS)
MAX_ROWS = 8
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rmsnorm_ok(norm) -> bool:
    """A norm the C++ RMSNorm reproduces: transformers' LlamaRMSNorm arithmetic (same bytecode)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    f = getattr(type(norm), "forward", None)
    ref = LlamaRMSNorm.forward.__code__
    return (f is not None and hasattr(f, "__code__") and f.__code__.co_code == ref.co_code
            and f.__code__.co_names == ref.co_names and hasattr(norm, "variance_epsilon")
            and isinstance(getattr(norm, "weight", None), torch.Tensor))


def _silu_types():
    import transformers.activations as A

    return (torch.nn.SiLU,) + ((A.SiLUActivation,) if hasattr(A, "SiLUActivation") else ())


def _foreign_forward(m) -> bool:
    """``m`` has an instance forward other than accel's own decode GEMV (``accel.patching.linear``, which the fused
    path replaces anyway)."""
    f = m.__dict__.get("forward")
    return f is not None and getattr(f, "__func__", None) is not _fast_forward


def layer_modules(layer, layout) -> tuple:
    """The modules of one decoder layer whose parameters the fused kernels read (looked up once per patch: a module
    replaced later turns the fused path off, ``FusedDecode.active``), and the packed q/k row counts."""
    a, mlp = layer.self_attn, layer.mlp
    if layout.qkv == "packed":
        qkv = (a.qkv_proj,)
        rows = (a.config.num_attention_heads * a.head_dim, a.config.num_key_value_heads * a.head_dim)
    else:
        qkv, rows = (a.q_proj, a.k_proj, a.v_proj), None
    gu = (mlp.gate_up_proj,) if layout.mlp == "packed" else (mlp.gate_proj, mlp.up_proj)
    qk = (a.q_norm, a.k_norm) if layout.qk_norm else None
    return (layer.input_layernorm, qkv, rows, qk, a.o_proj, layer.post_attention_layernorm, gu, mlp.down_proj)


def _param(m, name):
    """``m.<name>`` for a parameter (or None), from ``_parameters`` directly: ``nn.Module.__getattr__`` costs ~0.6 us
    a lookup, ~20 per layer per step. A parameter replaced by assignment is seen (assignment updates ``_parameters``)."""
    p = m._parameters
    return p[name] if name in p else getattr(m, name, None)


def layer_weights(layer, layout, mods=None):
    """The tensors of one decoder layer, in the fused kernels' order (read from the modules at every call)."""
    ln1, qkv, rows, qk, o, ln2, gu, down = mods if mods is not None else layer_modules(layer, layout)
    if rows is not None:  # packed q | k | v rows
        nq, nk = rows
        w, b = _param(qkv[0], "weight"), _param(qkv[0], "bias")
        wq, wk, wv = w[:nq], w[nq:nq + nk], w[nq + nk:]
        bq, bk, bv = (None, None, None) if b is None else (b[:nq], b[nq:nq + nk], b[nq + nk:])
    else:
        wq, wk, wv = (_param(m, "weight") for m in qkv)
        bq, bk, bv = (_param(m, "bias") for m in qkv)
    if len(gu) == 1:  # packed gate | up rows
        w = _param(gu[0], "weight")
        half = w.shape[0] // 2
        wg, wu = w[:half], w[half:]
    else:
        wg, wu = _param(gu[0], "weight"), _param(gu[1], "weight")
    qn, kn, qk_eps = (None, None, 1e-6) if qk is None else (_param(qk[0], "weight"), _param(qk[1], "weight"),
                                                            qk[0].variance_epsilon)
    return ((_param(ln1, "weight"), ln1.variance_epsilon, wq, wk, wv, bq, bk, bv, qn, kn, qk_eps),
            (_param(o, "weight"), _param(o, "bias"), _param(ln2, "weight"), ln2.variance_epsilon, wg, wu,
             _param(down, "weight")))


def unsupported_reason(adapter, layout) -> str | None:
    """Why this model's layers cannot take the fused path (None: they can)."""
    if not _ext.HAS_CPU_EXT:
        return "accel's C++ CPU extension is not built"
    cfg = adapter.config
    if getattr(cfg, "hidden_act", None) not in ("silu", "swish"):
        return f"hidden_act={getattr(cfg, 'hidden_act', None)!r} (the fused MLP is SiLU-gated)"
    for i, layer in enumerate(adapter.layers()):
        if "forward" in layer.__dict__:
            return f"layer {i} already has an instance forward"
        a, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if a is None or mlp is None:
            return f"layer {i} has no self_attn / mlp"
        norms = [getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)]
        if layout.qk_norm:
            norms += [getattr(a, "q_norm", None), getattr(a, "k_norm", None)]
        if not all(n is not None and _rmsnorm_ok(n) for n in norms):
            return f"layer {i} has a norm other than transformers' RMSNorm"
        try:
            (_, _, wq, wk, wv, *_), (wo, _, _, _, wg, wu, wd) = layer_weights(layer, layout)
        except AttributeError as e:
            return f"layer {i} lacks a module the {layout} layout names ({e})"
        mods = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj", "gate_up_proj")]
        if any(m is not None and getattr(m, "bias", None) is not None for m in mods):
            return f"layer {i} has MLP biases"
        projs = [getattr(a, n, None) for n in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")] + mods
        if any(m is not None and type(m) is not torch.nn.Linear for m in projs):
            return f"layer {i} has a projection that is not a plain nn.Linear (an adapter or a quantized layer)"
        for m in layer.modules():
            if m is not layer and _foreign_forward(m):
                return f"layer {i} has a module with an instance forward ({type(m).__name__})"
        act = getattr(mlp, "act_fn", getattr(mlp, "activation_fn", None))  # Phi3 names it activation_fn
        if not isinstance(act, _silu_types()):
            return f"layer {i}'s MLP activation is {type(act).__name__}, not SiLU"
        if layout.qk_norm and a.q_norm.variance_epsilon != a.k_norm.variance_epsilon:
            return f"layer {i}'s q_norm and k_norm have different epsilons"
        for w in (wq, wk, wv, wo, wg, wu, wd):
            if w.dtype not in _DTYPES or w.dtype != wq.dtype:
                return f"layer {i} has {w.dtype} weights (the fused layers read float32, bfloat16 or float16, one dtype)"
            if w.dim() != 2 or w.stride(-1) != 1:
                return f"layer {i} has a weight the kernel cannot read (non-contiguous rows)"
    return None


class FusedDecode:
    """The fused decode forwards of one patched model (see the module docstring)."""

    def __init__(self, runtime, adapter, layout):
        self.runtime_ref = weakref.ref(runtime)
        self.layout = layout
        self.layers = adapter.layers()
        info = runtime.info
        self.H, self.Hkv, self.D = info.num_heads, info.num_kv_heads, info.head_dim
        #: every module inside the layers (whose hooks would not run on the fused path) with where it sits, per parent:
        #: (parent's instance dict, ((name, child, child's instance dict), ...)); a module replaced after patching -- an
        #: adapter injected, a layer swapped -- turns the fused path off. ``active`` reads the hook dicts and an
        #: instance ``forward`` from the instance dicts directly.
        by_parent: dict = {}
        for layer in self.layers:
            for parent in layer.modules():
                kids = by_parent.setdefault(id(parent), (parent.__dict__, []))[1]
                kids += [(name, child, child.__dict__) for name, child in parent._modules.items()]
        self._parents = tuple((pd, tuple(kids)) for pd, kids in by_parent.values())
        #: each class's ``forward`` (the layers' own and their modules') as it was when patched: one replaced on the
        #: class later (a monkeypatch) turns the fused path off, as an instance forward does
        self._class_forwards = tuple({type(m): type(m).forward for layer in self.layers
                                      for m in layer.modules()}.items())
        self._mods = [layer_modules(layer, layout) for layer in self.layers]
        #: run a decode step's whole layer stack in one C++ call (``run_stack``) where it applies; False: every
        #: layer makes its own calls (the per-layer fused path; for comparisons)
        self.whole_stack = True
        #: a bf16 model's projections take their inputs rounded to bf16, as transformers' bf16 modules receive them
        #: (the norm's output, the gated MLP's product), so the GEMV multiplies bf16 by bf16 with vdpbf16ps where the
        #: CPU has AVX512_BF16 (~1.5x the weight bandwidth of widening the weights); False: fp32 inputs (the widening
        #: kernel). The attention output a bf16 model hands to o_proj is bf16 either way.
        self.bf16_inputs = True
        #: the stack call's weight tuples with what they were built from (``_stack_weights``)
        self._weights_memo = None
        self._layer_idx = [layer.self_attn.layer_idx for layer in self.layers]
        #: the container the model's forward iterates (a layer replaced or wrapped in it after patching: no stack)
        self._container = getattr(adapter.decoder(), "layers", None)
        self._stack_reason = self._stack_unsupported(runtime, adapter)
        if self._stack_reason:
            logger.info("fused decoder stack off: %s; decode runs the fused layers one by one", self._stack_reason)
        #: (position_embeddings, their fp32 [rows, D] cos and sin): transformers hands every layer of a step the same
        #: tuple, converted once per step (one attribute, so two threads generating at once read a matching pair)
        self._rope = (None, None)
        self._refs = []
        for i, layer in enumerate(self.layers):
            fn = types.MethodType(_make_forward(self, i), layer)
            layer.forward = fn
            self._refs.append((weakref.ref(layer), fn))

    def active(self, output_attentions: bool) -> bool:
        """Whether this forward may take the fused path (checked once per forward, before it runs)."""
        if torch.is_grad_enabled() or output_attentions:
            return False
        from torch.nn.modules import module as M

        if M._global_forward_hooks or M._global_forward_pre_hooks or getattr(M, "_global_forward_hooks_always_called", None):
            return False
        for cls, fwd in self._class_forwards:
            if cls.forward is not fwd:
                return False
        # Every decode step runs this right after the stack's C++ call has streamed the weights and the cache through
        # the CPU caches, so each Python object it touches is a likely cache miss: it reads each module's instance
        # dict once (hooks, an instance forward) and each parent's ``_modules`` once, with no per-module calls.
        # (nn.Module keeps ``_modules`` and the hook dicts in the instance dict; ``_fast_forward`` is accel's own GEMV
        # forward, which the fused path replaces anyway.)
        fast = _fast_forward
        for pd, kids in self._parents:
            mods = pd["_modules"]
            for name, m, md in kids:
                if mods.get(name) is not m or md["_forward_pre_hooks"]:
                    return False
                f = md.get("forward")
                if f is not None and getattr(f, "__func__", None) is not fast:
                    return False
                hooks = md["_forward_hooks"]
                if hooks and any(getattr(h, "__module__", "") != _CAPTURE_MODULE for h in hooks.values()):
                    return False
        return True

    def _stack_unsupported(self, runtime, adapter) -> str | None:
        """Why a decode step cannot run the whole stack in one call on this patch (None: it can, per step)."""
        from ..policies.base import AttentionPolicy

        if not hasattr(_ext.cpu_ext(), "fused_decode_stack"):
            return "the built extension predates it"
        own = type(runtime.attention).decode is not AttentionPolicy.decode
        if own:  # the stack runs a policy's own decode only through ``stack_layer`` of the class that wrote that decode
            owner = next(c for c in type(runtime.attention).__mro__ if "decode" in vars(c))
            if "stack_layer" not in vars(owner):
                return f"policy {runtime.attention.name!r} attends with its own decode"
            doc = _ext.cpu_ext().fused_decode_stack.__doc__ or ""
            if "quest_args" not in doc:
                return "the built extension predates Quest in the stack"
            if "float32 or bfloat16" not in doc:
                return "the built extension predates bfloat16 Quest summaries in the stack"
            pol = runtime.attention
            if "per-query-head pages" not in doc and getattr(pol, "agg", None) == "none" and (
                    pol.name == "quest" or getattr(pol, "backend", None) == "quest"):
                return "the built extension predates per-query-head Quest pages in the stack"
        if own and runtime.kv:
            return f"policy {runtime.attention.name!r} over a compressed cache"
        problem = getattr(runtime.attention, "stack_problem", None)
        if own and problem is not None and problem():
            return problem()
        problem = _kv_stack_problem(runtime.kv)
        if problem:
            return problem
        parts = [runtime.attention, *runtime.kv]
        if any(hasattr(p, "install") for p in parts):
            return "the policy hooks the model's modules"
        if runtime.tensor_parallel is not None:
            return "tensor-parallel ranks"
        cfg = adapter.config
        if len(self.layers) != getattr(cfg, "num_hidden_layers", len(self.layers)):
            return "the model runs a different number of layers than it holds"
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, _ = get_layer_types_and_kwargs(cfg.get_text_config(decoder=True))  # as accel's cache reads them
        if any(t != "full_attention" for t in types):
            return "sliding-window layers"
        if sorted(self._layer_idx) != list(range(len(self.layers))) or self._layer_idx != sorted(self._layer_idx):
            return "layer indices out of order"
        if len({layer.self_attn.scaling for layer in self.layers}) != 1:
            return "layers with different attention scalings"
        return None

    def stack_ok(self, runtime, module, kwargs) -> bool:
        """Whether this forward may run the whole stack in one call (checked once per forward, after ``active``):
        the patch allows it, no hidden states of the layers are asked for, and nothing hooks the layers themselves
        (their forward would not run in between)."""
        if not self.whole_stack or self._stack_reason is not None:
            return False
        c = self._container  # the model still runs exactly the patched layers, each with accel's forward
        if c is None or len(c) != len(self.layers) or any(a is not b for a, b in zip(c, self.layers)):
            return False
        for layer, (_, fn) in zip(self.layers, self._refs):
            if layer.__dict__.get("forward") is not fn:
                return False
        ohs = kwargs.get("output_hidden_states")
        if ohs is None:
            ohs = getattr(module.config, "output_hidden_states", False)
        if ohs:
            return False
        for layer in self.layers:
            if layer._forward_pre_hooks or (layer._forward_hooks and any(
                    getattr(h, "__module__", "") != _CAPTURE_MODULE for h in layer._forward_hooks.values())):
                return False
        return True

    def run_stack(self, rt, h, cache, attention_mask, cs):
        """The whole decoder stack of one decode step in one C++ call (``accel._C.fused_decode_stack``): per layer the
        fused halves around the new k/v written into accel's cache, decode attention over what the layer holds and,
        for a layer a KV policy compressed, its accumulation and eviction; bit-identical to the per-layer path.
        Returns the last layer's output rows [B, width], or None when a layer's cache is not one the call takes (the
        per-layer path then runs)."""
        from ..attention.masks import first_valid_positions, valid_from_mask

        B = h.shape[0]
        n = len(self.layers)
        layers = cache.layers
        if len(layers) < n:
            return None
        layers = layers[:n]
        dense = [cl for cl in layers if cl.ragged is None]
        for cl in dense:
            if (cl.is_sliding or cl.k_buf is None or cl.k_buf.shape[0] != B or cl.k_buf.dtype != h.dtype
                    or cl.v_buf.dtype != h.dtype or cl.start != dense[0].start or cl.end != dense[0].end):
                return None
        ragged, flags, positions = [], [], []
        if len(dense) < n:
            kv = rt.kv[0] if rt.kv else None
            states = rt.layer_state
            for i, cl in enumerate(layers):
                rg = cl.ragged
                if rg is None:
                    ragged.append([])
                    flags.append(0)
                    positions.append(0)
                    continue
                if (cl.is_sliding or rg.k.dtype != h.dtype or rg.v.dtype != h.dtype or rg.k.device.type != "cpu"
                        or rg.shape[0] != B or not rg.k.is_contiguous() or not rg.v.is_contiguous()):
                    return None
                st = states.get(i, {}).get(kv.STATE_KEY) if kv is not None else None
                evict = kv is not None and kv.decode == "fixed"
                if evict and st is None:
                    return None  # the per-layer path raises its one-line error
                if rg._caps_flat is None:
                    rg._caps_flat = rg.caps.reshape(-1).contiguous()
                t = [rg.k, rg.v, rg.pos, rg.score, rg.offsets.reshape(-1), rg.lengths.view(-1), rg._caps_flat]
                if evict:
                    t += list(st.current(rg))
                ragged.append(t)
                flags.append(int(evict) | (2 if st is not None and st.evict_by != "score" else 0)
                             | (4 if st is not None and st.accumulate else 0))
                positions.append(int(cl.cumulative_length))
        start = pos = 0
        valid = None
        if dense:
            pos = [cl.room_for_one() for cl in dense]
            if any(p != pos[0] for p in pos) or any(cl.start != dense[0].start for cl in dense):
                return None
            pos, start = pos[0], dense[0].start
            T = pos + 1 - start
            memo = rt.shared.get("valid_mask")
            if memo is not None and memo[0] is attention_mask and memo[1] == T:
                ok, valid = memo[2]
            else:
                ok, valid = valid_from_mask(attention_mask, B, T)
                rt.shared["valid_mask"] = (attention_mask, T, (ok, valid))
            if not ok:
                return None
        quest, quest_args, first, steps = [], [], None, []
        stack_layer = getattr(rt.attention, "stack_layer", None)
        if stack_layer is not None:  # an attention policy whose decode runs in the stack (Quest's page selection)
            if len(dense) < n:
                return None
            T = pos + 1 - start
            for i, (cl, layer) in enumerate(zip(layers, self.layers)):
                spec = stack_layer(rt.context(i, layer.self_attn), T)
                if spec is False:  # not this step (flux: the batch's rows take different routes here)
                    return None
                if spec is None:
                    quest.append([])
                    quest_args += [0, 0, 0, 0]
                else:
                    t, a = spec.args()
                    quest.append(t)
                    quest_args += a
                    steps.append(spec)
            if valid is not None and steps:
                first = first_valid_positions(valid, B)
        pre_l, post_l, eps = self._stack_weights()
        C = _ext.cpu_ext()
        kb = [cl.k_buf if cl.ragged is None else None for cl in layers]
        vb = [cl.v_buf if cl.ragged is None else None for cl in layers]
        args = (h, pre_l, post_l, eps, kb, vb, start, pos, valid, cs[0], cs[1], self.H, self.Hkv,
                self.layers[0].self_attn.scaling, ragged, flags, positions, self.bf16_inputs)
        if steps:  # Quest layers this step (keywords: the other policies' calls stay those of earlier builds)
            qkw = dict(quest=quest, quest_args=quest_args, first=first)
        else:
            qkw = {}
        with rt.lock:  # a compressed layer's eviction, as the per-layer path runs it
            res = C.fused_decode_stack(*args, **qkw)
            if not res:  # a compressed layer has a full head: grow it (as its append would) and run
                for cl in layers:
                    rg = cl.ragged
                    if rg is not None and bool((rg.lengths.long() >= rg.caps).any()):
                        rg._grow(rg.lengths.long() >= rg.caps)
                return self.run_stack(rt, h, cache, attention_mask, cs)
            y, rows = res
            for spec in steps:
                spec.done()
            for cl in layers:
                if cl.ragged is None:
                    cl.appended_one()
                else:
                    cl.cumulative_length += 1
            if rt.kv and hasattr(rt.kv[0], "after_stack"):  # the policy's own per-step work (TCA: blocks due)
                rt.kv[0].after_stack(rt, attention_mask)
        st = rt.stats
        st["fused_layer_calls"] += n - 1  # the first layer counted its own call
        st["decode_layer_calls"] += n
        st["stack_calls"] = st.get("stack_calls", 0) + 1
        D = self.D
        st["kv_read_bytes"] += int(rows) * 2 * D * h.element_size() + sum(spec.summary_bytes() for spec in steps)
        rt.attn_calls += n
        return y

    def _stack_weights(self):
        """The stack call's per-layer weight tuples (``layer_weights`` of every layer, 16-bit norm weights and biases
        widened by ``_f32``), reused from the previous step while every value they were built from is still the one
        the modules hold: the same parameter object under the same name (a parameter replaced by assignment is seen),
        the same epsilon, and for every norm weight and bias (widened or passed as they are) the same dtype, storage
        and in-place version (``_storage_state``: ``model.to(dtype)`` and ``p.data = ...`` keep the parameter object
        but change its storage). Checking those
        references is a fraction of rebuilding the tuples, which a decode step did on CPU caches the previous step's
        weights had just streamed through (~0.35 ms of SmolLM2's step). Packed q/k/v or gate/up layouts (slices of one
        weight) are rebuilt every step."""
        memo = self._weights_memo
        if memo is not None:
            refs, tracked, out = memo
            if all(d.get(k) is o for d, k, o in refs) and all(_storage_state(t) == v for t, v in tracked):
                return out
        pre_l, post_l, eps = [], [], []
        for layer, mods in zip(self.layers, self._mods):
            (ln, e1, wq, wk, wv, bq, bk, bv, qn, kn, qk_eps), (wo, bo, ln2, e2, wg, wu, wd) = layer_weights(
                layer, self.layout, mods)
            pre_l.append((_f32(ln), wq, wk, wv, _f32(bq), _f32(bk), _f32(bv), _f32(qn), _f32(kn)))
            post_l.append((wo, _f32(bo), _f32(ln2), wg, wu, wd))
            eps += (e1, e2, qk_eps)
        out = (pre_l, post_l, eps)
        self._weights_memo = None
        if all(rows is None and len(gu) == 2 for _, _, rows, _, _, _, gu, _ in self._mods):
            refs, tracked = [], []
            for ln1, qkv, _, qk, o, ln2, gu, down in self._mods:
                norms = (ln1, ln2) + (tuple(qk) if qk is not None else ())
                for m in norms:
                    refs.append((m._parameters, "weight", m._parameters.get("weight")))
                    refs.append((m.__dict__, "variance_epsilon", m.__dict__.get("variance_epsilon")))
                for m in (*qkv, o, *gu, down):
                    refs.append((m._parameters, "weight", m._parameters.get("weight")))
                    refs.append((m._parameters, "bias", m._parameters.get("bias")))
                small = [m._parameters.get("weight") for m in norms] + [m._parameters.get("bias") for m in (*qkv, o)]
                tracked += [(t, _storage_state(t)) for t in small if t is not None]
            # every value read from where it is checked (a weight or bias that is not a parameter, e.g. a buffer,
            # is read through getattr by layer_weights: no memo then)
            if all(o is not None for d, k, o in refs if k != "bias") and all(
                    k in d for d, k, o in refs):
                self._weights_memo = (tuple(refs), tuple(tracked), out)
        return out

    def remove(self) -> None:
        self._weights_memo = None
        self._rope = (None, None)
        for ref, fn in self._refs:
            layer = ref()
            if layer is not None and layer.__dict__.get("forward") is fn:
                del layer.__dict__["forward"]
        self._refs = []


def _kv_stack_problem(kv) -> str | None:
    """Why the KV-cache policies ``kv`` keep the whole stack from running in one call (None: they do not): it runs
    one ``BudgetedKVPolicy`` whose decode-time work is the shared budget eviction and accumulation, in C++ (plus, for a
    policy with ``after_stack``, its own work once per step after the call)."""
    from ..policies.budgeted import BudgetedKVPolicy

    if not kv:
        return None
    if len(kv) > 1:
        return "several KV-cache policies"
    p = kv[0]
    if not isinstance(p, BudgetedKVPolicy):
        return f"KV-cache policy {p.name!r} is not a budgeted eviction policy"
    cls = type(p)
    # a policy whose own decode-time work runs once per step after the stack (``after_stack``) keeps its own
    # after_decode for the per-layer path
    own = ("accumulates", "evict_to_budget") if hasattr(cls, "after_stack") else ("after_decode", "accumulates",
                                                                                    "evict_to_budget")
    for name in own:
        if getattr(cls, name) is not getattr(BudgetedKVPolicy, name):
            return f"KV-cache policy {p.name!r} has its own {name}"
    return None


_F32: dict = {}  # id(tensor) -> (weakref, _storage_state, fp32 copy): a 16-bit model's norm weights and biases, widened once


def _storage_state(t) -> tuple:
    """What a tensor holds, short of its values: dtype, storage address and in-place version (``.to(dtype)`` on a
    module and ``p.data = ...`` keep the parameter object but change the first two; in-place writes bump the third)."""
    return (t.dtype, t.data_ptr(), _version(t))


def _f32(t):
    """A norm weight or bias as the kernels take it: fp32. A 16-bit model's (a few hundred values each) are widened once
    and reused while the tensor lives unchanged (same object, dtype, storage and in-place version)."""
    if t is None or t.dtype == torch.float32:
        return t
    e = _F32.get(id(t))
    state = _storage_state(t)
    if e is not None and e[0]() is t and e[1] == state:
        return e[2]
    if len(_F32) > 4096:
        for key in [k for k, v in _F32.items() if v[0]() is None]:
            del _F32[key]
    t32 = t.float()
    _F32[id(t)] = (weakref.ref(t), state, t32)
    return t32


def _version(t) -> int:
    """``t``'s in-place version; inference tensors (made under ``torch.inference_mode``) track none: -1."""
    return -1 if t.is_inference() else t._version


def _fused_halves(C, h, layer, layout, H, Hkv, cos, sin, mods=None, bf16_inputs=False):
    """The fused layer's weights and the first half's q, k, v for hidden rows ``h`` [M, width] (fp32, bf16 or fp16;
    computed in fp32, returned in h's dtype). ``bf16_inputs``: a bf16 model's projections take their inputs rounded to
    bf16 (``FusedDecode.bf16_inputs``)."""
    pre, post = layer_weights(layer, layout, mods)
    ln, eps, wq, wk, wv, bq, bk, bv, qn, kn, qk_eps = pre
    q, k, v = C.fused_attn_in(h, _f32(ln), eps, wq, wk, wv, _f32(bq), _f32(bk), _f32(bv), _f32(qn), _f32(kn),
                              qk_eps, cos, sin, H, Hkv, bf16_inputs)
    wo, bo, ln2, eps2, wg, wu, wd = post
    return (q, k, v), (wo, _f32(bo), _f32(ln2), eps2, wg, wu, wd)


def _make_forward(fd: FusedDecode, idx: int):
    layout, H, Hkv, D = fd.layout, fd.H, fd.Hkv, fd.D
    C = _ext.cpu_ext()
    mods = fd._mods[idx]

    last = len(fd.layers) - 1

    def forward(self, hidden_states, *args, **kwargs):
        # the layer's keywords as transformers passes them: the cache is ``past_key_values`` before 5.24, ``cache``
        # from 5.24 on (the attention function receives neither)
        rt = fd.runtime_ref()
        if idx and rt is not None and rt.stack_out is not None:
            # the first layer ran the whole stack (``FusedDecode.run_stack``): this layer's work is done
            if hidden_states is not rt.stack_out or _version(hidden_states) != rt.stack_version:
                rt.stack_out = None
                raise AccelError(f"decoder layer {idx} received hidden states other than the fused stack's output: the "
                                 "model changes them between layers (patch with fused_decode=False)")
            if idx == last:
                rt.stack_out = None
            return hidden_states
        cache_kw = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(cache_kw)
        pe = kwargs.get("position_embeddings")
        dt = hidden_states.dtype
        if (args or rt is None or not rt.fused_now or hidden_states.shape[1] != 1 or hidden_states.shape[0] > MAX_ROWS
                or pe is None or not isinstance(cache, AccelCache)
                or dt not in _DTYPES or hidden_states.device.type != "cpu"
                or self.input_layernorm.weight.dtype != dt
                or pe[0].shape[-1] != D or self.training or torch.is_grad_enabled()
                or torch.is_autocast_enabled("cpu")):
            return type(self).forward(self, hidden_states, *args, **kwargs)
        rt.stats["fused_layer_calls"] += 1
        attention_mask = kwargs.get("attention_mask")
        rest = {k: v for k, v in kwargs.items()
                if k not in ("attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                             "position_embeddings")}
        src, cs = fd._rope
        key = (pe[0], pe[1], _version(pe[0]), _version(pe[1]))
        if src is None or src[0] is not key[0] or src[1] is not key[1] or src[2:] != key[2:]:
            cs = (pe[0].float().reshape(-1, D).contiguous(), pe[1].float().reshape(-1, D).contiguous())
            fd._rope = (key, cs)
        B, width = hidden_states.shape[0], hidden_states.shape[-1]
        h = hidden_states.reshape(B, width)
        if idx == 0 and rt.stack_now and not rest:
            y = fd.run_stack(rt, h, cache, attention_mask, cs)
            if y is not None:
                out = y.view(B, 1, width)
                rt.stack_out = out if last else None
                rt.stack_version = _version(out)  # an in-place change on the way to a later layer is refused
                return out
        # 16-bit rows are widened inside the kernels, and q, k, v come back in the model's dtype: rounded where
        # transformers rounds them, so the cache and the policy see the module path's dtypes
        bi = fd.bf16_inputs
        (q, k, v), post = _fused_halves(C, h, self, layout, H, Hkv, cs[0], cs[1], mods, bi)
        attn = self.self_attn
        k_all, v_all = cache.update(k.view(B, Hkv, 1, D), v.view(B, Hkv, 1, D), attn.layer_idx)
        out, _ = accel_attention_forward(attn, q.view(B, H, 1, D), k_all, v_all, attention_mask, dropout=0.0,
                                         scaling=attn.scaling, **rest)
        # the attention output in the model's dtype (16-bit: rounded, as the module path hands it to o_proj); the
        # layer's output comes back in h's dtype
        y = C.fused_attn_out_mlp(h, out.reshape(B, H * D), *post, bi)
        return y.view(B, 1, width)

    return forward


def probe(adapter, layout, decoder) -> str | None:
    """Run two tokens through every layer's original forward (the model's own attention implementation, causal) and
    through the fused halves with a reference causal attention; return why they differ (None: they agree)."""
    C = _ext.cpu_ext()
    info = adapter.info()
    H, Hkv, D = info.num_heads, info.num_kv_heads, info.head_dim
    G = H // Hkv
    try:
        with torch.no_grad():
            emb = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else decoder.embed_tokens
            dev = emb.weight.device
            ids = torch.tensor([[min(5, emb.weight.shape[0] - 1), min(7, emb.weight.shape[0] - 1)]], device=dev)
            h = emb(ids)
            pos = torch.tensor([[3, 4]], device=dev)
            cos, sin = decoder.rotary_emb(h, pos)
            if h.device.type != "cpu" or cos.shape[-1] != D:
                return "the model is not on the CPU or its rotary embedding is partial"
            if h.dtype not in _DTYPES:
                return f"the model's dtype is {h.dtype} (the fused layers read float32, bfloat16 or float16 weights)"
            # a 16-bit model's layers are probed in fp32 arithmetic on their own weight values (transformers' layer
            # code on fp32 copies of the layer's tensors, one layer at a time): the fused halves compute in fp32, and
            # the rounding of q, k, v and the output to 16 bits around them is accel's own
            low = h.dtype != torch.float32
            h, cos, sin = h.float(), cos.float(), sin.float()
            kw = dict(attention_mask=None, position_ids=pos, use_cache=False, position_embeddings=(cos, sin))
            for i, layer in enumerate(adapter.layers()):
                if low:
                    tensors = {n: t.float() for n, t in [*layer.named_parameters(), *layer.named_buffers()]}
                    ref = torch.func.functional_call(layer, tensors, (h,), kw, tie_weights=False, strict=False)
                    del tensors
                else:
                    ref = type(layer).forward(layer, h, **kw)
                ref = ref[0] if isinstance(ref, tuple) else ref
                x = h[0].contiguous()
                (q, k, v), post = _fused_halves(C, x, layer, layout, H, Hkv, cos[0].contiguous(), sin[0].contiguous())
                qh = q.view(2, H, D).transpose(0, 1)
                kh = k.view(2, Hkv, D).transpose(0, 1).repeat_interleave(G, 0)
                vh = v.view(2, Hkv, D).transpose(0, 1).repeat_interleave(G, 0)
                o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                                                     scale=layer.self_attn.scaling)
                got = C.fused_attn_out_mlp(x, o.transpose(0, 1).reshape(2, H * D).contiguous(), *post)
                # measured against what the layer adds to its input (the residual would hide a changed branch)
                delta = (ref[0] - x).abs().max().item() + 1e-6
                err = (got - ref[0]).abs().max().item()
                if not err <= 1e-4 * delta:
                    return (f"layer {i}'s fused output differs from transformers' by {err:.3g} (the layer's own change "
                            f"is {delta:.3g})")
                h = ref
    except Exception as e:  # a layer the probe cannot run is a layer the fused path must not run
        logger.warning("fused decode: the patch-time probe could not run (%s: %s); decode runs transformers' modules",
                       type(e).__name__, e)
        return f"the probe could not run ({type(e).__name__}: {e})"
    return None


def install(runtime, adapter):
    """Bind the fused decode forwards if the architecture declares a layout and the probe agrees; returns the
    ``FusedDecode`` (with ``remove()``) or None, logging why not."""
    layout = adapter.fused_layout
    if layout is None:
        logger.info("fused decode: not for %s (decode runs transformers' modules)", runtime.info.model_type)
        return None
    reason = unsupported_reason(adapter, layout) or probe(adapter, layout, adapter.decoder())
    if reason is not None:
        logger.info("fused decode off: %s; decode runs transformers' modules", reason)
        return None
    return FusedDecode(runtime, adapter, layout)
