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


def test_weights_replaced_after_patching_are_used():
    model = tiny_model("phi3")
    ids, mask = _batch(B=2)
    with torch.no_grad(), accel.patch(model, "dense") as h:
        layer = model.model.layers[1]
        layer.self_attn.qkv_proj.weight = torch.nn.Parameter(torch.randn_like(layer.self_attn.qkv_proj.weight) * 0.1)
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


def test_bf16_models_and_large_batches_decode_on_the_modules():
    """bf16 (the fused layers are fp32 arithmetic) and more than 8 sequences (matrix products, not GEMV) run
    transformers' modules, equal to the unpatched model."""
    m16 = tiny_model("llama", dtype=torch.bfloat16)
    ids, mask = _batch(B=2)
    with torch.no_grad():
        ref = _generate(m16, ids, mask)
        with accel.patch(m16, "dense") as h:
            out = _generate(m16, ids, mask)
            assert h.runtime.fused is None
    assert torch.equal(out.sequences, ref.sequences)
    model = tiny_model("llama")
    ids, mask = _batch(B=10, pads=(0, 3) * 5)
    with torch.no_grad(), accel.patch(model, "dense") as h:
        out = _generate(model, ids, mask)
        assert h.runtime.stats["fused_layer_calls"] == 0
    with torch.no_grad():
        ref = _generate(model, ids, mask)
    _close(out, ref)
