"""Every generate() feature users call, for ``dense``, a layer-reuse policy (``hylra``) and a KV policy (``snapkv``):
each either equals unpatched transformers (exactly, at budgets that cover the prompt) or is refused at generate()
entry with an error naming the feature. Tiny random Llama models with a word-level tokenizer built in memory (no
download), so pipelines, streamers and chat templates run as users call them."""
import threading

import pytest
import torch

import accel
from accel import compat
from accel.errors import InputError

from .conftest import hand_plan, model4

VOCAB = 256


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="w3")
    tok.chat_template = ("{% for m in messages %}w4 {{ m['content'] }} w5 {% endfor %}"
                         "{% if add_generation_prompt %}w6{% endif %}")
    return tok


def text(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(7, VOCAB, (n,), generator=g))


def ids_of(n, seed=0, B=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(7, VOCAB, (B, n), generator=g)


# the three policies of the matrix, each at a budget that covers the prompt (so "equal to unpatched" is exact)
POLICIES = {
    "dense": dict(policy="dense"),
    "hylra": dict(policy="hylra", plan=None, topk=4096),
    "snapkv": dict(policy="snapkv", budget_ratio=1.0),
}


def patched(m, name, **extra):
    kw = dict(POLICIES[name])
    if name == "hylra":
        kw["plan"] = hand_plan()
    kw.update(extra)
    return accel.patch(m, **kw)


@pytest.fixture(scope="module")
def model():
    return model4("llama")


@pytest.fixture(params=list(POLICIES))
def pol(request):
    return request.param


def greedy(m, ids, **kw):
    return m.generate(ids, max_new_tokens=kw.pop("new", 10), do_sample=False, pad_token_id=0, **kw)


# -- equal to unpatched ---------------------------------------------------------------------------------------
@pytest.mark.exactness
def test_greedy_with_scores_and_hidden_states(model, pol):
    ids = ids_of(40)
    kw = dict(return_dict_in_generate=True, output_scores=True, output_hidden_states=True)
    ref = greedy(model, ids, **kw)
    with patched(model, pol) as h:
        out = greedy(model, ids, **kw)
        assert isinstance(compat.output_cache(out), accel.AccelCache) and h.cache.nbytes() > 0
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.scores, ref.scores)) < 1e-4
    for step_a, step_b in zip(out.hidden_states, ref.hidden_states):
        for a, b in zip(step_a, step_b):
            assert (a - b).abs().max().item() < 1e-4


@pytest.mark.exactness
def test_sampling_with_a_seed(model, pol):
    ids = ids_of(30, 1)
    torch.manual_seed(7)
    ref = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0,
                         num_return_sequences=2)
    with patched(model, pol):
        torch.manual_seed(7)
        out = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0,
                             num_return_sequences=2)
    assert torch.equal(out, ref)


@pytest.mark.exactness
def test_beam_search_with_several_returned_sequences(model, pol):
    ids = ids_of(30, 2)
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    with patched(model, pol):
        out = model.generate(ids, **kw)
    assert torch.equal(out, ref)


@pytest.mark.exactness
def test_text_streamer_and_iterator_streamer(model, pol, capsys):
    from transformers import TextIteratorStreamer, TextStreamer

    tok = tokenizer()
    enc = tok([text(30, 3)], return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = tok.decode(ref[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    with patched(model, pol):
        capsys.readouterr()
        model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0,
                       streamer=TextStreamer(tok, skip_prompt=True))
        printed = capsys.readouterr().out
        it = TextIteratorStreamer(tok, skip_prompt=True)
        th = threading.Thread(target=model.generate, kwargs=dict(**enc, max_new_tokens=8, do_sample=False,
                                                                   pad_token_id=0, streamer=it))
        th.start()
        pieces = "".join(it)
        th.join()
    assert printed.strip() == want.strip() and pieces.strip() == want.strip()


@pytest.mark.exactness
def test_pipeline_and_chat_template(model, pol):
    from transformers import pipeline

    tok = tokenizer()
    msgs = [{"role": "user", "content": text(20, 4)}]
    chat_ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = chat_ids["input_ids"]
    ref_chat = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    ref_pipe = pipe(text(25, 5), max_new_tokens=8, do_sample=False)[0]["generated_text"]
    with patched(model, pol) as h:
        out_chat = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        got_pipe = pipe(text(25, 5), max_new_tokens=8, do_sample=False)[0]["generated_text"]
        assert h.cache is not None and h.cache.nbytes() > 0  # the pipeline's generate ran on accel's cache
    assert torch.equal(out_chat, ref_chat)
    assert got_pipe == ref_pipe


@pytest.mark.exactness
def test_multi_turn_reuse_of_the_returned_cache(model, pol):
    turn1, turn2 = ids_of(30, 6), ids_of(12, 7)

    def two_turns():
        a = model.generate(turn1, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        ids2 = torch.cat([a.sequences, turn2], 1)
        b = model.generate(ids2, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           **compat.cache_kwargs(model, compat.output_cache(a)))
        return a.sequences, b

    ref = two_turns()
    with patched(model, pol):
        out = two_turns()
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.exactness
def test_hand_written_decode_loop(model, pol):
    ids = ids_of(25, 8)

    def loop():
        out = model(ids, use_cache=True)
        toks, cache = [], compat.output_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(8):
            toks.append(nxt)
            out = model(nxt, use_cache=True, **compat.cache_kwargs(model, cache))
            cache = compat.output_cache(out)
            nxt = out.logits[:, -1:].argmax(-1)
        return torch.cat(toks, 1), cache

    ref, _ = loop()
    with patched(model, pol):
        out, cache = loop()
        assert isinstance(cache, accel.AccelCache)
    assert torch.equal(out, ref)


@pytest.mark.exactness
def test_user_provided_caches(model, pol):
    from transformers import DynamicCache

    ids = ids_of(30, 9)
    ref = greedy(model, ids)
    with patched(model, pol):
        for cache in (accel.AccelCache(model.config), DynamicCache(config=model.config)):  # empty: accel's is used
            out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                                 **compat.cache_kwargs(model, cache))
            assert torch.equal(out.sequences, ref)
            assert isinstance(compat.output_cache(out), accel.AccelCache)


@pytest.mark.exactness
def test_two_threads_share_one_patched_model(model, pol):
    prompts = [ids_of(40, 10), ids_of(33, 11)]
    refs = [greedy(model, p, new=12) for p in prompts]
    outs, errors = [None, None], []

    def work(i):
        try:
            for _ in range(2):
                outs[i] = greedy(model, prompts[i], new=12)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with patched(model, pol):
        ths = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
    assert not errors, errors
    assert all(torch.equal(o, r) for o, r in zip(outs, refs))


@pytest.mark.exactness
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bf16(pol, dtype):
    m = model4("llama").to(dtype)
    ids = ids_of(30, 12)
    kw = dict(return_dict_in_generate=True, output_scores=True)
    ref = greedy(m, ids, new=6, **kw)
    with patched(m, pol):
        out = greedy(m, ids, new=6, **kw)
    # 16-bit rounding differs between accel's kernel (fp32 accumulation) and SDPA: compare the first step's logits
    # within bf16 precision (fp16's is finer), and the tokens wherever the reference's top-2 margin is not a rounding tie
    assert (out.scores[0].float() - ref.scores[0].float()).abs().max().item() < 0.05
    top2 = ref.scores[0].float().topk(2).values
    if (top2[0, 0] - top2[0, 1]).item() > 0.1:
        assert out.sequences[0, ids.shape[1]].item() == ref.sequences[0, ids.shape[1]].item()


def test_save_pretrained_while_patched_saves_the_plain_model(model, pol, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = ids_of(20, 13)
    ref = greedy(model, ids)
    with patched(model, pol):
        model.save_pretrained(tmp_path)
        assert torch.equal(greedy(model, ids), ref)
    cfg = (tmp_path / "config.json").read_text()
    assert '"accel"' not in cfg
    again = AutoModelForCausalLM.from_pretrained(tmp_path, use_kernels=False).eval()
    assert again.config._attn_implementation != "accel"
    assert torch.equal(greedy(again, ids), ref)


def test_output_attentions_dense_equals_unpatched_eager():
    m = model4("llama")
    m.set_attn_implementation("eager")  # unpatched SDPA returns no attention maps; eager does
    ids = ids_of(30, 14)
    kw = dict(return_dict_in_generate=True, output_scores=True, output_attentions=True)
    ref = greedy(m, ids, new=6, **kw)
    with patched(m, "dense"):
        out = greedy(m, ids, new=6, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.attentions) == len(ref.attentions) == 6
    for sa, sb in zip(out.attentions, ref.attentions):
        assert len(sa) == len(sb) == 4
        for a, b in zip(sa, sb):
            assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5


def test_output_attentions_set_on_the_config():
    m = model4("llama")
    m.set_attn_implementation("eager")
    m.config.output_attentions = True
    ids = ids_of(30, 15)
    ref = m(ids).attentions
    with patched(m, "dense"):
        got = m(ids).attentions
    assert len(got) == len(ref) == 4 and all((a - b).abs().max().item() < 1e-5 for a, b in zip(got, ref))
    with patched(m, "snapkv"):
        _refused(lambda: m(ids), "output_attentions")


def test_gemma_style_cache_implementation_hybrid_and_dynamic_are_served(model, pol):
    ids = ids_of(20, 25)
    ref = greedy(model, ids)
    with patched(model, pol):
        for impl in ("dynamic", "hybrid"):
            assert torch.equal(greedy(model, ids, cache_implementation=impl), ref)


def test_use_cache_false_is_refused_for_kv_policies(model):
    with patched(model, "snapkv"):
        _refused(lambda: model(ids_of(20, 26), use_cache=False), "use_cache=False")


def test_deepcopy_of_a_patched_model_is_refused(model):
    import copy

    with patched(model, "dense"):
        with pytest.raises(accel.AccelError, match="cannot be deep-copied"):
            copy.deepcopy(model)
    copy.deepcopy(model)  # unpatched again: fine


def test_handle_cache_sees_a_generation_of_another_thread(model):
    ids = ids_of(20, 27)
    with patched(model, "dense") as h:
        th = threading.Thread(target=greedy, args=(model, ids))
        th.start()
        th.join()
        assert h.cache is not None and h.cache.get_seq_length() == 29
    assert h.runtime.last_cache is None and h.runtime.cache is None  # remove() dropped every thread's state


def test_assisted_and_prompt_lookup_decoding_dense_equal_unpatched(model):
    ids = torch.cat([ids_of(20, 15), ids_of(20, 15)], 1)  # repeats, so prompt lookup drafts something
    helper = model4("llama", seed=3)
    for kw in (dict(assistant_model=helper), dict(prompt_lookup_num_tokens=3)):
        ref = greedy(model, ids, **kw)
        with patched(model, "dense"):
            out = greedy(model, ids, **kw)
        assert torch.equal(out, ref), kw


# -- refused at generate() entry, with the feature named ------------------------------------------------------
def _refused(fn, *words):
    with pytest.raises(InputError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_static_cache_is_refused(model, pol):
    from transformers import StaticCache

    ids = ids_of(20, 16)
    with patched(model, pol):
        _refused(lambda: greedy(model, ids, cache_implementation="static"), "cache_implementation", "static")
        sc = StaticCache(config=model.config, max_cache_len=64)
        _refused(lambda: greedy(model, ids, **compat.cache_kwargs(model, sc)), "StaticCache")


def test_a_filled_foreign_cache_is_refused(model, pol):
    out = model(ids_of(20, 17), use_cache=True)  # unpatched: transformers' DynamicCache, 20 tokens
    with patched(model, pol):
        _refused(lambda: model(ids_of(1, 18), use_cache=True, **compat.cache_kwargs(model, compat.output_cache(out))),
                 "DynamicCache holding 20 tokens")


@pytest.mark.parametrize("name", ["hylra", "snapkv"])
def test_assisted_and_prompt_lookup_refused_for_non_dense_policies(model, name):
    ids = ids_of(30, 19)
    helper = model4("llama", seed=3)
    calls = []
    spy = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with patched(model, name):
            _refused(lambda: greedy(model, ids, assistant_model=helper), "assistant_model", name)
            _refused(lambda: greedy(model, ids, prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens")
    finally:
        spy.remove()
    assert not calls  # refused before any forward ran


@pytest.mark.parametrize("name", ["hylra", "snapkv"])
def test_output_attentions_refused_for_non_dense_policies(model, name):
    with patched(model, name):
        _refused(lambda: greedy(model, ids_of(20, 20), output_attentions=True, return_dict_in_generate=True),
                 "output_attentions")


def test_over_long_generation_is_refused_before_it_starts(model, pol):
    ids = ids_of(500, 21)  # the model's context window is 512 tokens
    calls = []
    spy = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with patched(model, pol):
            _refused(lambda: greedy(model, ids, new=20), "520 tokens", "512")
            out = greedy(model, ids, new=12)  # fits
    finally:
        spy.remove()
    assert out.shape[1] == 512 and len(calls) == 12


# -- KV budget floor -----------------------------------------------------------------------------------------
def test_kv_budget_floor_keeps_a_short_prompt_whole(model):
    ids = ids_of(20, 22)
    ref = greedy(model, ids)
    with accel.patch(model, policy="snapkv") as h:  # the default 25% of 20 tokens would be 5 per head
        out = greedy(model, ids)
        layers = h.cache.layers
        assert all(layer.ragged is None for layer in layers)  # 20 tokens < the 32-token floor: nothing dropped
    assert torch.equal(out, ref)
    with accel.patch(model, policy="snapkv", min_budget=0) as h:  # the floor is switchable
        greedy(model, ids)
        assert any(layer.ragged is not None for layer in h.cache.layers)


def test_kv_budget_floor_applies_to_longer_prompts(model):
    ids = ids_of(100, 23)
    with accel.patch(model, policy="snapkv", budget_ratio=0.1) as h:  # 10 tokens asked, 32 kept
        greedy(model, ids, new=2)
        kept = h.cache.layers[0].ragged.lengths
    assert int(kept.min()) >= 32


# -- the take-over check -------------------------------------------------------------------------------------
def test_take_over_check_refuses_a_forward_that_bypassed_accel(model):
    ids = ids_of(20, 24)
    with accel.patch(model, policy="dense"):
        saved = [(c, c._attn_implementation_internal) for c in {id(m.config): m.config for m in model.modules()
                                                                if hasattr(m, "config")}.values()]
        model.config._attn_implementation_internal = "sdpa"  # what a release that ignored accel's registry would do
        try:
            with pytest.raises(accel.AccelError, match="did not route attention through accel"):
                model(ids)
        finally:
            for c, v in saved:
                c._attn_implementation_internal = v
        model(ids)  # back to accel: passes


def test_transformers_version_window(monkeypatch):
    from accel.errors import AccelError

    monkeypatch.setattr(compat, "transformers_version", lambda: "5.99.0")
    with pytest.raises(AccelError, match="outside the releases accel is tested on"):
        compat.check_transformers_version()
    monkeypatch.setenv("ACCEL_ALLOW_UNTESTED_TRANSFORMERS", "1")
    compat.check_transformers_version()
    monkeypatch.setattr(compat, "transformers_version", lambda: compat.TRANSFORMERS_MIN)
    monkeypatch.delenv("ACCEL_ALLOW_UNTESTED_TRANSFORMERS")
    compat.check_transformers_version()


def test_remove_leaves_no_generate_guard_and_no_hooks(model, pol):
    before = (dict(model.__dict__.get("_forward_hooks", {})), dict(model._forward_pre_hooks), model.config._attn_implementation)
    with patched(model, pol):
        assert "generate" in model.__dict__  # the entry check
    assert "generate" not in model.__dict__ and "forward" not in model.model.__dict__
    assert (dict(model._forward_hooks), dict(model._forward_pre_hooks), model.config._attn_implementation) == before
