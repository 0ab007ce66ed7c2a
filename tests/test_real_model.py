"""Truth on the real embedded model (SmolLM2-135M, converted from the packaged GGUF once and cached)."""
import pytest
import torch

import accel
from accel.eval.passkey import make_passkey, passkey_correct


@pytest.fixture(scope="module")
def smollm():
    from accel.models import load

    return load("smollm2-135m")


def test_passkey_dense_same_tokens_as_unpatched(smollm):
    model, tok = smollm
    s = make_passkey(tok, 1000, depth=0.5, seed=1)
    enc = tok(s.prompt, return_tensors="pt")
    gen = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True,
               pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ref = model.generate(**enc, **gen)
        with accel.patch(model, "dense") as h:
            out = model.generate(**enc, **gen)
            assert h.cache.get_seq_length() == enc["input_ids"].shape[1] + 11
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-4, atol=2e-4)
    n = enc["input_ids"].shape[1]
    assert passkey_correct(tok.decode(out.sequences[0, n:]), s.answer)


def test_batch_of_three_left_padded_and_streamer(smollm, capsys):
    from transformers import TextStreamer

    model, tok = smollm
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
               "def fibonacci(n):"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert enc["attention_mask"][0, 0] == 0  # really left-padded
    gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ref = model.generate(**enc, **gen)
        with accel.patch(model, "dense"):
            out = model.generate(**enc, **gen)
            one = tok(prompts[1:2], return_tensors="pt")
            streamed = model.generate(**one, streamer=TextStreamer(tok, skip_prompt=True), **gen)
    assert torch.equal(out, ref)
    printed = capsys.readouterr().out
    assert tok.decode(streamed[0, one["input_ids"].shape[1]:], skip_special_tokens=True).strip()[:20] in printed


def test_gemma3_sliding_and_global_layers_real_model():
    """The second embedded model: Gemma-3-270m (15 sliding-window layers of 512 + 3 global layers).
    Dense accel gives the unpatched tokens and logits; sliding layers hold only their window."""
    from accel.models import load

    model, tok = load("gemma3-270m")
    s = make_passkey(tok, 1500, depth=0.5, seed=1)
    enc = tok(s.prompt, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    gen = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
               pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ref = model.generate(**enc, **gen)
        with accel.patch(model, "dense") as h:
            out = model.generate(**enc, **gen)
            layers = h.cache.layers
            per_tok = 2 * 256 * 4  # K+V, 1 KV head, head_dim 256, fp32
            for i, layer in enumerate(layers):
                expect = min(n + 7, 511) if layer.is_sliding else n + 7
                assert layer.nbytes() == expect * per_tok, i
            assert sum(lyr.is_sliding for lyr in layers) == 15
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-4, atol=1e-3)
    assert passkey_correct(tok.decode(out.sequences[0, n:]), s.answer)


def test_shipped_hylra_plan_is_found_and_reproducible(smollm):
    """The plan inside the package matches SmolLM2 by fingerprint, and re-running the calibration with the
    arguments it records gives the same layer layout."""
    import accel
    from accel.models.registry import get_adapter
    from accel.plan.shipped import shipped_plan

    model, tok = smollm
    info = get_adapter(model).info()
    plan = shipped_plan("hylra", info)
    assert plan is not None and plan.provenance["fingerprint"] == info.fingerprint
    with accel.patch(model, "hylra") as h:
        assert [lp.mode for lp in h.plan.layers] == [lp.mode for lp in plan.layers]
    full = [i for i, lp in enumerate(plan.layers) if lp.mode == "full"]
    with accel.patch(model, "delta") as h:  # DELTA's calibrated layout: Delta-layers = the plan's full layers
        assert h.plan.provenance["delta_layers"] == [i for i in full if i not in (0, 1)]
        assert [lp.mode for lp in h.plan.layers] == [lp.mode for lp in plan.layers]
    with accel.patch(model, "delta", layout="paper") as h:
        assert h.plan.provenance["delta_layers"] == [2, 15, 23]
    a = plan.provenance["args"]
    again = accel.calibrate(model, tok, tokens=a["tokens"], steps=a["steps"], chunk=a["chunk"],
                            preserved_ratio=a["preserved_ratio"], sink=a["sink"], recent=a["recent"],
                            sparsity=a["sparsity"], computed_ratio=a["computed_ratio"], anchor_mode=a["anchor_mode"],
                            n_texts=a["n_texts"], data=a["data"], metric=a["metric"], progress=False)
    assert [(lp.mode, lp.reuse_src) for lp in again.layers] == [(lp.mode, lp.reuse_src) for lp in plan.layers]


def test_compressed_caches_on_the_real_model(smollm):
    """Shipped duo / moa plans load for SmolLM2; a covering budget is exactly dense; a 25% budget really
    holds ~25% of the bytes (snapkv, duo) and still retrieves this passkey (duo at 50% and 25%, retrieval
    heads ranked by the shipped plan)."""
    model, tok = smollm
    s = make_passkey(tok, 1500, depth=0.4, seed=3)
    enc = tok(s.prompt, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    gen = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
               pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        with accel.patch(model, "dense"):
            ref = model.generate(**enc, **gen)
        with accel.patch(model, "duo", budget_ratio=1.0):
            full = model.generate(**enc, **gen)
        assert torch.equal(full.sequences, ref.sequences)
        with accel.patch(model, "snapkv", budget_ratio=0.25) as h:
            model.generate(**enc, **gen)
            dense_bytes = 30 * 3 * (n + 7) * 64 * 4 * 2
            frac = h.cache.nbytes() / dense_bytes
            assert 0.24 <= frac <= 0.27, frac
        with accel.patch(model, "duo", budget_ratio=0.5):
            out = model.generate(**enc, **gen)
        with accel.patch(model, "duo", budget_ratio=0.25) as h:  # default: streaming heads keep scored middles
            out25 = model.generate(**enc, **gen)
            frac25 = h.cache.nbytes() / dense_bytes
            assert 0.2 <= frac25 <= 0.26, frac25
        with accel.patch(model, "moa", density=0.5, max_new_tokens=8) as h:
            model.generate(**enc, **gen)
            assert h.cache.nbytes() < 0.75 * dense_bytes
    assert passkey_correct(tok.decode(ref.sequences[0, n:]), s.answer)
    assert passkey_correct(tok.decode(out.sequences[0, n:]), s.answer)
    assert passkey_correct(tok.decode(out25.sequences[0, n:]), s.answer)


def test_shipped_duo_plan_is_reproducible(smollm):
    """Re-running the duo head profiler with the arguments the shipped plan records gives the same head
    scores (and so the same ranking) - about 45 s."""
    from accel.models.registry import get_adapter
    from accel.calibration.duo import calibrate_duo
    from accel.plan.shipped import shipped_plan

    model, tok = smollm
    plan = shipped_plan("duo", get_adapter(model).info())
    a = plan.provenance["args"]
    again = calibrate_duo(model, tok, tokens=a["tokens"], steps=a["steps"], n_texts=a["n_texts"], sink=a["sink"],
                          recent=a["recent"], retrieval_fraction=a["retrieval_fraction"], metric=a["metric"],
                          reduce=a.get("reduce", "mean"), progress=False)
    for la, lb in zip(again.layers, plan.layers):
        if lb.heads is None:
            continue
        for ha, hb in zip(la.heads, lb.heads):
            assert ha.kind == hb.kind and abs(ha.score - hb.score) <= 1e-4 * max(1.0, abs(hb.score))
