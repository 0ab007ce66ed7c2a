"""Bad input gets a clear error naming the problem and the fix."""
import pytest
import torch

import accel
from accel.errors import AlreadyPatchedError, InputError, UnknownPolicyError, UnsupportedModelError

from .conftest import tiny_model


def test_unknown_policy_lists_valid_names():
    model = tiny_model("llama")
    with pytest.raises(UnknownPolicyError, match="Registered policies: .*dense"):
        accel.patch(model, "dnese")
    with pytest.raises(UnknownPolicyError, match="Did you mean 'dense'"):
        accel.patch(model, "dnese")
    assert model.config._attn_implementation == "sdpa"  # nothing half-applied


def test_unknown_override_names_the_options():
    model = tiny_model("llama")
    with pytest.raises(accel.AccelError, match="has no option"):
        accel.patch(model, "dense", topk=5)
    with pytest.raises(accel.AccelError, match="did you mean 'budget_ratio' for 'budget_rato'"):
        accel.patch(model, "snapkv", budget_rato=0.25)
    assert model.config._attn_implementation == "sdpa"  # nothing half-applied


def test_an_option_declared_as_a_number_given_text_is_refused_in_one_line():
    """Every policy's numeric knobs, not only those its own ``validate`` converts: text (from ``--set`` or
    ``policy@knob=``) and booleans are refused naming the knob; ints where floats are declared pass."""
    model = tiny_model("llama")
    for policy, kw, words in [("quest", dict(topk_ratio="abc"), "quest: topk_ratio must be a number (float or None)"),
                              ("snapkv", dict(budget_ratio="x"), "snapkv: budget_ratio must be a number"),
                              ("hylra", dict(topk="8"), "hylra: topk must be a number (int or None), got '8'"),
                              ("quest", dict(page_size=True), "quest: page_size must be a number (int), got True")]:
        with pytest.raises(accel.AccelError, match=words.replace("(", r"\(").replace(")", r"\)")):
            accel.patch(model, policy, **kw)
    assert model.config._attn_implementation == "sdpa"  # nothing half-applied
    with accel.patch(model, "quest", topk_ratio=1, topk=None):
        pass


def test_patch_of_something_that_is_not_a_model_is_one_line():
    for bad in (None, "smollm2-135m"):
        with pytest.raises(accel.AccelError, match="takes a loaded transformers model"):
            accel.patch(bad, "hylra")


def test_unsupported_model_lists_supported_types():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="Supported model types: gemma3_text, llama, mistral, phi3, qwen2, qwen3"):
        accel.patch(m, "dense")


def test_patching_twice():
    model = tiny_model("llama")
    h = accel.patch(model, "dense")
    with pytest.raises(AlreadyPatchedError, match="already patched.*remove"):
        accel.patch(model, "dense")
    h.remove()


def test_prompt_longer_than_context():
    model = tiny_model("llama")  # max_position_embeddings=256
    ids = torch.randint(3, 256, (1, 300))
    with accel.patch(model, "dense"), pytest.raises(InputError, match="exceeds the model's context window of 256"):
        model.generate(ids, max_new_tokens=2)
    ids = torch.randint(3, 256, (1, 250))
    with accel.patch(model, "dense"), pytest.raises(InputError, match="context window"):
        model.generate(ids, max_new_tokens=20, do_sample=False)


def test_empty_prompt():
    model = tiny_model("llama")
    with accel.patch(model, "dense"), pytest.raises(InputError, match="empty prompt"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_right_padding_is_refused():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    with accel.patch(model, "dense"), pytest.raises(InputError, match="padding_side = 'left'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_bad_plan_file(tmp_path):
    model = tiny_model("llama")
    p = tmp_path / "plan.json"
    p.write_text("{not json")
    with pytest.raises(accel.PlanValidationError, match="not valid JSON"):
        accel.patch(model, "dense", plan=p)
    with pytest.raises(accel.PlanValidationError, match="does not exist"):
        accel.patch(model, "dense", plan=tmp_path / "missing.json")


def test_decode_goes_through_accel_kernel(monkeypatch):
    """Guard against a silent fallback: every decode step of every layer calls accel's op."""
    import accel.attention.decode as af

    calls = []
    real = af.decode_attention

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(af, "decode_attention", spy)
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 12))
    with accel.patch(model, "dense") as h:
        model.generate(ids, max_new_tokens=6, do_sample=False)
        # the dense decoder stack runs every layer's attention inside one C++ call per step
        assert h.runtime.stats["stack_calls"] == 5 and h.runtime.stats["decode_layer_calls"] == 2 * 5 and not calls
        h.runtime.fused.whole_stack = False
        model.generate(ids, max_new_tokens=6, do_sample=False)
    assert len(calls) == 2 * 5  # 2 layers x 5 decode steps (the first new token comes from prefill)


def test_a_quest_plan_whose_options_quest_would_refuse_is_refused_at_patch():
    """A plan's ``params`` (and a layer's) override quest's options at run time; an edited plan file with a value the
    options would refuse (a mistyped ``summary_dtype``, a page size of 0) is refused at ``patch`` in one line naming
    where, not with a KeyError after the prefill. A text or list ``summary_dtype`` option is refused the same way."""
    from accel.models.registry import get_adapter
    from accel.policies.quest import QuestPolicy

    model = tiny_model("llama")
    info = get_adapter(model).info()
    plan = QuestPolicy().build_plan(info)
    plan.params["summary_dtype"] = "bf16"
    with pytest.raises(accel.AccelError, match=r"^params: quest: summary_dtype must be 'bfloat16' or 'float32', got 'bf16'$"):
        accel.patch(model, "quest", plan=plan)
    plan = QuestPolicy().build_plan(info)
    plan.layers[1].params = {"page_size": 0}
    with pytest.raises(accel.AccelError, match=r"^layers\[1\]\.params: quest: page_size must be an integer >= 1, got 0$"):
        accel.patch(model, "quest", plan=plan)
    for bad in ("[1]", "{}"):
        with pytest.raises(accel.AccelError, match="summary_dtype must be 'bfloat16' or 'float32'"):
            accel.patch(model, f"quest@summary_dtype={bad}")
    from accel.policies.hip import HiPPolicy  # hip reads its knobs through the plan the same way

    plan = HiPPolicy().build_plan(info)
    plan.params["representative"] = "centre"
    with pytest.raises(accel.AccelError, match=r"^params: hip: representative must be"):
        accel.patch(model, "hip", plan=plan)
    assert model.config._attn_implementation == "sdpa"  # nothing half-applied


def test_an_option_the_plan_sets_otherwise_is_refused_and_the_plan_alone_runs():
    """quest and hip read their knobs through the plan (the plan's ``params``, a layer's ``params`` and ``topk``
    win over the options, so an edited plan file takes effect). An option the user set explicitly that the plan
    sets to another value would be silently dropped: it is refused at ``patch`` in one line naming both values.
    The same option with the plan's value, an option the plan does not set, and the plan alone all run."""
    from accel.models.registry import get_adapter
    from accel.policies.hip import HiPPolicy
    from accel.policies.quest import QuestPolicy

    model = tiny_model("llama")
    info = get_adapter(model).info()
    ids = torch.randint(3, 256, (2, 40))
    plan = QuestPolicy(topk_ratio=0.25, dense_layers=0, min_topk=8).build_plan(info)  # sparse on the 2 layers
    msg = r"^quest: option topk_ratio=0\.5 contradicts the plan's params topk_ratio=0\.25; drop the option"
    with pytest.raises(accel.AccelError, match=msg):
        accel.patch(model, "quest", plan=plan, topk_ratio=0.5)
    with pytest.raises(accel.AccelError, match=msg):
        accel.patch(model, "quest@topk_ratio=0.5", plan=plan)
    with pytest.raises(accel.AccelError, match=msg):
        accel.patch(model, QuestPolicy(topk_ratio=0.5), plan=plan)  # a policy object: knobs off their defaults
    assert model.config._attn_implementation == "sdpa"
    plan.layers[1].params = {"page_size": 8}
    with pytest.raises(accel.AccelError, match=r"^quest: option page_size=4 contradicts the plan's layers\[1\]\.params"):
        accel.patch(model, "quest", plan=plan, page_size=4)
    plan.layers[1].params = {}
    with pytest.raises(accel.AccelError, match=r"^quest: option topk=32 contradicts the plan's params topk=None"):
        accel.patch(model, "quest", plan=plan, topk=32)  # the plan's None (its ratio) would win
    del plan.params["topk"]
    plan.layers[1].topk = 16
    with pytest.raises(accel.AccelError, match=r"^quest: option topk=32 contradicts the plan's layers\[1\] topk=16"):
        accel.patch(model, "quest", plan=plan, topk=32)
    with pytest.raises(accel.AccelError, match=r"^quest: option topk_ratio=0\.25 contradicts the plan's layers\[1\] topk=16"):
        accel.patch(model, "quest", plan=plan, topk_ratio=0.25)  # the ratio would not be used on layer 1
    plan.layers[1].topk = None
    plan.layers[0].mode, plan.layers[0].params = "full", {"page_size": 8}  # a dense layer reads no quest option
    with accel.patch(model, "quest", plan=plan, page_size=4):
        pass
    plan.layers[0].mode, plan.layers[0].params = "quest", {}
    outs = []
    for kw in ({}, {"topk_ratio": 0.25}, {"topk_ratio": 1 / 4, "min_pages": 3}):  # agreeing options run the plan
        with accel.patch(model, "quest", plan=plan, **kw):
            outs.append(model.generate(ids, max_new_tokens=4, do_sample=False))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    plan = HiPPolicy().build_plan(info)
    with pytest.raises(accel.AccelError, match=r"^hip: option key_block=8 contradicts the plan's params key_block="):
        accel.patch(model, "hip", plan=plan, key_block=8)
    assert model.config._attn_implementation == "sdpa"
