"""SGL (small-VLM guidance) on tiny random LLaVA models built from configs.

Checks: keep-all with an unreachable exit threshold equals the large model exactly (forward and generate, left-padded
batch, pruning before the LM and from a later layer); the guide's ranking is the attention its text and answer tokens
pay the visual tokens, summed over layers and heads, recomputed from transformers' own eager attention; pruning from
layer K equals a by-hand forward whose first K layers see every token; SEE returns the guide's answer for the rows
that exit and the large model's for the others; refusals.
"""
import pytest
import torch

import accel
from accel.errors import AccelError, InputError, UnsupportedModelError

IMG = 299
N_IMG = 16


def tiny_llava(text_layers=4, seed=0, hidden=64):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=16, patch_size=4, num_channels=3)
    tc = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=300, max_position_embeddings=512,
                     pad_token_id=0, eos_token_id=2, bos_token_id=1)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    m = LlavaForConditionalGeneration(cfg).eval()
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = 2
    return m


def pair():
    return tiny_llava(4, seed=0), tiny_llava(2, seed=3, hidden=32)


def prompt(batch=2, pad=False):
    rows, masks = [], []
    for b in range(batch):
        lead = [0, 0] if (pad and b == 0) else []
        pre = [1, 6] if lead else [1, 5 + b, 6, 11]
        rows.append(lead + pre + [IMG] * N_IMG + [7, 8, 9 + b])
        masks.append([0] * len(lead) + [1] * (len(rows[-1]) - len(lead)))
    return torch.tensor(rows), torch.tensor(masks)


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.exactness
@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("pad", [False, True])
def test_keep_all_and_no_exit_equal_the_large_model(layer, pad):
    large, guide = pair()
    ids, mask = prompt(pad=pad)
    pv = pixels()
    with torch.no_grad():
        ref = large(input_ids=ids, pixel_values=pv, attention_mask=mask).logits
        gref = large.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=5, do_sample=False)
        with accel.patch(large, "sgl", guide=guide, keep=N_IMG, layer=layer, exit_threshold=2.0) as h:
            out = large(input_ids=ids, pixel_values=pv, attention_mask=mask).logits
            g = large.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=5, do_sample=False)
            assert h.last_exit["exited"] == [False, False]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(g, gref)
    assert "generate" not in large.__dict__  # remove() restored generate


def _guide_reference(guide, ids, mask, pv, n_new):
    """Attention each prompt column receives from the prompt's text rows and the guide's fed-back answer tokens,
    summed over layers and heads, from transformers' eager attention (output_attentions)."""
    import copy

    e = copy.deepcopy(guide)
    e.set_attn_implementation("eager")
    with torch.no_grad():
        seq = e.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=n_new, do_sample=False)
        full = seq[:, : ids.shape[1] + n_new - 1]  # the answer tokens fed back as inputs
        fm = torch.cat([mask, torch.ones(ids.shape[0], n_new - 1, dtype=mask.dtype)], 1)
        att = e(input_ids=full, pixel_values=pv, attention_mask=fm, output_attentions=True).attentions
    T = ids.shape[1]
    rows = torch.cat([(ids != IMG) & mask.bool(), torch.ones(ids.shape[0], n_new - 1, dtype=torch.bool)], 1)
    tot = sum((a.sum(1) * rows[:, :, None]).sum(1) for a in att)  # [B, T + n - 1]
    return tot[:, :T], seq


@pytest.mark.parametrize("n_new", [1, 3])
def test_ranking_is_the_guides_summed_attention_from_text_and_answer_tokens(n_new):
    large, guide = pair()
    ids, mask = prompt(pad=True)
    pv = pixels()
    ref, gseq = _guide_reference(guide, ids, mask, pv, n_new)
    img = ids == IMG
    want = torch.sort(torch.topk(ref[img].view(2, N_IMG), 5).indices, -1).values
    with accel.patch(large, "sgl", guide=guide, keep=5, layer=0) as h, torch.no_grad():
        large.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=n_new, do_sample=False)
        got = h.last["kept_indices"]
        run = h.runtime.last_guide
    assert torch.equal(got, want)
    torch.testing.assert_close(run.received[img].view(2, N_IMG), ref[img].view(2, N_IMG), rtol=1e-4, atol=1e-5)
    assert torch.equal(run.sequences, gseq[:, ids.shape[1]:])


def _by_hand(large, ids, pv, keep_flags, K, extra=None):
    """Last-position logits of the large model on ids (+ extra generated tokens), its first K decoder layers over
    every token and the later ones over the kept image tokens and every text / generated token (original positions)."""
    lm = large.model.language_model
    with torch.no_grad():
        feats = torch.stack(list(large.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output))
        seq = ids if extra is None else torch.cat([ids, extra], 1)
        emb = lm.embed_tokens(seq)
        img = seq == IMG
        emb[img] = feats.reshape(-1, feats.shape[-1])
        B, T = seq.shape
        pos = torch.arange(T).expand(B, T)
        keep = torch.ones(B, T, dtype=torch.bool)
        keep[img] = keep_flags.reshape(-1)
        h = emb
        for i, layer in enumerate(lm.layers):
            if i == K:
                h = h[keep].view(B, -1, h.shape[-1])
                pos = pos[keep].view(B, -1)
            n = h.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(B, 1, n, n)
            h = layer(h, attention_mask=causal, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        return large.lm_head(lm.norm(h)[:, -1])


@pytest.mark.parametrize("K", [0, 2])
def test_pruning_from_layer_k_equals_a_by_hand_forward(K):
    large, guide = pair()
    ids, _ = prompt()
    pv = pixels()
    with accel.patch(large, "sgl", guide=guide, keep=6, layer=K) as h, torch.no_grad():
        logits = large(input_ids=ids, pixel_values=pv).logits[:, -1]
        flags = torch.zeros(2, N_IMG, dtype=torch.bool).scatter_(1, h.last["kept_indices"], True)
        # under generate the guide answers with max_new_tokens tokens, so its ranking may differ from a forward's
        g = large.generate(input_ids=ids, pixel_values=pv, max_new_tokens=4, do_sample=False)
        gflags = torch.zeros(2, N_IMG, dtype=torch.bool).scatter_(1, h.last["kept_indices"], True)
        assert h.last["lm_prompt_tokens"] == ids.shape[1] - (N_IMG - 6)
    torch.testing.assert_close(logits, _by_hand(large, ids, pv, flags, K), rtol=1e-4, atol=1e-4)
    T = ids.shape[1]
    assert torch.equal(_by_hand(large, ids, pv, gflags, K).argmax(-1), g[:, T])
    for step in range(1, 4):  # every greedy token is the by-hand argmax over the tokens generated before it
        nxt = _by_hand(large, ids, pv, gflags, K, g[:, T:T + step]).argmax(-1)
        assert torch.equal(nxt, g[:, T + step]), step
    with accel.patch(large, "sgl", guide=guide, keep=6, layer=K), torch.no_grad():
        cache = large(input_ids=ids, pixel_values=pv, use_cache=True).past_key_values
    lens = [cache.layers[i].keys.shape[2] for i in range(len(cache.layers))]
    assert lens == [T] * K + [T - (N_IMG - 6)] * (len(lens) - K)  # a pruned layer caches the kept tokens only


def test_early_exit_returns_the_guides_answer_for_confident_rows_only():
    large, guide = pair()
    ids, mask = prompt(pad=True)
    pv = pixels()
    with torch.no_grad():
        gref = guide.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=4, do_sample=False)
        with accel.patch(large, "sgl", guide=guide, keep=8, exit_threshold=0.0) as h:  # every row exits
            g = large.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=4, do_sample=False)
            scores = torch.tensor(h.last_exit["score"])
        assert torch.equal(g, gref)
        thr = float(scores.max())  # only the most confident row exits
        with accel.patch(large, "sgl", guide=guide, keep=8, exit_threshold=thr) as h:
            g2 = large.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=4, do_sample=False)
            out = torch.tensor(h.last_exit["exited"])
        assert int(out.sum()) == 1
        r = int(out.nonzero()[0, 0])
        o = 1 - r
        with accel.patch(large, "sgl", guide=guide, keep=8) as h:  # the staying row alone, guided the same way
            alone = large.generate(input_ids=ids[o:o + 1], pixel_values=pv[o:o + 1], attention_mask=mask[o:o + 1],
                                   max_new_tokens=4, do_sample=False)
    assert torch.equal(g2[r], gref[r])
    assert torch.equal(g2[o, :alone.shape[1]], alone[0])


def test_refusals_name_the_problem():
    large, guide = pair()
    ids, mask = prompt()
    pv = pixels()
    with pytest.raises(AccelError, match="guide="):
        accel.patch(large, "sgl")
    with pytest.raises(AccelError, match="large model itself"):
        accel.patch(large, "sgl", guide=large)
    with pytest.raises(AccelError, match="past the language model"):
        accel.patch(large, "sgl", guide=guide, layer=9)
    with pytest.raises(AccelError, match="does not compose"):
        accel.patch(large, "sgl+delta", guide=guide, layer=2)
    other = tiny_llava(2, seed=4)
    other.config.image_token_id = IMG - 1
    with pytest.raises(AccelError, match="image token id"):
        accel.patch(large, "sgl", guide=other)
    with accel.patch(guide, "fastervlm"):
        with pytest.raises(AccelError, match="guide model is patched"):
            accel.patch(large, "sgl", guide=guide)
    with accel.patch(large, "sgl", guide=guide, keep=4, exit_threshold=0.5):
        with pytest.raises(InputError, match="plain greedy answer.*num_beams"):
            large.generate(input_ids=ids, pixel_values=pv, max_new_tokens=3, num_beams=2)
        with pytest.raises(InputError, match="repetition_penalty"):
            large.generate(input_ids=ids, pixel_values=pv, max_new_tokens=3, repetition_penalty=5.0)
        with pytest.raises(InputError, match="by keyword"):
            large.generate(ids, pv, max_new_tokens=3)
    with accel.patch(large, "sgl", guide=guide, keep=4, exit_threshold=0.5, guide_tokens=1):
        with pytest.raises(InputError, match="guide_tokens"):
            large.generate(input_ids=ids, pixel_values=pv, max_new_tokens=3)
    from .test_vlm import tiny_llava_next
    with pytest.raises(UnsupportedModelError, match="both be LLaVA"):
        accel.patch(large, "sgl", guide=tiny_llava_next()[0])
    from accel.policies.sgl import SGLPolicy
    with pytest.raises(AccelError, match="exit_score"):
        SGLPolicy(guide=guide, exit_score="max")


def test_a_rows_ranking_does_not_depend_on_when_its_batch_mates_stop():
    from accel.vlm.guide import run_guide

    large, guide = pair()
    ids, mask = prompt(pad=True)
    pv = pixels()
    with torch.no_grad():
        first = guide.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=1,
                               do_sample=False)[:, -1]
    guide.generation_config.eos_token_id = int(first[0])  # row 0 ends at once; row 1 goes on (if it differs)
    assert int(first[1]) != int(first[0])
    both = run_guide(guide, ids, pv, mask, 4)
    for r in range(2):
        alone = run_guide(guide, ids[r:r + 1], pv[r:r + 1], mask[r:r + 1], 4)
        img = ids[r] == IMG
        torch.testing.assert_close(both.received[r][img], alone.received[0][img[-alone.received.shape[1]:]],
                                   rtol=1e-4, atol=1e-6)


def test_generates_guide_run_serves_only_its_own_prompt_and_images():
    large, guide = pair()
    ids, mask = prompt()
    pv, other = pixels(), pixels(seed=7)
    with accel.patch(large, "sgl", guide=guide, keep=5, layer=0) as h, torch.no_grad():
        large(input_ids=ids, pixel_values=other)
        fresh = h.last["kept_indices"].clone()
        # a run left for the same ids but other images is not used
        h.runtime.guide_stash = (ids, None, pv, h.runtime.run_guide(ids, pv, None, 3))
        large(input_ids=ids, pixel_values=other)
        assert torch.equal(h.last["kept_indices"], fresh)
        # generate's inputs= is its input_ids, with early exit (every row exits at threshold 0)
        ref = guide.generate(input_ids=ids, pixel_values=pv, max_new_tokens=2, do_sample=False)
    with accel.patch(large, "sgl", guide=guide, keep=5, exit_threshold=0.0) as h, torch.no_grad():
        got = large.generate(inputs=ids, pixel_values=pv, max_new_tokens=2, do_sample=False)
        assert h.last_exit["exited"] == [True, True]
    assert torch.equal(got, ref)


def test_expanded_batches_reuse_generates_guide_run(monkeypatch):
    import accel.vlm.guide as G

    large, guide = pair()
    ids, mask = prompt()
    pv = pixels()
    calls = []
    real = G.run_guide

    def counting(*a, **k):
        calls.append(a[1].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(G, "run_guide", counting)
    with accel.patch(large, "sgl", guide=guide, keep=5), torch.no_grad():
        out = large.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             num_beams=2, num_return_sequences=2)
    assert calls == [2] and out.shape[0] == 4  # one guide run, for the two prompts, reused by the expanded prefill


@pytest.mark.parametrize("layer", [0, 2])
def test_pruned_left_padded_batch_equals_each_row_alone(layer):
    large, guide = pair()
    ids, mask = prompt(pad=True)
    pv = pixels()
    with accel.patch(large, "sgl", guide=guide, keep=6, layer=layer) as h, torch.no_grad():
        both = large.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=4, do_sample=False)
        kept = h.last["kept_indices"].clone()
        for r in range(2):
            real = mask[r].bool()
            one = large.generate(input_ids=ids[r:r + 1, real], pixel_values=pv[r:r + 1], max_new_tokens=4,
                                 do_sample=False)
            assert torch.equal(h.last["kept_indices"][0], kept[r])
            assert torch.equal(one[0, -4:], both[r, -4:]), r
