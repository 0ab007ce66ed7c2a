"""The dense policy on every supported architecture: same greedy tokens as the unpatched model,
logits within fp32 tolerance, batch 1 and batch 3 with left padding, sampling, streaming, remove()."""
import copy

import pytest
import torch

import accel
from accel import compat
from accel.cache import AccelCache

from .conftest import ARCHS, left_padded, tiny_model


def _batch(seed=0, B=3, L=40, pads=(0, 7, 19)):
    return left_padded(B, L, pads, seed)


@pytest.mark.exactness
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_dense_matches_unpatched(arch, batch):
    model = tiny_model(arch)
    ids, mask = _batch(B=batch)
    gen = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref_tokens = model.generate(ids, attention_mask=mask, **gen)
        ref_out = model.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **gen)
        with accel.patch(model, "dense") as h:
            out = model.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **gen)
            assert isinstance(h.cache, AccelCache), "generate() must run on accel's cache"
    assert torch.equal(out.sequences, ref_tokens)
    for s_ref, s in zip(ref_out.scores, out.scores):
        finite = torch.isfinite(s_ref)
        torch.testing.assert_close(s[finite], s_ref[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_long_decode_crosses_sliding_window_and_growth(arch):
    """60 new tokens past a 40-token prompt: crosses the 16-token windows of Mistral/Gemma3 and the
    cache's buffer growth; logits of every step match the unpatched model."""
    model = tiny_model(arch, seed=1)
    ids, mask = _batch(B=2, pads=(0, 5))
    gen = dict(max_new_tokens=60, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **gen)
        with accel.patch(model, "dense"):
            out = model.generate(ids, attention_mask=mask, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-4, atol=1e-4)


def test_sampling_same_seed_same_tokens():
    model = tiny_model("llama")
    ids, mask = _batch(B=2, pads=(0, 3))
    gen = dict(max_new_tokens=20, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0)
    torch.manual_seed(123)
    ref = model.generate(ids, attention_mask=mask, **gen)
    with accel.patch(model, "dense"):
        torch.manual_seed(123)
        out = model.generate(ids, attention_mask=mask, **gen)
    assert torch.equal(ref, out)


def test_text_streamer_receives_every_token():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append("end")

    model = tiny_model("qwen2")
    ids = torch.randint(3, 256, (1, 12))
    st = Collect()
    with accel.patch(model, "dense"):
        out = model.generate(ids, max_new_tokens=9, do_sample=False, streamer=st, pad_token_id=0)
    assert st.chunks[-1] == "end"
    streamed = torch.cat([c.reshape(-1) for c in st.chunks[1:-1]])
    assert torch.equal(streamed, out[0, 12:])


def test_remove_restores_model_exactly():
    model = tiny_model("gemma3_text")
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    before_cfg = copy.deepcopy(model.config.to_dict())
    before_impl = model.config._attn_implementation
    before_hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    before_repr = repr(model)
    ids = torch.randint(3, 256, (1, 30))
    with torch.no_grad():
        ref = model(ids).logits
    h = accel.patch(model, "dense")
    assert model.config._attn_implementation == "accel"
    with torch.no_grad():
        model.generate(ids, max_new_tokens=5, do_sample=False)
    h.remove()
    assert model.config._attn_implementation == before_impl
    assert model.config.to_dict() == before_cfg
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == before_hooks
    assert repr(model) == before_repr
    assert not any("forward" in m.__dict__ for m in model.modules()), "instance-bound forwards must be gone"
    after_sd = model.state_dict()
    assert before_sd.keys() == after_sd.keys()
    assert all(torch.equal(before_sd[k], after_sd[k]) for k in before_sd)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    # a removed handle can be removed again harmlessly, and the model can be patched again
    h.remove()
    accel.patch(model, "dense").remove()


@pytest.mark.exactness
def test_forward_without_generate_uses_accel_cache():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 10))
    with accel.patch(model, "dense") as h, torch.no_grad():
        out = model(ids, use_cache=True)
        assert isinstance(compat.output_cache(out), AccelCache)
        nxt = out.logits[:, -1:].argmax(-1)
        out2 = model(nxt, use_cache=True, **compat.cache_kwargs(model, compat.output_cache(out)))
        assert compat.output_cache(out2).get_seq_length() == 11
        assert h.cache is compat.output_cache(out2)
