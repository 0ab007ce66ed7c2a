"""Visual-token pruning on tiny random VLMs built from configs (no VLM weights install here).

Checks: keeping every token equals the unpatched model exactly (all policies, both feature strategies,
padded batches, composed with an LM policy); the kept indices are exactly each method's top-k computed
independently from transformers' own attention outputs; the LM sees exactly the kept features at their
original positions, in prefill and in every decode step; FlowCut's invariants; errors.
"""
import copy

import pytest
import torch

import accel
from accel.errors import AccelError, AlreadyPatchedError, InputError, UnsupportedModelError
from accel.policies.flowcut import flowcut_prune_count
from accel.policies.visual import keep_topk

IMG = 299
POLICIES = ["fastervlm", "flowcut", "fastv", "randomprune"]


def tiny_llava(strategy="default", layers=4, seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          image_size=16, patch_size=4, num_channels=3)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, vision_feature_layer=-2,
                      vision_feature_select_strategy=strategy)
    return LlavaForConditionalGeneration(cfg).eval()


def prompt(n_tok=16, batch=2, pad=False):
    """Token ids with ``n_tok`` image placeholders per row; ``pad``: row 0 is left-padded by 2."""
    rows, masks = [], []
    for b in range(batch):
        pre = [1, 6] if (pad and b == 0) else [1, 5 + b, 6, 11]
        lead = [0, 0] if (pad and b == 0) else []
        rows.append(lead + pre + [IMG] * n_tok + [7, 8, 9 + b])
        masks.append([0] * len(lead) + [1] * (len(rows[-1]) - len(lead)))
    return torch.tensor(rows), torch.tensor(masks)


def pixels(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g)


@pytest.mark.exactness
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_keep_all_equals_unpatched(policy, strategy):
    m = tiny_llava(strategy)
    n = 16 + (strategy == "full")
    ids, mask = prompt(n)
    pv = pixels()
    with torch.no_grad():
        ref = m(input_ids=ids, pixel_values=pv, attention_mask=mask).logits
        gref = m.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=4, do_sample=False)
        with accel.patch(m, policy, keep=n) as h:
            out = m(input_ids=ids, pixel_values=pv, attention_mask=mask).logits
            g = m.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=4, do_sample=False)
            assert h.last["kept_per_image"] == n and h.last["lm_prompt_tokens"] == ids.shape[1]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(g, gref)


@pytest.mark.exactness
@pytest.mark.parametrize("policy", ["fastervlm", "flowcut", "fastv"])
def test_keep_all_equals_unpatched_left_padded_and_composed(policy):
    m = tiny_llava()
    ids, mask = prompt(16, batch=2, pad=True)
    pv = pixels()
    with torch.no_grad():
        gref = m.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=4, do_sample=False)
        with accel.patch(m, policy + "+delta", keep=16):
            g = m.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(g, gref)


def _eager_copy(m):
    e = copy.deepcopy(m)
    e.set_attn_implementation("eager")
    return e


def test_fastervlm_keeps_topk_of_cls_attention():
    m = tiny_llava()
    ids, _ = prompt(16)
    pv = pixels()
    e = _eager_copy(m)
    with torch.no_grad():
        att = e.model.vision_tower(pv, output_attentions=True).attentions  # one per layer
    ref_scores = att[-2][:, :, 0, 1:].mean(1)  # the feature layer (-2): [CLS] row, patch columns, head mean
    ref = torch.sort(torch.topk(ref_scores, 5).indices, -1).values
    with accel.patch(m, "fastervlm", keep=5) as h, torch.no_grad():
        m(input_ids=ids, pixel_values=pv)
        got = h.last["kept_indices"]
    assert torch.equal(got, ref)


def test_fastv_keeps_topk_of_received_llm_attention():
    m = tiny_llava()
    ids, _ = prompt(16)
    pv = pixels()
    e = _eager_copy(m)
    with torch.no_grad():
        out = e(input_ids=ids, pixel_values=pv, output_attentions=True)
    att = out.attentions[1].mean(1)  # layer K-1 = 1 for K = 2, head mean: [B, T, T]
    received = att.mean(1)  # FastV: attention each token receives, averaged over all queries
    img = ids == IMG
    ref_scores = received[img].view(2, 16)
    ref = torch.sort(torch.topk(ref_scores, 6).indices, -1).values
    with accel.patch(m, "fastv", keep=6, layer=2) as h, torch.no_grad():
        m(input_ids=ids, pixel_values=pv)
        got = h.last["kept_indices"]
    assert torch.equal(got, ref)


@pytest.mark.parametrize("policy", POLICIES)
def test_lm_sees_exactly_the_kept_features_in_prefill_and_decode(policy):
    """Reference: transformers' own image features, gathered at the kept indices, fed with the kept
    tokens' original position ids to the language model; greedy decode re-run from scratch each step."""
    m = tiny_llava()
    ids, _ = prompt(16)
    pv = pixels()
    with accel.patch(m, policy, keep=5) as h, torch.no_grad():
        g = m.generate(input_ids=ids, pixel_values=pv, max_new_tokens=4, do_sample=False)
        kept = h.last["kept_indices"]
    with torch.no_grad():
        feats = m.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output
        feats = torch.stack(list(feats))  # [2, 16, D]
        kf = torch.gather(feats, 1, kept[..., None].expand(-1, -1, feats.shape[-1]))
        img = ids == IMG
        keep_cols = torch.ones_like(img)
        flag = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, kept, True)
        keep_cols[img] = flag.reshape(-1)
        emb = m.get_input_embeddings()(ids)[keep_cols].view(2, -1, 64)
        emb[img[keep_cols].view(2, -1)] = kf.reshape(-1, 64)
        pos = torch.arange(ids.shape[1]).expand(2, -1)[keep_cols].view(2, -1)
        seq, p = emb, pos
        for step in range(4):
            hs = m.model.language_model(inputs_embeds=seq, position_ids=p).last_hidden_state
            nxt = m.lm_head(hs[:, -1]).argmax(-1)
            assert torch.equal(nxt, g[:, ids.shape[1] + step]), (policy, step)
            seq = torch.cat([seq, m.get_input_embeddings()(nxt)[:, None]], 1)
            p = torch.cat([p, torch.full((2, 1), ids.shape[1] + step)], 1)


def test_rows_with_different_image_counts_are_repadded():
    """Row 0 holds one image, row 1 two: after pruning their lengths differ; accel left-pads the shorter
    row again, and each row generates what it generates alone."""
    m = tiny_llava()
    pv = pixels(3)
    row1 = [1, 5, 6] + [IMG] * 16 + [7] + [IMG] * 16 + [8]
    row0 = [0] * 17 + [1, 5, 6] + [IMG] * 16 + [8]
    ids = torch.tensor([row0, row1])
    mask = torch.tensor([[0] * 17 + [1] * 20, [1] * 37])
    with torch.no_grad():
        gref = m.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=4, do_sample=False)
        with accel.patch(m, "fastervlm", keep=16):  # keep-all: exact, padding included
            assert torch.equal(m.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=4,
                                          do_sample=False), gref)
        with accel.patch(m, "fastervlm", keep=3) as h:
            g = m.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=4, do_sample=False)
            assert h.last["lm_prompt_tokens"] == 37 - 2 * 13  # row 1 (longest); row 0: 20 - 13 = 7 + 4 pads
            alone0 = m.generate(input_ids=ids[:1, 17:], pixel_values=pv[:1], max_new_tokens=4, do_sample=False)
            alone1 = m.generate(input_ids=ids[1:], pixel_values=pv[1:], max_new_tokens=4, do_sample=False)
    assert torch.equal(g[0, 37:], alone0[0, 20:]) and torch.equal(g[1, 37:], alone1[0, 37:])


def test_flowcut_invariants():
    m = tiny_llava(layers=6)
    ids, _ = prompt(16)
    pv = pixels()
    with accel.patch(m, "flowcut", keep=3) as h, torch.no_grad():
        m(input_ids=ids, pixel_values=pv)
        counts = h.last["flowcut_patches_per_layer"]
        kept = h.last["kept_indices"]
    assert counts[-1] == 3 and len(counts) == 5  # layers 0..4 run (feature layer -2 of 6)
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert kept.shape == (2, 3) and bool((kept[:, 1:] > kept[:, :-1]).all())


def test_flowcut_prune_count_rule():
    assert flowcut_prune_count(100, 10, 0, 1.0) == 90  # select layer: all the way to the target
    assert flowcut_prune_count(10, 10, 4, 0.0) == 0
    assert flowcut_prune_count(100, 10, 4, 0.0) == 45  # peaked attention: (100-10)/sqrt(4)
    import math

    assert flowcut_prune_count(100, 10, 4, math.log(100)) == 0  # flat attention prunes nothing
    assert flowcut_prune_count(100, 10, 1, 0.5 * math.log(100)) == int(90 * 0.75)


def test_keep_topk_sorted_and_stable():
    s = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.9]])
    assert keep_topk(s, 3).tolist() == [[1, 2, 4]]
    assert keep_topk(s, 2).tolist() == [[1, 4]]  # tie 0.5/0.5: the lower index wins
    assert keep_topk(s, 9).tolist() == [[0, 1, 2, 3, 4]]


def test_random_prune_is_seeded():
    m = tiny_llava()
    ids, _ = prompt(16)
    pv = pixels()
    got = []
    for seed in (0, 0, 1):
        with accel.patch(m, "randomprune", keep=6, seed=seed) as h, torch.no_grad():
            m(input_ids=ids, pixel_values=pv)
            got.append(h.last["kept_indices"])
    assert torch.equal(got[0], got[1]) and not torch.equal(got[0], got[2])


def test_keep_ratio_and_remove_restores():
    m = tiny_llava()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    hooks = (len(m._forward_pre_hooks), len(m.model._forward_pre_hooks))
    impl = m.config._attn_implementation
    h = accel.patch(m, "fastervlm+snapkv", keep_ratio=0.25)
    ids, _ = prompt(16)
    with torch.no_grad():
        m(input_ids=ids, pixel_values=pixels())
    assert h.last["kept_per_image"] == 4
    with pytest.raises(AlreadyPatchedError):
        accel.patch(m, "flowcut")
    h.remove()
    assert (len(m._forward_pre_hooks), len(m.model._forward_pre_hooks)) == hooks
    assert m.config._attn_implementation == impl
    assert "get_image_features" not in m.model.__dict__  # the instance override is gone
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    accel.patch(m, "flowcut").remove()  # patchable again


def test_errors_name_the_problem():
    m = tiny_llava()
    ids, _ = prompt(16)
    for bad, msg in [({"keep": 0}, "keep must be"), ({"keep": 4, "keep_ratio": 0.5}, "not both"),
                     ({"keep_ratio": 1.5}, "keep_ratio must be")]:
        with pytest.raises(AccelError, match=msg):
            accel.patch(m, "fastervlm", **bad)
    with pytest.raises(AccelError, match="at most one visual"):
        accel.patch(m, "fastervlm+flowcut")
    with accel.patch(m, "fastervlm", keep=4), torch.no_grad():
        with pytest.raises(InputError, match="placeholder"):
            m(input_ids=ids[:, :-5], pixel_values=pixels())  # cut the image's placeholders short
        with pytest.raises(InputError, match="labels"):
            m(input_ids=ids, pixel_values=pixels(), labels=ids)
        two = torch.cat([ids[:1], ids[1:2]], 0).clone()
        two[1, 1] = IMG  # a stray placeholder in row 1 -> placeholder count no longer matches the images
        with pytest.raises(InputError):
            m(input_ids=two, pixel_values=pixels())
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="Supported VLM types"):
        accel.patch(lm, "fastervlm")


# -- the project-trained digits VLM: its pipeline on a tiny random LM (the real run is bench/vlm_digits.py) --
def _smollm_tokenizer():
    from transformers import AutoTokenizer

    from accel.models.loader import converted_path

    path = converted_path("smollm2-135m")
    if not (path / "tokenizer.json").exists():
        accel.models.load("smollm2-135m")  # converts and caches it (installed offline by scripts/setup.sh)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def test_digits_render_places_the_digit_on_the_patch_grid():
    from accel.research import digits_vlm as D

    cfg = D.DigitsConfig()
    x, y, xt, yt = D.digits_split(cfg)
    assert len(y) == cfg.n_train and len(yt) == 1797 - cfg.n_train
    img = torch.zeros(1, 8, 8)
    img[0, 0, 0] = 1.0  # one bright pixel -> a bright 2x2 block at the placement corner
    pv = D.render(img, D.DigitsConfig(noise=0.0), torch.Generator().manual_seed(3))
    assert pv.shape == (1, 3, 32, 32)
    ys, xs = torch.nonzero(pv[0, 0] > 0.9, as_tuple=True)
    assert len(ys) == 4 and int(ys.min()) % 4 == 0 and int(xs.min()) % 4 == 0


def test_digits_pipeline_trains_caches_and_evaluates_under_pruning(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from accel.research import digits_vlm as D

    tok = _smollm_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=len(tok), tie_word_embeddings=True)).eval()
    cfg = D.DigitsConfig(n_train=64, stage_a_epochs=1, stage_b_steps=3, stage_b_batch=8, width=32, layers=3, heads=2)
    vlm, image_id = D.build_vlm(lm, tok, cfg)
    lm_before = {k: v.clone() for k, v in vlm.model.language_model.state_dict().items()}
    tower_before = {k: v.clone() for k, v in vlm.model.vision_tower.state_dict().items()}
    rec = D.train(vlm, tok, image_id, cfg)
    assert all(torch.isfinite(torch.tensor(rec["stage_b_loss_first_last"])))
    assert all(torch.equal(v, lm_before[k]) for k, v in vlm.model.language_model.state_dict().items())  # frozen
    assert any(not torch.equal(v, tower_before[k]) for k, v in vlm.model.vision_tower.state_dict().items())
    state = D._trainable_state(vlm)
    vlm2, _ = D.build_vlm(lm, tok, cfg)
    D._load_trainable(vlm2, state)
    acc = D.evaluate(vlm, tok, image_id, cfg, n=20, batch=10)
    assert acc == D.evaluate(vlm2, tok, image_id, cfg, n=20, batch=10)
    with accel.patch(vlm, "fastervlm", keep=cfg.tokens):  # keep-all: the same answers
        assert D.evaluate(vlm, tok, image_id, cfg, n=20, batch=10) == acc
    with accel.patch(vlm, "flowcut", keep=4) as h:
        D.evaluate(vlm, tok, image_id, cfg, n=10, batch=10)
        assert h.last["lm_prompt_tokens"] == h.last["prompt_tokens"] - (cfg.tokens - 4)


# -- LLaVA-NeXT (anyres: base crop + tiles, unpadding, row-end newline tokens) ----------------------------
def tiny_llava_next():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=16, patch_size=4)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, pad_token_id=0)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_id=IMG, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
    m = LlavaNextForConditionalGeneration(cfg).eval()
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = torch.tensor([[20, 36]])
    crops = image_size_to_num_patches(sizes[0], cfg.image_grid_pinpoints, 16)
    pv = torch.randn(1, crops, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        packed = m.model.get_image_features(pv, sizes, return_dict=True).pooler_output[0]
    ids = torch.tensor([[1, 5, 6] + [IMG] * packed.shape[0] + [7, 8, 9]])
    return m, ids, pv, sizes, packed, crops


@pytest.mark.exactness
@pytest.mark.parametrize("policy", POLICIES)
def test_llava_next_keep_all_equals_unpatched(policy):
    m, ids, pv, sizes, packed, _ = tiny_llava_next()
    with torch.no_grad():
        gref = m.generate(input_ids=ids, pixel_values=pv, image_sizes=sizes, max_new_tokens=4, do_sample=False)
        with accel.patch(m, policy, keep=16 if policy != "fastv" else 10_000):  # per crop (fastv: per image)
            g = m.generate(input_ids=ids, pixel_values=pv, image_sizes=sizes, max_new_tokens=4, do_sample=False)
    assert torch.equal(g, gref)


@pytest.mark.parametrize("policy", ["fastervlm", "flowcut", "fastv"])
def test_llava_next_per_crop_budget_newlines_kept_and_lm_input_exact(policy):
    m, ids, pv, sizes, packed, crops = tiny_llava_next()
    nl = m.model.image_newline
    is_nl = (packed == nl[None]).all(-1)
    assert int(is_nl.sum()) > 0
    with accel.patch(m, policy, keep=3) as h, torch.no_grad():
        g = m.generate(input_ids=ids, pixel_values=pv, image_sizes=sizes, max_new_tokens=3, do_sample=False)
        kept = h.last["kept_indices"][0]
    flags = torch.zeros(packed.shape[0], dtype=torch.bool)
    flags[kept] = True
    assert bool(flags[is_nl].all())  # every row-end newline survives
    if policy != "fastv":  # at most 3 per crop (tile tokens cut by the unpadding do not appear)
        assert int((flags & ~is_nl).sum()) <= 3 * crops
    else:
        assert int((flags & ~is_nl).sum()) == 3
    # the LM saw exactly transformers' packed features at the kept positions, at their original positions
    with torch.no_grad():
        keep_cols = torch.ones_like(ids, dtype=torch.bool)
        keep_cols[ids == IMG] = flags
        emb = m.get_input_embeddings()(ids)[keep_cols][None]
        emb[(ids == IMG)[keep_cols][None]] = packed[flags]
        pos = torch.arange(ids.shape[1])[keep_cols[0]][None]
        seq, p = emb, pos
        for step in range(3):
            hs = m.model.language_model(inputs_embeds=seq, position_ids=p).last_hidden_state
            nxt = m.lm_head(hs[:, -1]).argmax(-1)
            assert int(nxt) == int(g[0, ids.shape[1] + step]), (policy, step)
            seq = torch.cat([seq, m.get_input_embeddings()(nxt)[:, None]], 1)
            p = torch.cat([p, torch.full((1, 1), ids.shape[1] + step)], 1)


# -- Qwen2-VL (no [CLS], patch merger, M-RoPE positions) ----------------------------------------------------
QIMG = 290


def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4, temporal_patch_size=2,
                           spatial_merge_size=2, in_channels=3, mlp_ratio=2),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        image_token_id=QIMG, video_token_id=QIMG + 1, bos_token_id=1, eos_token_id=2)
    m = Qwen2VLForConditionalGeneration(cfg).eval()
    grid = torch.tensor([[1, 4, 6], [1, 6, 4]])  # 24 patches each -> 6 merged tokens each
    pv = torch.randn(48, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[1, 5, 6] + [QIMG] * 6 + [7, 8, 9], [1, 6, 5] + [QIMG] * 6 + [9, 8, 7]])
    return m, ids, pv, grid, (ids == QIMG).long()


@pytest.mark.parametrize("policy", ["fastervlm", "fastv", "randomprune"])
def test_qwen2_vl_keep_all_equals_unpatched(policy):
    m, ids, pv, grid, tt = tiny_qwen2_vl()
    kw = dict(pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=tt)
    with torch.no_grad():
        ref = m(input_ids=ids, **kw).logits
        gref = m.generate(input_ids=ids, max_new_tokens=4, do_sample=False, **kw)
        with accel.patch(m, policy, keep=6):
            out = m(input_ids=ids, **kw).logits
            g = m.generate(input_ids=ids, max_new_tokens=4, do_sample=False, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(g, gref)


def _tower_attention_probs(m, pv, grid, block_attn) -> list:
    """Softmax attention ``[heads, T, T]`` of one vision-tower attention module, per call (one per image),
    from the model's own post-RoPE q and k: the tower run once with a recording attention function."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    probs = []

    def record(module, q, k, v, attention_mask, scaling=None, **kw):
        if module is block_attn:
            probs.append(torch.softmax((q @ k.transpose(-1, -2)) * scaling, -1)[0])
        return sdpa_attention_forward(module, q, k, v, attention_mask, scaling=scaling, **kw)

    AttentionInterface.register("test_record_probs", record)
    vis = m.model.visual
    saved = vis.config._attn_implementation_internal
    vis.config._attn_implementation_internal = "test_record_probs"
    try:
        with torch.no_grad():
            vis(pv, grid_thw=grid)
    finally:
        vis.config._attn_implementation_internal = saved
    return probs


def test_qwen2_vl_scores_received_attention_per_merged_token_and_keeps_mrope_positions():
    m, ids, pv, grid, tt = tiny_qwen2_vl()
    probs = _tower_attention_probs(m, pv, grid, m.model.visual.blocks[-1].attn)
    ref = [keep_topk(p.mean(0).mean(0).view(-1, 4).mean(-1)[None], 2)[0] for p in probs]  # per image, 6 merged
    kw = dict(pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=tt)
    with accel.patch(m, "fastervlm", keep=2) as h, torch.no_grad():
        g = m.generate(input_ids=ids, max_new_tokens=3, do_sample=False, **kw)
        kept = h.last["kept_indices"]
    assert torch.equal(kept, torch.stack(ref))
    # reference decode: transformers' merged features at the kept tokens, original M-RoPE positions
    with torch.no_grad():
        feats = torch.stack(list(m.model.get_image_features(pv, grid, return_dict=True).pooler_output))
        pos, _ = m.model.get_rope_index(ids, image_grid_thw=grid, mm_token_type_ids=tt)
        img = ids == QIMG
        flag = torch.zeros(2, 6, dtype=torch.bool).scatter_(1, kept, True)
        keep_cols = torch.ones_like(img)
        keep_cols[img] = flag.reshape(-1)
        emb = m.get_input_embeddings()(ids)[keep_cols].view(2, -1, 64)
        emb[img[keep_cols].view(2, -1)] = torch.gather(feats, 1, kept[..., None].expand(-1, -1, 64)).reshape(-1, 64)
        p = pos[:, keep_cols].view(3, 2, -1)
        seq = emb
        for step in range(3):
            hs = m.model.language_model(inputs_embeds=seq, position_ids=p).last_hidden_state
            nxt = m.lm_head(hs[:, -1]).argmax(-1)
            assert torch.equal(nxt, g[:, ids.shape[1] + step]), step
            seq = torch.cat([seq, m.get_input_embeddings()(nxt)[:, None]], 1)
            p = torch.cat([p, p[..., -1:] + 1], -1)


def test_qwen2_vl_refuses_flowcut_and_videos():
    m, ids, pv, grid, tt = tiny_qwen2_vl()
    with accel.patch(m, "flowcut", keep=2), torch.no_grad():
        with pytest.raises(UnsupportedModelError, match="CLS"):
            m(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=tt)
    with accel.patch(m, "fastervlm", keep=2), torch.no_grad():
        with pytest.raises(InputError, match="videos"):
            m(input_ids=ids, pixel_values_videos=pv, video_grid_thw=grid, mm_token_type_ids=tt)


def tiny_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=16,
                           fullatt_block_indexes=[0]),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        image_token_id=QIMG, video_token_id=QIMG + 1, bos_token_id=1, eos_token_id=2)
    m = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    grid = torch.tensor([[1, 8, 8], [1, 8, 4]])  # 16 and 8 merged tokens; 16 px windows permute the merge units
    pv = torch.randn(96, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[1, 5, 6] + [QIMG] * 16 + [7, 8, 9], [0] * 8 + [1, 6, 5] + [QIMG] * 8 + [9, 8, 7]])
    mask = (ids != 0).long()
    return m, ids, mask, pv, grid, (ids == QIMG).long()


def test_qwen2_5_vl_keep_all_exact_and_window_permutation_undone():
    from transformers.vision_utils import get_vision_window_index

    m, ids, mask, pv, grid, tt = tiny_qwen2_5_vl()
    kw = dict(pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=tt, attention_mask=mask)
    with torch.no_grad():
        gref = m.generate(input_ids=ids, max_new_tokens=4, do_sample=False, **kw)
        for pol in ("fastervlm", "fastv", "randomprune"):
            with accel.patch(m, pol, keep=16):
                assert torch.equal(m.generate(input_ids=ids, max_new_tokens=4, do_sample=False, **kw), gref), pol
    vis = m.model.visual
    probs = [p.mean(0).mean(0) for p in _tower_attention_probs(m, pv, grid, vis.blocks[0].attn)]  # full-attn block
    window, _ = get_vision_window_index(grid, 2, vis.window_size, vis.patch_size)
    merged = torch.cat(probs).view(-1, 4).mean(-1)[torch.argsort(window)]  # as transformers un-permutes its merger
    ref = [keep_topk(x[None], 3)[0] for x in torch.split(merged, [16, 8])]
    with accel.patch(m, "fastervlm", keep=3) as h, torch.no_grad():
        m(input_ids=ids, **kw)
        kept = h.last["kept_indices"]
    assert all(torch.equal(a, b) for a, b in zip(kept, ref))


def _llava_next_batch():
    """Two images with different crop counts (3 and 5) in one left-padded batch."""
    m, _, _, _, _, _ = tiny_llava_next()
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = torch.tensor([[8, 30], [30, 30]])
    crops = [image_size_to_num_patches(s, m.config.image_grid_pinpoints, 16) for s in sizes]
    pv = torch.randn(2, max(crops), 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        packed = m.model.get_image_features(pv, sizes, return_dict=True).pooler_output
    n0, n1 = packed[0].shape[0], packed[1].shape[0]
    width = max(n0, n1) + 6
    rows = [[0] * (width - 6 - n) + [1, 5, 6] + [IMG] * n + [7, 8, 9] for n in (n0, n1)]
    ids = torch.tensor(rows)
    return m, ids, (ids != 0).long(), pv, sizes, packed, crops


def test_llava_next_flowcut_llm_stage_keeps_topk_of_reference_scores():
    """FlowCut anyres, stage 2: the kept set is the top-target of (relation + semantic) * ||v||_1 from
    decoder layer 1 for the last prompt token, computed here from the unpatched LM's own projections and
    rotary embedding over the encoder-pruned prompt; a subset of the encoder's survivors; newlines kept."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, ids, pv, sizes, packed, crops = tiny_llava_next()
    nl = m.model.image_newline
    is_nl = (packed == nl[None]).all(-1)
    with accel.patch(m, "flowcut", keep=3) as h, torch.no_grad():
        g = m.generate(input_ids=ids, pixel_values=pv, image_sizes=sizes, max_new_tokens=2, do_sample=False)
        last = h.last
    assert g.shape[1] == ids.shape[1] + 2
    enc = torch.zeros(packed.shape[0], dtype=torch.bool)
    enc[last["encoder_kept_indices"][0]] = True
    fin = torch.zeros_like(enc)
    fin[last["kept_indices"][0]] = True
    target = 3 * crops
    assert int((enc & ~is_nl).sum()) > target  # the second stage had work to do
    assert bool((fin <= enc).all()) and bool(fin[is_nl].all())
    assert int((fin & ~is_nl).sum()) == target and last["llm_stage_kept"] == [target + int(is_nl.sum())]
    # this tiny tower prunes only after its feature layer, so the survivors' features are the unpruned ones
    assert all(c == 16 for c in last["flowcut_patches_per_layer"][:-1])
    keep_cols = torch.ones_like(ids, dtype=torch.bool)
    keep_cols[ids == IMG] = enc
    emb = m.get_input_embeddings()(ids)[keep_cols][None]
    emb[(ids == IMG)[keep_cols][None]] = packed[enc]
    pos = torch.arange(ids.shape[1])[keep_cols[0]][None]
    lm = m.model.language_model
    got = {}
    att = lm.layers[1].self_attn
    hooks = [getattr(att, n).register_forward_hook(lambda mod, a, o, n=n: got.__setitem__(n, o))
             for n in ("q_proj", "k_proj", "v_proj")]
    with torch.no_grad():
        lm(inputs_embeds=emb, position_ids=pos)
    for hk in hooks:
        hk.remove()
    cfg = lm.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    q = got["q_proj"].view(1, -1, cfg.num_attention_heads, hd).transpose(1, 2)
    k = got["k_proj"].view(1, -1, cfg.num_key_value_heads, hd).transpose(1, 2)
    v = got["v_proj"].view(1, -1, cfg.num_key_value_heads, hd).transpose(1, 2)
    cos, sin = lm.rotary_emb(v, pos)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    k, v = k.repeat_interleave(rep, 1)[0], v.repeat_interleave(rep, 1)[0]  # [H, T, d]
    q = q[0]
    cols = torch.nonzero((ids == IMG)[keep_cols]).flatten()
    rel = torch.softmax(torch.einsum("hd,hnd->hn", q[:, -1], k[:, cols]) / hd ** 0.5, -1).mean(0)
    sem = torch.softmax(torch.einsum("hd,hnd->hn", v[:, -1], v[:, cols]) / hd ** 0.5, -1).mean(0)
    score = (rel + sem) * v[:, cols].mean(0).abs().sum(-1)
    enc_pos = torch.nonzero(enc).flatten()
    score[is_nl[enc_pos]] = float("inf")
    ref = enc_pos[torch.sort(torch.sort(score, descending=True, stable=True).indices[: int(fin.sum())]).values]
    assert torch.equal(ref, torch.nonzero(fin).flatten())


def test_llava_next_flowcut_stages_in_a_padded_batch_and_encoder_only_switch():
    m, ids, mask, pv, sizes, packed, crops = _llava_next_batch()
    assert crops[0] != crops[1]
    with accel.patch(m, "flowcut", keep=2) as h, torch.no_grad():
        g = m.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes, max_new_tokens=2,
                       do_sample=False)
        last = h.last
    assert g.shape == (2, ids.shape[1] + 2)
    for i in range(2):
        is_nl = (packed[i] == m.model.image_newline[None]).all(-1)
        fin = torch.zeros(packed[i].shape[0], dtype=torch.bool)
        fin[last["kept_indices"][i]] = True
        assert int((fin & ~is_nl).sum()) == 2 * crops[i] and bool(fin[is_nl].all())
        # each row alone keeps the same tokens (the stage scores per image, from its own row)
        with accel.patch(m, "flowcut", keep=2) as h1, torch.no_grad():
            row = ids[i:i + 1][:, mask[i].bool()]
            m(input_ids=row, pixel_values=pv[i:i + 1], image_sizes=sizes[i:i + 1])
            assert torch.equal(torch.as_tensor(h1.last["kept_indices"]).flatten(), last["kept_indices"][i])
    with accel.patch(m, "flowcut", keep=2, llm_stage=False) as h, torch.no_grad():
        m(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
        assert "llm_stage_kept" not in h.last
        for i in range(2):
            is_nl = (packed[i] == m.model.image_newline[None]).all(-1)
            fin = torch.zeros(packed[i].shape[0], dtype=torch.bool)
            fin[h.last["kept_indices"][i]] = True
            assert int((fin & ~is_nl).sum()) <= 2 * crops[i]
    with pytest.raises(AccelError, match="llm_layer"):
        accel.patch(m, "flowcut", llm_layer=-1)
    with pytest.raises(AccelError, match="llm_layer 7"):
        with accel.patch(m, "flowcut", keep=2, llm_layer=7), torch.no_grad():
            m(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes)
