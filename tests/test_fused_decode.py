"""The fused decode layers (``accel.patching.fused``): taken for the Llama family, exact against transformers'
modules (and against the same patch with the fused path off), and never taken where a hook, autograd, attention
weights or a changed layer would make it differ."""
import pytest
import torch

import accel

from .conftest import ARCHS, hand_plan, left_padded, tiny_model

FUSED_ARCHS = [a for a in ARCHS if a != "gemma3_text"]


def _batch(B=3, L=24, pads=(0, 5, 11), seed=0):
    return left_padded(B, L, pads, seed, high=250)


def _generate(model, ids, mask, new=10):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)


def _close(a, b, tol=1e-4):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.exactness
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ["dense", "hylra", "snapkv@budget_ratio=0.5"])
def test_fused_equals_modules(arch, policy):
    """Every decode step of a left-padded batch: the fused layers give the tokens and logits of the same patch on
    transformers' modules (for Gemma3, which has no fused layout, the modules run either way)."""
    model = tiny_model(arch)
    ids, mask = _batch()
    n_layers = model.config.num_hidden_layers
    kw = {"plan": hand_plan(n_layers), "topk": 12, "sink": 2, "recent": 4, "chunk": 1} if policy == "hylra" else {}
    with torch.no_grad():
        with accel.patch(model, policy, fused_decode=False, **kw) as h:
            ref = _generate(model, ids, mask)
            assert h.runtime.stats["fused_layer_calls"] == 0
        with accel.patch(model, policy, **kw) as h:
            out = _generate(model, ids, mask)
            calls = h.runtime.stats["fused_layer_calls"]
    _close(out, ref)
    if arch in FUSED_ARCHS:
        assert calls == 9 * n_layers  # every decode step (10 new tokens: 9 decode forwards) of every layer
    else:
        assert calls == 0


@pytest.mark.exactness
@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_fused_dense_equals_unpatched(arch):
    model = tiny_model(arch, seed=3)
    ids, mask = _batch(seed=3)
    with torch.no_grad():
        ref = _generate(model, ids, mask, new=16)
        with accel.patch(model, "dense") as h:
            out = _generate(model, ids, mask, new=16)
            assert h.runtime.stats["fused_layer_calls"] > 0
    _close(out, ref)


def test_a_hook_inside_a_layer_turns_the_fused_path_off():
    """A forward hook on a projection must run: that forward takes the module path, and the result is the same."""
    model = tiny_model("llama")
    ids, mask = _batch(B=2)
    seen = []
    with torch.no_grad(), accel.patch(model, "dense") as h:
        ref = _generate(model, ids, mask)
        fused = h.runtime.stats["fused_layer_calls"]
        hook = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
        out = _generate(model, ids, mask)
        hook.remove()
        assert h.runtime.stats["fused_layer_calls"] == fused  # no fused call while the hook was there
        assert seen.count(1) == 9  # the hook saw every decode step
        again = _generate(model, ids, mask)
        assert h.runtime.stats["fused_layer_calls"] > fused  # hook removed: fused again
    _close(out, ref)
    _close(again, ref)


def test_a_forward_replaced_on_a_class_after_patching_turns_the_fused_path_off(monkeypatch):
    """A class's forward replaced after patching (a monkeypatch of the MLP) must run: decode takes the module path
    while it is in place, and the fused path returns when it is restored."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    model = tiny_model("llama")
    ids, mask = _batch(B=2)
    orig, seen = LlamaMLP.forward, []

    def traced(self, x):
        seen.append(x.shape[1])
        return orig(self, x)

    with torch.no_grad(), accel.patch(model, "dense") as h:
        ref = _generate(model, ids, mask)
        fused = h.runtime.stats["fused_layer_calls"]
        monkeypatch.setattr(LlamaMLP, "forward", traced)
        out = _generate(model, ids, mask)
        assert h.runtime.stats["fused_layer_calls"] == fused  # no fused call while the class forward is replaced
        assert seen.count(1) == 9 * model.config.num_hidden_layers  # it ran at every decode step of every layer
        monkeypatch.setattr(LlamaMLP, "forward", orig)
        _generate(model, ids, mask)
        assert h.runtime.stats["fused_layer_calls"] > fused
    _close(out, ref)


def test_autograd_and_attention_weights_take_the_module_path():
    model = tiny_model("qwen3")
    ids = torch.randint(3, 250, (1, 12))
    with accel.patch(model, "dense") as h:
        out = model(ids, use_cache=True)  # grad enabled: transformers' modules (a graph can be built)
        step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
        assert h.runtime.stats["fused_layer_calls"] == 0 and step.logits.requires_grad
        with torch.no_grad():
            out = model(ids, use_cache=True)
            att = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True, output_attentions=True)
            assert h.runtime.stats["fused_layer_calls"] == 0
            assert att.attentions is not None and len(att.attentions) == model.config.num_hidden_layers
            model(ids[:, -1:], past_key_values=att.past_key_values, use_cache=True)
            assert h.runtime.stats["fused_layer_calls"] == model.config.num_hidden_layers


def test_a_changed_layer_is_caught_and_decode_stays_exact():
    """Layers that no longer compute what the fused kernels do are caught when patching: another activation in a
    later layer's MLP (by the static checks), and a layer whose forward changed (by the probe, which runs every
    layer both ways); decode then runs the modules and matches the unpatched model."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class Halved(LlamaDecoderLayer):  # a "new release" of the layer: the MLP branch scaled by one half
        def forward(self, hidden_states, **kw):
            out = super().forward(hidden_states, **kw)
            return (hidden_states + out) / 2

    ids, mask = _batch(B=2)
    for change in ("act", "layer"):
        model = tiny_model("llama")
        if change == "act":
            model.model.layers[1].mlp.act_fn = torch.nn.GELU()
        else:
            model.model.layers[1].__class__ = Halved
        with torch.no_grad():
            ref = _generate(model, ids, mask)
            with accel.patch(model, "dense") as h:
                assert h.runtime.fused is None
                out = _generate(model, ids, mask)
        _close(out, ref)
    bf = tiny_model("llama", dtype=torch.bfloat16)  # a bf16 model's probe (fp32 copies of the layer) catches it too
    bf.model.layers[1].__class__ = Halved
    with accel.patch(bf, "dense") as h:
        assert h.runtime.fused is None


def test_an_adapter_injected_after_patching_turns_the_fused_path_off():
    """A projection replaced after patching (what a LoRA injection does) is seen before the next forward."""
    model = tiny_model("qwen2")
    ids, mask = _batch(B=2)
    with torch.no_grad(), accel.patch(model, "dense") as h:
        attn = model.model.layers[1].self_attn
        old = attn.v_proj

        class Scaled(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return 2 * self.inner(x)

        attn.v_proj = Scaled(old)
        out = _generate(model, ids, mask)
        assert h.runtime.stats["fused_layer_calls"] == 0
        attn.v_proj = old
    with torch.no_grad():
        attn.v_proj = Scaled(old)
        ref = _generate(model, ids, mask)
    _close(out, ref)


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_weights_replaced_after_patching_are_used(arch):
    """The fused layers look their modules up once per patch and their parameters at every call: a parameter
    assigned after patching (packed or separate projections, a norm) or changed in place is what decode reads."""
    model = tiny_model(arch)
    ids, mask = _batch(B=2)
    with torch.no_grad(), accel.patch(model, "dense") as h:
        layer = model.model.layers[1]
        if arch == "phi3":
            a = layer.self_attn.qkv_proj
        else:
            a = layer.self_attn.k_proj
            layer.post_attention_layernorm.weight = torch.nn.Parameter(torch.rand(layer.post_attention_layernorm.weight.shape) + 0.5)
        a.weight = torch.nn.Parameter(torch.randn_like(a.weight) * 0.1)
        layer.mlp.down_proj.weight.mul_(0.5)
        out = _generate(model, ids, mask)
        assert h.runtime.stats["fused_layer_calls"] > 0
    with torch.no_grad():
        ref = _generate(model, ids, mask)
    _close(out, ref)


def test_remove_deletes_the_layer_forwards():
    model = tiny_model("mistral")
    before = [dict(layer.__dict__) for layer in model.model.layers]
    h = accel.patch(model, "dense")
    assert all("forward" in layer.__dict__ for layer in model.model.layers)
    h.remove()
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert [set(layer.__dict__) for layer in model.model.layers] == [set(d) for d in before]


def _forced_logits(model, ids, mask, follow, patch=None, configure=None):
    """Prefill ``ids`` then decode the tokens ``follow`` [B, n] one step at a time (teacher forcing: every variant
    sees the same tokens); the logits of every step, fp32, and the fused-layer count."""
    from accel import compat
    from accel.cache.accel_cache import AccelCache
    from transformers import DynamicCache

    handle = accel.patch(model, **patch) if patch is not None else None
    if configure is not None:
        configure(handle)
    try:
        with torch.no_grad():
            cache = (AccelCache(model.config, reserve=ids.shape[1] + follow.shape[1]) if handle is not None
                     else DynamicCache(config=model.config))
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        **compat.cache_kwargs(model, cache))
            logits = [out.logits[:, -1].float()]
            for j in range(follow.shape[1]):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                pos = pos[:, -1:] + 1
                out = model(input_ids=follow[:, j:j + 1], attention_mask=mask, position_ids=pos, use_cache=True,
                            **compat.cache_kwargs(model, cache))
                logits.append(out.logits[:, -1].float())
        calls = handle.runtime.stats["fused_layer_calls"] if handle is not None else 0
    finally:
        if handle is not None:
            handle.remove()
    return torch.stack(logits, 1), calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_half_fused_decode_is_closer_to_fp32_than_transformers_half(arch, dtype):
    """A bf16 or fp16 model decodes on the fused layers (16-bit weights and cache, fp32 arithmetic): on a left-padded
    batch its logits stay within 16-bit rounding of transformers' modules in that dtype, and on average closer than
    those to the fp32 arithmetic on the same weight values (the model widened to fp32; measured 15-25% closer in bf16
    on these models)."""
    import copy

    m16 = tiny_model(arch, dtype=dtype)
    m32 = copy.deepcopy(m16).float()
    ids, mask = _batch(B=2, pads=(0, 6))
    follow = torch.randint(3, 250, (2, 8), generator=torch.Generator().manual_seed(1))
    ref32, _ = _forced_logits(m32, ids, mask, follow)
    hf16, _ = _forced_logits(m16, ids, mask, follow)
    fused, calls = _forced_logits(m16, ids, mask, follow, patch={"policy": "dense"})
    modules, calls_off = _forced_logits(m16, ids, mask, follow, patch={"policy": "dense", "fused_decode": False})
    assert calls == 8 * m16.config.num_hidden_layers and calls_off == 0
    scale, mean = ref32.abs().max().item(), ref32.abs().mean().item()
    worst = {k: (v - ref32).abs().max().item() / scale for k, v in (("fused", fused), ("modules", modules), ("hf", hf16))}
    assert max(worst.values()) < 0.02, worst  # every logit within bf16 rounding of the fp32 result
    avg = {k: (v - ref32).abs().mean().item() / mean for k, v in (("fused", fused), ("hf", hf16))}
    assert avg["fused"] < avg["hf"], avg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("policy", ["hylra", "snapkv@budget_ratio=0.5"])
def test_half_fused_decode_of_lossy_policies_matches_their_module_path(policy, dtype):
    """The policies see the dtypes of the module path (16-bit q, k, v): a bf16 or fp16 model's fused decode under
    hylra and snapkv stays within 16-bit rounding of the same patch on transformers' modules, step by step."""
    m16 = tiny_model("llama", dtype=dtype)
    ids, mask = _batch(B=2, pads=(0, 6))
    follow = torch.randint(3, 250, (2, 8), generator=torch.Generator().manual_seed(2))
    kw = {"plan": hand_plan(m16.config.num_hidden_layers), "topk": 12, "sink": 2, "recent": 4,
          "chunk": 1} if policy == "hylra" else {}
    fused, calls = _forced_logits(m16, ids, mask, follow, patch={"policy": policy, **kw})
    modules, _ = _forced_logits(m16, ids, mask, follow, patch={"policy": policy, "fused_decode": False, **kw})
    assert calls == 8 * m16.config.num_hidden_layers
    # a near-tie in hylra's top-k may go the other way under a different rounding (one step's logits then move by a
    # few percent: 3.9% measured with bf16 projection inputs); on average the two stay within 16-bit rounding
    assert (fused - modules).abs().max().item() / modules.abs().max().item() < 0.05
    assert (fused - modules).abs().mean().item() / modules.abs().mean().item() < 0.01


def test_other_dtypes_and_fp16_autocast_are_refused_and_large_batches_decode_on_the_modules():
    """A float64 model on the CPU (the kernels read fp32, bf16 and fp16) is refused in one line, at patch time and
    when the model is converted after patching, and so is fp16 autocast (fp32 keys beside fp16 values); more than 8
    sequences (matrix products, not GEMV) run transformers' modules, equal to the unpatched model."""
    m64 = tiny_model("llama", dtype=torch.float64)
    with pytest.raises(accel.AccelError, match="float64 on the CPU.*model.float"):
        accel.patch(m64, "dense")
    m = tiny_model("llama")
    ids, mask = _batch(B=2)
    with accel.patch(m, "dense"):
        m.double()
        with pytest.raises(accel.AccelError, match="float64 on the CPU"), torch.no_grad():
            _generate(m, ids, mask)
        m.float()
        with pytest.raises(accel.AccelError, match="fp16 autocast on the CPU.*model.half"), torch.no_grad(), \
                torch.autocast("cpu", dtype=torch.float16):
            _generate(m, ids, mask)
    model = tiny_model("llama")
    ids, mask = _batch(B=10, pads=(0, 3) * 5)
    with torch.no_grad(), accel.patch(model, "dense") as h:
        out = _generate(model, ids, mask)
        assert h.runtime.stats["fused_layer_calls"] == 0
    with torch.no_grad():
        ref = _generate(model, ids, mask)
    _close(out, ref)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("K", [64, 80, 576, 592, 1536, 1100, 40])
def test_half_weight_gemv_matches_fp32_product(M, K, wdtype):
    """accel's GEMV on bf16 weights (the even/odd-lane kernel when K is a multiple of 16, the widening one
    otherwise) and on fp16 weights (vcvtph2ps rows for one token row, the widening blocks for several) equals the fp32
    product of the widened weights up to summation order, with and without bias."""
    from accel import _ext

    g = torch.Generator().manual_seed(M * 1000 + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(200, K, generator=g).to(wdtype)
    b = torch.randn(200, generator=g)
    C = _ext.cpu_ext()
    for bias in (None, b):
        got = C.small_m_linear(x, w, bias, 0)
        ref = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double()).float()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * K ** 0.5)


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("K", [64, 576, 1536, 592, 40])
def test_bf16_gemv_with_bf16_inputs_is_the_exact_product(M, K):
    """``x_bf16=True`` (x holds bf16 values, or may be rounded to them): where the build has AVX512_BF16 and K is a
    multiple of 32 the product runs on vdpbf16ps over x rounded to bf16, otherwise as with fp32 x; either way it equals
    the exact product of the operands the kernel multiplied, up to summation order, with and without bias. For x of
    bf16 values the two settings agree to summation order."""
    from accel import _ext

    C = _ext.cpu_ext()
    g = torch.Generator().manual_seed(M * 7 + K)
    x, w = torch.randn(M, K, generator=g) * 3, torch.randn(200, K, generator=g).to(torch.bfloat16)
    b = torch.randn(200, generator=g)
    dot = C.has_bf16_dot() and K % 32 == 0
    for bias in (None, b):
        got = C.small_m_linear(x, w, bias, 0, True)
        used = x.bfloat16().double() if dot else x.double()
        exact = torch.nn.functional.linear(used, w.double(), None if bias is None else bias.double()).float()
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5 * K ** 0.5)
        xb = x.bfloat16().float()  # bf16 values: rounding them is exact, both kernels give the same product
        torch.testing.assert_close(C.small_m_linear(xb, w, bias, 0, True), C.small_m_linear(xb, w, bias, 0, False),
                                   rtol=1e-5, atol=1e-5 * K ** 0.5)
    if dot:  # fp32 values are rounded: the difference from the fp32-input product is bf16 rounding of x, not zero
        diff = (C.small_m_linear(x, w, None, 0, True) - C.small_m_linear(x, w, None, 0, False)).abs().max().item()
        assert 0 < diff < 0.05 * K ** 0.5


def test_bf16_projection_inputs_switch_on_the_fused_path():
    """A bf16 model's fused decode rounds its projections' inputs to bf16 by default (``FusedDecode.bf16_inputs``):
    switched off, the logits differ by bf16 rounding only, and both stay within it of transformers' own bf16 path."""
    m16 = tiny_model("llama", dtype=torch.bfloat16)
    ids, mask = _batch(B=2, pads=(0, 6))
    follow = torch.randint(3, 250, (2, 8), generator=torch.Generator().manual_seed(3))
    hf, _ = _forced_logits(m16, ids, mask, follow)
    got = {}
    for on in (True, False):
        def configure(h, on=on):
            assert h.runtime.fused.bf16_inputs is True
            h.runtime.fused.bf16_inputs = on

        got[on], calls = _forced_logits(m16, ids, mask, follow, patch={"policy": "dense"}, configure=configure)
        assert calls == 8 * m16.config.num_hidden_layers
    from accel import _ext

    scale = hf.abs().max().item()
    for v in got.values():
        assert (v - hf).abs().max().item() / scale < 0.02
    assert torch.equal(got[True], got[False]) != _ext.cpu_ext().has_bf16_dot()


@pytest.mark.parametrize("native", [False, True])
def test_bf16_linear_layers_widen_on_cpus_without_bf16(monkeypatch, native):
    """A patched bf16 model's linear layers: decode rows through accel's GEMV (within bf16 rounding of the exact
    product); prefill rows, on CPUs without bf16 instructions, as the fp32 product of the widened operands rounded to
    bf16 once (exactly that, also over several output blocks), and torch's own bf16 product where the CPU has them."""
    import types

    import accel.patching.linear as L

    monkeypatch.setattr(L, "_NATIVE_BF16", native)
    monkeypatch.setattr(L, "WIDEN_BLOCK", 128)  # 300 output features: three blocks
    lin = torch.nn.Linear(576, 300).to(torch.bfloat16)
    lin.forward = types.MethodType(L._fast_forward, lin)
    g = torch.Generator().manual_seed(0)
    w, b = lin.weight, lin.bias
    for rows in (1, 8, 40):
        x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
        with torch.no_grad():
            got = lin(x)
            exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
            widened = torch.nn.functional.linear(x.float(), w.float(), b.float()).to(torch.bfloat16)
            native_ref = torch.nn.functional.linear(x, w, b)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), exact, rtol=2 ** -7, atol=1e-3)
        if rows > L.MAX_ROWS:
            assert torch.equal(got, native_ref if native else widened)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_decode_under_inference_mode_equals_no_grad(dtype):
    """torch.inference_mode makes the rotary cos/sin inference tensors (no version counter): the fused layers'
    once-per-step conversion of them must not read one."""
    model = tiny_model("llama", dtype=dtype)
    ids, mask = _batch(B=2)
    with accel.patch(model, "dense") as h:
        with torch.no_grad():
            ref = _generate(model, ids, mask)
        calls = h.runtime.stats["fused_layer_calls"]
        with torch.inference_mode():
            out = _generate(model, ids, mask)
        assert h.runtime.stats["fused_layer_calls"] > calls > 0
    _close(out, ref, tol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_half_rows_in_the_fused_halves_equal_their_fp32_widening(arch, dtype):
    """The fused halves take a bf16 or fp16 model's hidden rows as they are and return q, k, v and the layer's output
    in that dtype: bit for bit the fp32 computation on the widened rows, rounded by torch (the conversions the decode
    step used to make in Python around each call). Inputs are never written, and non-contiguous rows give the same
    result."""
    from accel import _ext
    from accel.patching.fused import _fused_halves

    C = _ext.cpu_ext()
    m = tiny_model(arch, dtype=dtype)
    layer = m.model.layers[1]
    from accel.models import get_adapter

    layout = get_adapter(m).fused_layout
    cfg = m.config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, cfg.hidden_size, generator=g).to(dtype)
    cos, sin = torch.randn(1, D, generator=g), torch.randn(1, D, generator=g)
    qkv16, post = _fused_halves(C, h, layer, layout, H, Hkv, cos, sin)
    qkv32, _ = _fused_halves(C, h.float(), layer, layout, H, Hkv, cos, sin)
    for a, b in zip(qkv16, qkv32):
        assert a.dtype == dtype and torch.equal(a, b.to(dtype))
    att = torch.randn(3, H * D, generator=g).to(dtype)
    y16 = C.fused_attn_out_mlp(h, att, *post)
    y32 = C.fused_attn_out_mlp(h.float(), att.float(), *post)
    assert y16.dtype == dtype and torch.equal(y16, y32.to(dtype))
    for x in (h, h.float()):  # the residual input is not written (an fp32 one is the kernel's own dtype)
        before = x.clone()
        C.fused_attn_out_mlp(x, att, *post)
        assert torch.equal(x, before)
    # non-contiguous rows (a transposed view) give the contiguous result, in both dtypes
    for x, a in ((h, att), (h.float(), att.float())):
        xt, at = x.t().contiguous().t(), a.t().contiguous().t()
        assert not xt.is_contiguous() and not at.is_contiguous()
        assert all(torch.equal(u, w) for u, w in zip(_fused_halves(C, xt, layer, layout, H, Hkv, cos, sin)[0],
                                                     _fused_halves(C, x, layer, layout, H, Hkv, cos, sin)[0]))
        assert torch.equal(C.fused_attn_out_mlp(xt, at, *post), C.fused_attn_out_mlp(x, a, *post))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        C.fused_attn_out_mlp(h.double(), att, *post)


@pytest.mark.exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_the_whole_stack_in_one_call_equals_the_layers_one_by_one(arch, dtype):
    """A dense decode step runs every layer in one C++ call (``FusedDecode.run_stack``): the tokens, the logits
    (bit for bit) and the cache's accounting equal the per-layer fused path's, on a left-padded batch."""
    model = tiny_model(arch).to(dtype)
    ids, mask = _batch()
    sliding = arch == "mistral"
    res = {}
    with torch.no_grad():
        for whole in (True, False):
            with accel.patch(model, "dense") as h:
                assert h.runtime.fused._stack_reason == ("sliding-window layers" if sliding else None)
                h.runtime.fused.whole_stack = whole
                out = _generate(model, ids, mask)
                res[whole] = (out, dict(h.runtime.stats), h.cache.get_seq_length(), h.cache.layers[-1].head_lengths)
    (a, sa, na, la), (b, sb, nb, lb) = res[True], res[False]
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))
    assert sa.pop("stack_calls", 0) == (0 if sliding else 9) and "stack_calls" not in sb  # every decode forward
    assert sa == sb and na == nb and torch.equal(la, lb)


def _kv_plan(name, L, Hkv):
    from accel.plan import HeadPlan, LayerPlan, Plan

    if name == "duo":  # half the heads retrieval (the largest scores), the rest streaming
        heads = lambda i: [HeadPlan(kind="streaming", score=(0.9 if (i + h) % 2 else 0.1)) for h in range(Hkv)]
    elif name == "tca":  # quotas of 1..3 tokens per block of 4
        heads = lambda i: [HeadPlan(kind="tca", budget=1 + (i + h) % 3) for h in range(Hkv)]
        return Plan(policy=name, num_layers=L, num_kv_heads=Hkv, params={"block": 4, "sink": 4, "window": 8},
                    layers=[LayerPlan(mode="compress", kv=name, heads=heads(i)) for i in range(L)])
    else:  # moa: spans of 6 + 0.25 n tokens
        heads = lambda i: [HeadPlan(kind="budget", alpha=6.0, beta=0.25) for _ in range(Hkv)]
    return Plan(policy=name, num_layers=L, num_kv_heads=Hkv,
                layers=[LayerPlan(mode="compress", kv=name, heads=heads(i)) for i in range(L)])


def _cache_state(cache):
    """Every layer's cache as the tensors that hold it (a compressed layer: each head's live rows in slot order, with
    their positions and eviction scores)."""
    out = []
    for cl in cache.layers:
        rg = cl.ragged
        if rg is None:
            out.append((cl.cumulative_length, cl.k_buf[:, :, cl.start:cl.end], cl.v_buf[:, :, cl.start:cl.end]))
        else:
            rows, live = rg.rows()
            out.append((cl.cumulative_length, rg.lengths.clone(), rg.k[rows[live]], rg.v[rows[live]],
                        rg.pos[rows[live]], rg.score[rows[live]]))
    return out


KV_STACK = [
    ("streaming", dict(sink=2, budget=10, budget_ratio=None)),
    ("snapkv", dict(budget=10, budget_ratio=None, window=4, min_budget=0)),
    ("pyramidkv", dict(budget=12, budget_ratio=None, window=4, min_budget=0)),
    ("h2o", dict(budget=10, budget_ratio=None, min_budget=0)),
    ("taskkv", dict(budget_ratio=0.3, het_fraction=0.25, sink=4, recent=8, window=8)),
    ("duo", dict(sink=4, recent=8, sparsity=0.5)),
    ("moa", dict(sparse_prefill=False)),
    ("tca", dict(block=4, sink=4, window=8)),
    ("tca", dict(block=4, sink=4, window=8, metric="context")),
    ("snapkv", dict(budget=10, budget_ratio=None, window=4, min_budget=0, decode="grow")),
]


@pytest.mark.exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", KV_STACK, ids=["-".join([n, k.get("decode", "fixed"), *k.get("metric", "").split()])
                                               for n, k in KV_STACK])
def test_the_whole_stack_runs_kv_policies_bit_for_bit(name, kw, dtype):
    """With a budgeted KV-cache policy the whole stack also runs in one call: the append into each compressed
    layer's per-head pools, the attention over them, the accumulated attention scores and the eviction happen in C++.
    The tokens, the logits, every layer's kept rows, positions and eviction scores equal the per-layer path's bit for
    bit, on a left-padded batch (a growing policy past its spare rows included)."""
    model = tiny_model("llama").to(dtype)
    ids, mask = left_padded(3, 40, (0, 5, 11), 0, high=250)
    L, Hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    if name in ("duo", "moa", "tca"):
        kw = dict(kw, plan=_kv_plan(name, L, Hkv))
    new = 70 if kw.get("decode") == "grow" else 12  # a growing head fills its 64 spare rows and is re-laid out
    res = {}
    with torch.no_grad():
        for whole in (True, False):
            with accel.patch(model, name, **kw) as h:
                assert h.runtime.fused._stack_reason is None
                h.runtime.fused.whole_stack = whole
                out = _generate(model, ids, mask, new=new)
                res[whole] = (out, dict(h.runtime.stats), _cache_state(h.cache),
                              sum(cl.ragged.num_reallocations for cl in h.cache.layers if cl.ragged is not None))
    (a, sa, ca, ga), (b, sb, cb, gb) = res[True], res[False]
    assert any(len(x) == 6 for x in ca)  # the policy compressed layers
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))
    assert sa.pop("stack_calls", 0) == new - 1 and "stack_calls" not in sb  # every decode forward
    assert sa == sb and ga == gb and (ga > 0) == (new == 70)
    for x, y in zip(ca, cb):
        assert len(x) == len(y) and x[0] == y[0] and all(torch.equal(s, t) for s, t in zip(x[1:], y[1:]))


@pytest.mark.exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", [a for a in FUSED_ARCHS if a != "mistral"])
@pytest.mark.parametrize("summaries,agg", [("float32", "max"), ("bfloat16", "max"), ("float32", "none")])
def test_the_whole_stack_runs_quest_bit_for_bit(arch, dtype, summaries, agg):
    """Quest's decode also runs in the one-call stack: its page summaries, the page selection (pages of left padding
    last, the current page always) and the attention over the chosen pages happen in C++. One generation, continued
    on the same cache, alternates between the stack and the layers one by one (each continues the summaries the
    other started); some layers go from dense (their pages cover the context) to sparse during it, and the plan's
    layers take different budgets. The tokens, the logits, the summaries, the KV bytes counted and the cache equal a
    generation that runs every step one by one, bit for bit, on a left-padded batch; with bfloat16 summaries too
    (rounded outward in C++ as in torch), and with every query head selecting its own pages (agg="none")."""
    from accel import compat
    from accel.plan import LayerPlan, Plan

    model = tiny_model(arch).to(dtype)
    ids, mask = left_padded(3, 37, (0, 6, 13), 1, high=250)
    cfg = model.config
    L, Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    # layers 1, 4, ...: a budget of max(52, T/8) tokens: dense until the context fills 14 pages of 4 (T = 53, in the
    # last leg, on the stack), then sparse
    plan = Plan(policy="quest", num_layers=L, num_kv_heads=Hkv, params={"page_size": 4, "min_topk": 52,
                                                                     "summary_dtype": summaries, "agg": agg},
                layers=[LayerPlan(mode="full" if i == 0 else "quest", attention="quest",
                                  topk=None if i % 3 == 1 else 8 + 4 * (i % 2)) for i in range(L)])
    legs = [(False, 3), (True, 6), (False, 4), (True, 7)]  # (the whole stack?, new tokens)
    res = {}
    with torch.no_grad():
        for mixed in (True, False):
            with accel.patch(model, "quest", plan=plan, min_pages=2) as h:
                fd = h.runtime.fused
                assert fd._stack_reason is None
                seq, m, cache, scores, crossed = ids, mask, None, [], []
                for whole, new in legs:
                    fd.whole_stack = whole and mixed
                    kw = compat.cache_kwargs(model, cache) if cache is not None else {}
                    out = model.generate(seq, attention_mask=m, max_new_tokens=new, min_new_tokens=new,
                                         do_sample=False, pad_token_id=0, output_scores=True,
                                         return_dict_in_generate=True, **kw)
                    cache = compat.output_cache(out)
                    m = torch.cat([m, torch.ones(3, out.sequences.shape[1] - seq.shape[1], dtype=m.dtype)], 1)
                    seq, scores = out.sequences, scores + list(out.scores)
                    crossed.append({i for i in range(L) if "quest" in h.runtime.layer_state.get(i, {})})
                metas = [h.runtime.layer_state.get(i, {}).get("quest") for i in range(L)]
                res[mixed] = (seq, scores, dict(h.runtime.stats), _cache_state(h.cache), crossed,
                              [None if x is None else (x[1].full_pages, x[1].kmin[:, :, :x[1].full_pages],
                                                       x[1].kmax[:, :, :x[1].full_pages]) for x in metas])
    (a, xa, sa, ca, ka, ma), (b, xb, sb, cb, kb, mb) = res[True], res[False]
    assert a.shape[1] == 37 + 20 and torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(xa, xb))
    assert sa.pop("stack_calls", 0) == 6 + 7 and "stack_calls" not in sb  # a continued leg starts with one token
    assert sa == sb
    ratio_layers = {i for i in range(L) if i % 3 == 1}
    assert ka == kb and ka[-1] == set(range(1, L)) and ka[-2] == set(range(1, L)) - ratio_layers  # crossed on the stack
    assert all(x is None or x[1].dtype == getattr(torch, summaries) for x in ma)
    for x, y in zip(ma, mb):
        assert (x is None) == (y is None) and (x is None or (x[0] == y[0] and torch.equal(x[1], y[1])
                                                              and torch.equal(x[2], y[2])))
    for x, y in zip(ca, cb):
        assert x[0] == y[0] and all(torch.equal(s, t) for s, t in zip(x[1:], y[1:]))


@pytest.mark.parametrize("agg", ["max", "none"])
def test_a_nan_key_reaches_the_stacks_quest_summaries_as_the_per_layer_paths(agg):
    """A NaN in a cached key (put into the partial last page of one row and KV head after the prompt) is summarised
    by the C++ stack as by torch's amin / amax: while the page is partial (re-summarised every step) and once it fills
    and is summarised for good, the summaries equal the per-layer path's, NaN included, with the NaN in that row and
    head only; the NaN reaches that row's logits the same way on both paths and the other row stays finite."""
    from accel import compat
    from accel.plan import LayerPlan, Plan

    model = tiny_model("llama")
    ids, mask = left_padded(2, 45, (0, 5), 1, high=250)
    L, Hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    plan = Plan(policy="quest", num_layers=L, num_kv_heads=Hkv, params={"page_size": 4, "min_topk": 0, "agg": agg},
                layers=[LayerPlan(mode="full" if i == 0 else "quest", attention="quest", topk=None if i == 0 else 12)
                        for i in range(L)])
    res = {}
    with torch.no_grad():
        for whole in (True, False):
            with accel.patch(model, "quest", plan=plan, min_pages=2) as h:
                fd = h.runtime.fused
                fd.whole_stack = whole
                out = model.generate(ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                     pad_token_id=0, return_dict_in_generate=True)
                cache = compat.output_cache(out)
                cl = cache.layers[1]
                assert (cl.end - cl.start) % 4 == 2  # the last page is partial: summarised again at the next step
                nan_page = (cl.end - 1 - cl.start) // 4  # it fills two steps later and is summarised as a full page
                cl.k_buf[1, 0, cl.end - 1, 3] = float("nan")
                m = torch.cat([mask, torch.ones(2, out.sequences.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
                out2 = model.generate(out.sequences, attention_mask=m, max_new_tokens=3, min_new_tokens=3,
                                      do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                                      **compat.cache_kwargs(model, cache))
                meta = h.runtime.layer_state[1]["quest"][1]
                res[whole] = (out2.sequences, out2.scores, meta.full_pages, meta.kmin[:, :, :meta.full_pages + 1].clone(),
                              meta.kmax[:, :, :meta.full_pages + 1].clone(), dict(h.runtime.stats))
    (a, xa, fa, na, ma, sa), (b, xb, fb, nb, mb, sb) = res[True], res[False]
    assert sa.pop("stack_calls", 0) == 1 + 3 and "stack_calls" not in sb and sa == sb  # a decode step of each leg
    assert torch.equal(a, b) and fa == fb
    for x, y in [*zip(xa, xb), (na, nb), (ma, mb)]:
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert fa > nan_page and bool(na[1, 0, nan_page].isnan().any()) and bool(ma[1, 0, nan_page].isnan().any())
    assert int(na.isnan().sum()) == int(na[1, 0, nan_page].isnan().sum())  # that row and head only
    assert bool(xa[0][1].isnan().any()) and not bool(xa[0][0].isnan().any())  # (min_new_tokens masks one token -inf)


def test_the_stack_runs_a_policy_decode_only_through_its_own_class_and_a_build_that_takes_it(monkeypatch):
    """A subclass that rewrites Quest's decode does not inherit the stack's Quest (its layers run one by one), and an
    extension built before Quest joined the stack keeps every Quest step on the per-layer path."""
    from accel import _ext
    from accel.policies.quest import QuestPolicy

    class Mine(QuestPolicy):
        def decode(self, ctx, query, key, value, attention_mask, scaling, **kwargs):
            return super().decode(ctx, query, key, value, attention_mask, scaling, **kwargs)

    model = tiny_model("llama")
    with accel.patch(model, Mine(topk=8, page_size=4, min_topk=0)) as h:
        assert "attends with its own decode" in h.runtime.fused._stack_reason
    real = _ext.cpu_ext()

    class OldBuild:  # the stack's entry point without the quest arguments
        def __getattr__(self, name):
            if name == "fused_decode_stack":
                return lambda *a: real.fused_decode_stack(*a)
            return getattr(real, name)

    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), accel.patch(model, "quest", topk=8, page_size=4, min_topk=0, summary_dtype="bfloat16") as h:
        want = model.generate(ids, **kw)
        assert h.runtime.stats["stack_calls"] == 5
    monkeypatch.setattr(_ext, "cpu_ext", lambda: OldBuild())
    with accel.patch(model, "quest", topk=8, page_size=4, min_topk=0) as h:
        assert h.runtime.fused._stack_reason == "the built extension predates Quest in the stack"
    with accel.patch(model, "dense") as h:
        assert h.runtime.fused._stack_reason is None

    def without_bf16(fn, words):
        def call(*a, **k):
            return fn(*a, **k)
        call.__doc__ = fn.__doc__.replace(words, "float32")
        return call

    def build_without(docs):  # an older build: the named functions' docs lack the given words
        class Build:
            def __getattr__(self, name):
                fn = getattr(real, name)
                return without_bf16(fn, docs[name]) if name in docs else fn
        return Build()

    for docs, reason in (
            # Quest in the stack, float32 summaries only: per layer, the bf16 selection in torch
            ({"fused_decode_stack": "float32 or bfloat16", "quest_select": "float32 or bfloat16"},
             "the built extension predates bfloat16 Quest summaries in the stack"),
            # Quest in the stack, one page set per KV head only: per layer, the same union read by decode_attention
            ({"fused_decode_stack": "per-query-head pages"},
             "the built extension predates per-query-head Quest pages in the stack")):
        monkeypatch.setattr(_ext, "cpu_ext", lambda docs=docs: build_without(docs))
        with torch.no_grad(), accel.patch(model, "quest", topk=8, page_size=4, min_topk=0,
                                          summary_dtype="bfloat16") as h:
            assert h.runtime.fused._stack_reason == reason
            assert torch.equal(model.generate(ids, **kw), want)
    with accel.patch(model, "quest", agg="max", topk=8, page_size=4, min_topk=0) as h:
        assert h.runtime.fused._stack_reason is None  # one page set per KV head still runs in the stack


def test_the_whole_stack_steps_aside_for_hidden_states_layer_hooks_and_other_policies():
    """Where a layer's own forward must run in between -- hidden states of every layer asked for, a hook on a
    decoder layer -- or the policy attends with its own decode, each layer runs on its own, with the same result."""
    model = tiny_model("llama")
    ids, mask = _batch(B=2)
    L = model.config.num_hidden_layers
    with torch.no_grad(), accel.patch(model, "dense") as h:
        ref = _generate(model, ids, mask)
        assert h.runtime.stats["stack_calls"] == 9
        h.runtime.stats["stack_calls"] = 0
        hs = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                            output_hidden_states=True, return_dict_in_generate=True)
        assert h.runtime.stats["stack_calls"] == 0
        seen = []
        hook = model.model.layers[1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
        out = _generate(model, ids, mask)
        hook.remove()
        assert h.runtime.stats["stack_calls"] == 0 and seen.count(1) == 9
        assert h.runtime.stats["fused_layer_calls"] >= 9 * L * 2  # still the fused layers, one by one
        h.runtime.fused.whole_stack = False
        per_layer = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                   output_hidden_states=True, return_dict_in_generate=True)
    _close(out, ref)
    for step_a, step_b in zip(hs.hidden_states, per_layer.hidden_states):  # every layer's output, every step
        assert len(step_a) == L + 1 and all(torch.equal(x, y) for x, y in zip(step_a, step_b))
    with accel.patch(model, "hylra", plan=hand_plan(L), topk=12, sink=2, recent=4, chunk=1) as h:
        assert "own decode" in h.runtime.fused._stack_reason
        with torch.no_grad():
            _generate(model, ids, mask)
        assert "stack_calls" not in h.runtime.stats and h.runtime.stats["fused_layer_calls"] == 9 * L


@pytest.mark.parametrize("in_place", [False, True])
def test_a_layer_wrapped_after_patching_turns_the_whole_stack_off(in_place):
    """A decoder layer replaced in the model's layer list after patching (a steering wrapper around a middle layer)
    must run: the stack steps aside and the result is the per-layer path's, whether the wrapper edits the hidden
    states in place or not."""
    model = tiny_model("llama")
    ids, mask = _batch(B=2)

    class Steer(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden_states, *args, **kwargs):
            if in_place:
                hidden_states.add_(0.5)
            else:
                hidden_states = hidden_states + 0.5
            return self.inner(hidden_states, *args, **kwargs)

    with torch.no_grad(), accel.patch(model, "dense") as h:
        inner = model.model.layers[1]
        model.model.layers[1] = Steer(inner)
        out = _generate(model, ids, mask)
        assert h.runtime.stats.get("stack_calls", 0) == 0
        h.runtime.fused.whole_stack = False
        ref = _generate(model, ids, mask)
        model.model.layers[1] = inner
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, ref.scores))


def _change(model, kind, dtype):
    layers = model.model.layers
    with torch.no_grad():
        if kind == "assign":  # a parameter replaced by assignment
            w = layers[1].self_attn.k_proj.weight
            layers[1].self_attn.k_proj.weight = torch.nn.Parameter(torch.randn_like(w) * 0.1)
        elif kind == "inplace":  # a norm weight changed in place
            layers[0].input_layernorm.weight.mul_(1.5)
        elif kind == "epsilon":
            layers[-1].post_attention_layernorm.variance_epsilon = 1e-2
        elif kind == "data":  # the same parameter object, new storage
            n = layers[0].post_attention_layernorm
            n.weight.data = torch.rand_like(n.weight) + 0.5
        elif kind == "to":  # the whole model converted: every parameter keeps its object, changes its storage
            model.to(torch.bfloat16 if dtype == torch.float32 else torch.float16)


@pytest.mark.parametrize("kind", ["assign", "inplace", "epsilon", "data", "to"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stack_sees_weights_changed_between_decode_steps(dtype, kind):
    """The whole-stack call reuses its per-layer weight tuples from step to step (``FusedDecode._stack_weights``) only
    while they are what the modules hold: each change below, made after the stack has run with the tuples reused,
    gives the numbers of a fresh patch of the changed model, bit for bit (a parameter assigned, a norm weight changed
    in place, an epsilon changed, a parameter's storage swapped with ``.data``, the model converted with ``.to``)."""
    model = tiny_model("llama", dtype=dtype)
    ids, mask = _batch(B=2)
    with torch.no_grad():
        h = accel.patch(model, "dense")
        _generate(model, ids, mask)
        fd = h.runtime.fused
        memo = fd._weights_memo
        assert memo is not None and h.runtime.stats["stack_calls"] > 0
        _generate(model, ids, mask)
        assert fd._weights_memo is memo  # nothing changed: reused
        calls = h.runtime.stats["stack_calls"]
        _change(model, kind, dtype)
        out = _generate(model, ids, mask)
        assert h.runtime.stats["stack_calls"] > calls and fd._weights_memo is not memo
        h.remove()
        with accel.patch(model, "dense"):
            ref = _generate(model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    for x, y in zip(out.scores, ref.scores):
        assert torch.equal(x, y)
