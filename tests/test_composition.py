"""An attention policy and a KV-cache policy composed on one model: both are called, in order, on
every layer, and the plan records both."""
from dataclasses import dataclass

import pytest
import torch

import accel
from accel.policies.base import ComposedPolicy, KVCachePolicy
from accel.policies.registry import _REGISTRY, make_policy, register_policy

from .conftest import tiny_model


@pytest.fixture
def recorder():
    calls = []

    @register_policy("test_recorder")
    @dataclass
    class Recorder(KVCachePolicy):
        budget: int = 16

        def validate(self):
            if self.budget < 1:
                raise accel.AccelError(f"test_recorder: budget must be >= 1, got {self.budget}")

        def after_prefill(self, ctx, query, attention_mask):
            calls.append(("prefill", ctx.layer_idx, ctx.cache_layer.get_seq_length()))

        def after_decode(self, ctx, query, attention_mask):
            calls.append(("decode", ctx.layer_idx, ctx.cache_layer.get_seq_length()))

    yield calls
    _REGISTRY.pop("test_recorder", None)


def test_dense_plus_kv_policy(recorder):
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 10))
    ref = model.generate(ids, max_new_tokens=4, do_sample=False)
    with accel.patch(model, "dense+test_recorder", **{"test_recorder.budget": 32}) as h:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert isinstance(h.policy, ComposedPolicy) and h.policy.name == "dense+test_recorder"
        assert h.policy.kv[0].budget == 32
        assert all(lp.kv == "test_recorder" and lp.attention == "dense" for lp in h.plan.layers)
        assert h.plan.params["test_recorder.budget"] == 32
    assert torch.equal(ref, out)
    assert recorder[:2] == [("prefill", 0, 10), ("prefill", 1, 10)]
    assert recorder[2:] == [("decode", layer, 10 + step) for step in (1, 2, 3) for layer in (0, 1)]


def test_composition_errors(recorder):
    with pytest.raises(accel.AccelError, match="budget must be >= 1"):
        make_policy("dense+test_recorder", {"test_recorder.budget": 0})
    with pytest.raises(accel.AccelError, match="names policy 'nope'"):
        make_policy("dense+test_recorder", {"nope.x": 1})
    with pytest.raises(accel.AccelError, match="at most one attention policy"):
        make_policy("dense+dense")
