"""The cluttered-digits task and its project-trained VLM pair (accel.research.cluttered_vlm): the canvases put every
digit where its labels say, each question names exactly one digit, the small model is the large model's language
model cut to its first layers, training leaves the language model frozen, and a guided pair runs end to end."""
import pytest
import torch

import accel
from accel.research import cluttered_vlm as C
from accel.research.digits_vlm import digits_split


def _tokenizer():
    from transformers import AutoTokenizer

    from accel.models.loader import converted_path

    path = converted_path("smollm2-135m")
    if not (path / "tokenizer.json").exists():
        accel.models.load("smollm2-135m")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def test_render_places_four_coloured_digits_and_asks_about_one():
    cfg = C.ClutterConfig(strokes=0, noise=0.0)
    x, y, _, _ = digits_split(cfg)
    for kind in ("colour", "position"):
        b = C.render(x, y, cfg, 12, kind, torch.Generator().manual_seed(5))
        assert b.pixel_values.shape == (12, 3, 40, 40)
        assert (b.patch_digit < 10).sum(1).tolist() == [64] * 12  # four digits of 4x4 patches each
        for i in range(12):
            assert sorted(b.quadrant_colour[i].tolist()) == [0, 1, 2, 3]  # one colour per digit
            t = int(b.target[i])
            assert int(b.answer[i]) == int(b.quadrant_digit[i, t])
            if kind == "colour":
                assert b.which[i] == C.COLOURS[int(b.quadrant_colour[i, t])]
            else:
                assert b.which[i] == C.POSITIONS[t]
            # the asked digit's patches lie in its quadrant and carry its colour's ink only
            grid = b.patch_colour[i].view(10, 10)
            qy, qx = divmod(t, 2)
            quad = grid[qy * 5:(qy + 1) * 5, qx * 5:(qx + 1) * 5]
            assert int((quad == b.quadrant_colour[i, t]).sum()) == 16
            raw = (b.pixel_values[i] * 0.5 + 0.5)
            ink = raw.amax(0) > 0.2
            tok = ink.view(10, 4, 10, 4).permute(0, 2, 1, 3).reshape(10, 10, 16).any(-1)
            assert not bool((tok & (grid == 4)).any())  # no ink outside the digits without strokes or noise


def test_prompts_of_a_kind_have_one_length_and_the_image_tokens():
    tok = _tokenizer()
    cfg = C.ClutterConfig()
    image_id = tok.convert_tokens_to_ids("<jupyter_output>")
    for kind, names in (("colour", C.COLOURS), ("position", C.POSITIONS)):
        ids = C.prompt_ids(tok, image_id, cfg.tokens, kind, list(names))
        assert ids.shape[0] == 4 and int((ids == image_id).sum(1).unique()) == cfg.tokens


def test_small_model_is_the_language_models_first_layers_frozen_through_training_without_adapters():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=len(tok), tie_word_embeddings=True)).eval()
    cfg = C.small_config(width=32, layers=2, heads=2, lm_layers=2, stage_a_steps=2, stage_a_batch=8, stage_b_steps=2,
                         stage_b_batch=4, n_train=64)
    vlm, image_id = C.build_vlm(lm, tok, cfg)
    inner = vlm.model.language_model
    assert len(inner.layers) == 2
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        full = lm.model(ids, output_hidden_states=True).hidden_states
        cut = inner(ids, output_hidden_states=True)
    torch.testing.assert_close(cut.hidden_states[1], full[1])  # after the first decoder layer
    torch.testing.assert_close(cut.last_hidden_state, lm.model.norm(full[2]))  # the second, then the final norm
    before = {k: v.clone() for k, v in inner.state_dict().items()}
    rec, adapters = C.train(vlm, tok, image_id, cfg)
    assert adapters == {}
    assert all(torch.isfinite(torch.tensor(rec["stage_b_loss_first_last"])))
    assert all(torch.equal(v, before[k]) for k, v in inner.state_dict().items())
    # a guided pair on the task runs end to end: keep-all without exit answers as the large model does
    large, _ = C.build_vlm(lm, tok, C.ClutterConfig(width=32, layers=2, heads=2, n_train=64))
    batches = C.test_batches(cfg, n=4, batch=4)
    ref = C.answers(large, tok, image_id, cfg, batches)
    with accel.patch(large, "sgl", guide=vlm, keep=cfg.tokens, layer=2):
        got = C.answers(large, tok, image_id, cfg, batches)
    assert torch.equal(ref["pred"], got["pred"])
    torch.testing.assert_close(ref["conf"], got["conf"])


def test_adapters_change_only_the_attention_projections_and_reload_into_the_same_model():
    """Stage C's low-rank adapters (with three questions per training image): training moves only the targeted
    projections, by exactly ``B @ A``, leaves no hook behind, and a fresh model with the cached tower, projector and
    adapters merged answers as the trained one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from accel.research.digits_vlm import _load_trainable, _trainable_state

    tok = _tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=len(tok), tie_word_embeddings=True)).eval()
    cfg = C.large_config(width=32, layers=2, heads=2, stage_a_steps=2, stage_a_batch=8, stage_b_steps=2,
                         stage_b_batch=4, n_train=64, lora_steps=3, lora_rank=4, lora_lr=5e-2, questions_per_image=3)
    assert "-lora4x3-" in cfg.key() and cfg.key().endswith("-q3-colour+position-s0")
    assert C.large_config().key() == "clutter-vlm-v1-c40p4w64l4-lmall-colour+position-s0"  # default: unchanged
    assert cfg.key() != C.large_config(**{**cfg.__dict__, "lora_targets": "q_proj"}).key()  # targets name the cache
    assert cfg.key() != C.large_config(**{**cfg.__dict__, "lora_lr": 1e-3}).key()
    vlm, image_id = C.build_vlm(lm, tok, cfg)
    inner = vlm.model.language_model
    before = {k: v.clone() for k, v in inner.state_dict().items()}
    rec, adapters = C.train(vlm, tok, image_id, cfg)
    targets = {f"layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert {k.rsplit(".", 1)[0] for k in adapters} == targets
    for k, v in inner.state_dict().items():
        path = k.rsplit(".", 1)[0]
        if path in targets:
            delta = adapters[f"{path}.B"] @ adapters[f"{path}.A"]
            assert float(delta.abs().max()) > 0  # trained
            torch.testing.assert_close(v, before[k] + delta)
        else:
            assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks for m in inner.modules())
    fresh, _ = C.build_vlm(lm, tok, cfg)
    _load_trainable(fresh, _trainable_state(vlm))
    C.merge_lora(fresh, adapters)
    batches = C.test_batches(cfg, n=4, batch=4)
    a, b = C.answers(vlm, tok, image_id, cfg, batches), C.answers(fresh, tok, image_id, cfg, batches)
    assert torch.equal(a["pred"], b["pred"])
    torch.testing.assert_close(a["conf"], b["conf"])
    with pytest.raises(accel.AccelError, match="lacks"):
        C.merge_lora(fresh, {"layers.9.self_attn.q_proj.A": adapters["layers.0.self_attn.q_proj.A"],
                             "layers.9.self_attn.q_proj.B": adapters["layers.0.self_attn.q_proj.B"]})


def test_training_conversations_ask_every_digit_and_start_with_the_test_prompt():
    """Stage B's several-question prompts: the first turn is exactly the test-time prompt, every answer position is
    followed by the asked quadrant's digit, and a batch's turns name four different quadrants."""
    from accel.research.digits_vlm import digit_token_ids

    tok = _tokenizer()
    cfg = C.ClutterConfig()
    image_id = tok.convert_tokens_to_ids("<jupyter_output>")
    x, y, _, _ = digits_split(cfg)
    b = C.render(x, y, cfg, 6, "colour", torch.Generator().manual_seed(3))
    order = torch.stack([torch.cat([b.target[i:i + 1], torch.tensor([q for q in range(4) if q != int(b.target[i])])])
                         for i in range(6)])
    kinds = ["colour", "position", "position", "colour"]
    ids, pos, ans = C.conversation_ids(tok, image_id, cfg.tokens, b, kinds, order)
    first = C.prompt_ids(tok, image_id, cfg.tokens, "colour", b.which)
    assert torch.equal(ids[:, :first.shape[1]], first) and int(pos[0]) == first.shape[1] - 1
    digits = torch.tensor(digit_token_ids(tok))
    assert torch.equal(ans[:, 0], digits[b.answer])
    for j in range(4):
        assert torch.equal(ids[:, pos[j] + 1], ans[:, j])
        assert torch.equal(ans[:, j], digits[b.quadrant_digit.gather(1, order[:, j:j + 1])[:, 0]])
    with pytest.raises(accel.AccelError, match="questions_per_image"):
        C.ClutterConfig(questions_per_image=5)
    with pytest.raises(accel.AccelError, match="lora_rank"):
        C.ClutterConfig(lora_steps=10, lora_rank=0)
    # the training batches: the batch's own question first, then three other quadrants, each asked once
    cfg4 = C.ClutterConfig(questions_per_image=4, stage_b_batch=5)
    ids, pv, (pos, ans) = C._stage_batches(tok, image_id, cfg4, torch.Generator().manual_seed(0))(0)
    assert ids.shape[0] == 5 and pv.shape == (5, 3, 40, 40) and pos.shape == (4,) and ans.shape == (5, 4)
    g = torch.Generator().manual_seed(0)
    b = C.render(*digits_split(cfg4)[:2], cfg4, 5, "colour", g)  # the same draw the batch made first
    assert torch.equal(b.pixel_values, pv) and torch.equal(ans[:, 0], digits[b.answer])
    for i in range(5):
        turns = tok.decode(ids[i, 1 + cfg4.tokens:]).split("\nQuestion: ")[1:]
        quads = []
        for t, turn in enumerate(turns):
            which = turn.split("?")[0].removeprefix("Which digit is ").removeprefix("at the ")
            q = C.POSITIONS.index(which) if which in C.POSITIONS else \
                int(b.quadrant_colour[i].tolist().index(C.COLOURS.index(which)))
            quads.append(q)
            assert int(ans[i, t]) == int(digits[b.quadrant_digit[i, q]])
        assert quads[0] == int(b.target[i]) and sorted(quads) == [0, 1, 2, 3]


def test_cached_model_with_adapters_loads_as_trained(tmp_path, monkeypatch):
    """``load_or_train`` caches stage C's adapters beside the tower and projector and merges them on load: the reloaded
    model answers as the trained one; a cache holding tensors no loader applies is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from accel.research import digits_vlm as D

    tok = _tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=len(tok), tie_word_embeddings=True)).eval()
    monkeypatch.setenv("ACCEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(accel.models, "load", lambda name: (lm, tok))
    cfg = C.large_config(width=32, layers=2, heads=2, stage_a_steps=2, stage_a_batch=8, stage_b_steps=2,
                         stage_b_batch=4, n_train=64, lora_steps=2, lora_rank=4, lora_lr=5e-2)
    trained, _, image_id, rec = C.load_or_train(cfg)
    assert "stage_c_seconds" in rec
    saved = (D.cache_path(cfg) / "trainable.safetensors")
    from safetensors.torch import load_file

    assert sum(k.startswith("extra.") for k in load_file(str(saved))) == 2 * 4 * 2  # A and B, 4 projections, 2 layers
    loaded, _, _, rec2 = C.load_or_train(cfg)
    assert rec2 == rec
    batches = C.test_batches(cfg, n=4, batch=4)
    a, b = C.answers(trained, tok, image_id, cfg, batches), C.answers(loaded, tok, image_id, cfg, batches)
    assert torch.equal(a["pred"], b["pred"])
    torch.testing.assert_close(a["conf"], b["conf"])
    with pytest.raises(accel.AccelError, match="cannot apply"):
        D.cached_vlm(cfg, C.build_vlm, C.train, False, False, "test VLM")
