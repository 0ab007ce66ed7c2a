"""TCA-Attention: the log-Gaussian configuration family, the per-block choice of the least redundant keys, the prefill
rule against a per-query reference, a prompt prefilled at once against the same prompt fed token by token, the kept
counts and released bytes, exactness with full quotas (four architectures, padded batches), calibration, refusals."""
import pytest
import torch

import accel
from accel.errors import AccelError
from accel.plan import HeadPlan, LayerPlan, Plan
from accel.policies import tca as TCA

from .conftest import gen, left_padded, model4, same


def tca_plan(quotas, block=4, sink=4, window=8, errors=None):
    """A tca plan with ``quotas[layer][head]`` tokens per block (None: a layer left dense)."""
    layers = []
    for i, row in enumerate(quotas):
        if row is None:
            layers.append(LayerPlan(mode="full"))
            continue
        params = {"errors": errors[i]} if errors is not None else {}
        layers.append(LayerPlan(mode="compress", kv="tca", heads=[HeadPlan(kind="tca", budget=q) for q in row],
                                params=params))
    return Plan(policy="tca", num_layers=len(quotas), num_kv_heads=len(quotas[0] or [0, 0]), layers=layers,
                params={"block": block, "sink": sink, "window": window, "sigma": 1.0})


KW = dict(block=4, sink=4, window=8)


def test_the_log_gaussian_family_spans_the_quotas():
    for mu in (-1.0, 0.0, 1.5, 3.0, 6.0):
        p = TCA.log_gaussian(mu, 1.0, 16)
        assert len(p) == 5 and abs(sum(p) - 1) < 1e-12
    quotas = [TCA.config_quota(mu / 8, 1.0, 16) for mu in range(-16, 65)]
    assert quotas == sorted(quotas) and quotas[0] == 1 and quotas[-1] >= 15  # monotone in mu
    assert TCA.config_quota(4.0, 0.0, 16) == 16 and TCA.config_quota(0.0, 0.0, 16) == 1  # sigma 0: one k
    from accel.policies.tca import family, pick

    fam = family(16, 1.0)
    assert fam[16] is not None and min(fam) == 1 and all(TCA.config_quota(mu, 1.0, 16) == q or q == 16
                                                          for q, mu in fam.items())
    errs = [0.5, 0.3, 0.2, 0.1] + [0.05] * 11 + [0.0]
    assert pick(errs, fam, 0.1, 16) == 4 and pick(errs, fam, 0.0, 16) == 16 and pick(errs, fam, 1.0, 16) == 1


def test_each_block_keeps_its_least_redundant_keys():
    g = torch.Generator().manual_seed(0)
    kb = torch.randn(2, 3, 5, 8, generator=g)  # [Hkv, nb, block, D]
    kb[0, 0, 2] = kb[0, 0, 1] * 3  # a duplicate direction: both redundant
    keep = TCA.block_keep(kb, torch.tensor([2, 5]))
    assert keep.shape == (2, 3, 5) and keep[0].sum(-1).tolist() == [2, 2, 2] and bool(keep[1].all())
    for h in range(2):
        for j in range(3):
            u = torch.nn.functional.normalize(kb[h, j], dim=-1)
            red = u @ u.mean(0)
            want = sorted(torch.argsort(red, stable=True)[: [2, 5][h]].tolist())
            assert torch.nonzero(keep[h, j]).flatten().tolist() == want


def test_context_metric_keeps_the_keys_least_like_the_window_after_their_block():
    g = torch.Generator().manual_seed(11)
    Hkv, T, D, s, w, b = 2, 61, 8, 4, 8, 4
    k = torch.randn(1, Hkv, T, D, generator=g)
    quota = torch.tensor([1, 3])
    kept, _ = TCA.select(k, torch.zeros(1, dtype=torch.long), quota, s, w, b, "context")
    nb = (T - 1 - s - w) // b
    assert nb > 5
    for h in range(Hkv):
        for j in range(nb):
            lo = s + j * b
            u = torch.nn.functional.normalize(k[0, h, lo:lo + b], dim=-1)
            ref = torch.nn.functional.normalize(k[0, h, lo + b:lo + b + w], dim=-1).mean(0)
            want = sorted(torch.argsort(u @ ref, stable=True)[: int(quota[h])].tolist())
            assert torch.nonzero(kept[0, h, lo:lo + b]).flatten().tolist() == want, (h, j)
    cos, _ = TCA.select(k, torch.zeros(1, dtype=torch.long), quota, s, w, b, "cosine")
    assert not torch.equal(kept, cos)  # a different rule from the block's own mean
    with pytest.raises(AccelError, match="window"):
        TCA.block_keep(k[:, :, :b].view(1, Hkv, 1, b, D), quota, "context")  # no reference given


def test_prefill_attention_matches_a_per_query_reference():
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, T, D, Tq = 2, 4, 2, 61, 8, 23
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    first = torch.tensor([0, 9])
    quota = torch.tensor([1, 3])
    s, w, b = 4, 8, 4
    kept, blk = TCA.select(k, first, quota, s, w, b)
    out = TCA.tca_attention(q, k, v, kept, blk, first, 0.3, s, w, b, chunk=7)
    for bi in range(B):
        f = int(first[bi])
        for i in range(Tq):
            t = T - Tq + i
            n = t - f + 1
            done = max(0, (n - 2 - s - w) // b)  # blocks compressed before the query's token arrived
            for h in range(H):
                kh = h // (H // Hkv)
                keys = []
                for u in range(f, t + 1):
                    r = u - f
                    j = (r - s) // b if r >= s else -1
                    if r < s or j >= done:
                        keys.append(u)
                    else:
                        kb = k[bi, kh, f + s + j * b: f + s + (j + 1) * b].view(1, 1, b, D)
                        if bool(TCA.block_keep(kb, quota[kh:kh + 1])[0, 0, (r - s) % b]):
                            keys.append(u)
                p = torch.softmax(q[bi, h, i] @ k[bi, kh, keys].T * 0.3, -1)
                assert torch.allclose(out[bi, h, i], p @ v[bi, kh, keys], atol=1e-5), (bi, i, h)


def _kept_positions(layer):
    rows, live = layer.ragged.rows()
    pos = layer.ragged.pos[rows]
    return [[sorted(pos[b, h][live[b, h]].tolist()) for h in range(pos.shape[1])] for b in range(pos.shape[0])]


@pytest.mark.parametrize("metric", ["cosine", "context"])
def test_a_prompt_prefilled_at_once_equals_it_fed_token_by_token(metric):
    """The prefill rule is the decode rule: the logits of every position and the kept tokens of every head agree."""
    m = model4("llama")
    ids = torch.randint(3, 256, (1, 70), generator=torch.Generator().manual_seed(2))
    plan = tca_plan([[1, 2], [3, 1], [2, 4], [4, 4]])
    with accel.patch(m, "tca", plan=plan, sparse_prefill=True, metric=metric, **KW) as h, torch.no_grad():
        full = m(input_ids=ids, use_cache=True)
        assert h.runtime.stats.get("tca_prefill_layers", 0) == 3  # layer 3 keeps every token: dense
        n0 = 10
        o = m(input_ids=ids[:, :n0], use_cache=True)
        cache = o.past_key_values
        steps = [o.logits[:, -1]]
        for t in range(n0, ids.shape[1]):
            o = m(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(o.logits[:, -1])
    stepped = torch.stack(steps[:-1], 1)
    assert torch.allclose(stepped, full.logits[:, n0 - 1:-1], atol=1e-4)
    assert torch.allclose(steps[-1], full.logits[:, -1], atol=1e-4)
    for i in range(3):
        assert _kept_positions(full.past_key_values.layers[i]) == _kept_positions(cache.layers[i])
    assert full.past_key_values.layers[3].ragged is None  # quota = block: never compressed


def test_kept_counts_follow_the_quotas_and_the_bytes_are_released():
    m = model4("llama")
    ids, mask = left_padded(B=2, L=90, pads=(0, 13), seed=3)
    plan = tca_plan([[1, 3]] * 4)
    with accel.patch(m, "tca", plan=plan, **KW):
        out = m.generate(ids, attention_mask=mask, max_new_tokens=21, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    cache = out.past_key_values
    T = 90 + 21 - 1  # the last token is not in the cache yet
    for layer in cache.layers:
        kept = _kept_positions(layer)
        for b, pad in enumerate((0, 13)):
            n = T - pad
            done = (n - 1 - 4 - 8) // 4
            for hh, quota in enumerate((1, 3)):
                assert len(kept[b][hh]) == 4 + quota * done + (n - 4 - 4 * done), (b, hh)
                assert kept[b][hh][:4] == list(range(pad, pad + 4))  # sinks
                assert kept[b][hh][-(n - 4 - 4 * done):] == list(range(pad + 4 + 4 * done, pad + n))  # the tail
                for j in range(done):  # each compressed block holds its quota
                    lo = pad + 4 + 4 * j
                    assert sum(lo <= p < lo + 4 for p in kept[b][hh]) == quota
        dense_bytes = 2 * 2 * T * layer.ragged.row_bytes()
        assert layer.nbytes() < 0.6 * dense_bytes


@pytest.mark.exactness
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_full_quotas_equal_dense_on_padded_batches(arch):
    m = model4(arch)
    ids, mask = left_padded(B=3, L=60, pads=(0, 7, 19), seed=4)
    ref = gen(m, ids, "dense", mask=mask, new=14)
    for sparse_prefill in (False, True):
        out = gen(m, ids, "tca", mask=mask, new=14, plan=tca_plan([[4, 4]] * 4), sparse_prefill=sparse_prefill, **KW)
        assert same(ref, out)
    sparse = gen(m, ids, "tca", mask=mask, new=14, plan=tca_plan([[1, 2]] * 4), **KW)
    assert not same(ref, sparse)  # the quotas do change the attention


@pytest.mark.parametrize("sparse_prefill,metric", [(False, "cosine"), (True, "cosine"), (False, "context"),
                                                    (True, "context")])
def test_a_padded_batch_equals_each_row_alone(sparse_prefill, metric):
    m = model4("llama")
    ids, mask = left_padded(B=2, L=64, pads=(0, 11), seed=5)
    plan = tca_plan([[1, 2], [2, 3], [3, 1], [1, 1]])
    plan.params["metric"] = metric  # the policy takes the plan's metric
    both = gen(m, ids, "tca", mask=mask, new=10, plan=plan, sparse_prefill=sparse_prefill, **KW)
    for b, pad in enumerate((0, 11)):
        alone = gen(m, ids[b:b + 1, pad:], "tca", new=10, plan=plan, sparse_prefill=sparse_prefill, **KW)
        assert torch.equal(both.sequences[b, 64:], alone.sequences[0, 64 - pad:])
        assert max((x[b] - y[0]).abs().max().item() for x, y in zip(both.scores, alone.scores)) < 1e-4


def test_dense_prefill_option_compresses_the_same_tokens():
    m = model4("llama")
    ids = torch.randint(3, 256, (1, 80), generator=torch.Generator().manual_seed(6))
    plan = tca_plan([[1, 2]] * 4)
    caches = []
    for sparse in (True, False):
        with accel.patch(m, "tca", plan=plan, sparse_prefill=sparse, **KW), torch.no_grad():
            caches.append(m(input_ids=ids, use_cache=True).past_key_values)
    assert _kept_positions(caches[0].layers[0]) == _kept_positions(caches[1].layers[0])  # layer 0: same keys


def test_the_plan_names_the_metric_and_a_continued_prompt_keeps_what_one_prefill_keeps():
    """Without ``metric=`` the policy takes the plan's (cosine for a plan that names none); a prompt continued in
    chunks (several blocks compressed in one call on an already compressed cache) keeps what the whole prompt
    prefilled at once keeps, and so does a prompt fed token by token (layer 0, whose keys do not depend on what the
    chunks attended to)."""
    m = model4("llama")
    ids = torch.randint(3, 256, (1, 80), generator=torch.Generator().manual_seed(12))

    def kept(plan, chunks=(80,), **kw):
        with accel.patch(m, "tca", plan=plan, **{**KW, **kw}), torch.no_grad():
            cache, t = None, 0
            for n in chunks:
                cache = m(input_ids=ids[:, t:t + n], past_key_values=cache, use_cache=True).past_key_values
                t += n
        return [_kept_positions(cache.layers[i]) for i in range(4)]

    plain = tca_plan([[1, 2]] * 4)
    ctx = tca_plan([[1, 2]] * 4)
    ctx.params["metric"] = "context"
    assert kept(ctx) == kept(plain, metric="context") != kept(plain) == kept(plain, metric="cosine")
    one = kept(ctx)[0]
    assert kept(ctx, chunks=(30, 25, 25))[0] == one == kept(ctx, chunks=(30,) + (1,) * 50)[0]
    assert kept(plain, chunks=(30, 50))[0] == kept(plain)[0]
    bad = tca_plan([[1, 2]] * 4)
    bad.params["metric"] = "contex"
    with pytest.raises(AccelError, match="the plan's metric 'contex'"):
        accel.patch(m, "tca", plan=bad, **KW)
    with pytest.raises(AccelError, match="metric must be one of"):
        TCA.block_keep(torch.zeros(1, 1, 4, 8), torch.tensor([1]), "contex")


def test_bad_options_and_plans_are_refused_in_one_line():
    m = model4("llama")
    for kw, word in ((dict(block=6), "power of two"), (dict(window=10), "multiple of block"),
                     (dict(tolerance=-1.0), "tolerance"), (dict(decode="grow"), "decode")):
        with pytest.raises(AccelError, match=word):
            accel.patch(m, "tca", plan=tca_plan([[1, 2]] * 4), **{**KW, **kw})
    with pytest.raises(AccelError, match="window >= block"):
        accel.patch(m, "tca", plan=tca_plan([[1, 2]] * 4, window=0), block=4, sink=4, window=0, metric="context")
    ctx_plan = tca_plan([[1, 2]] * 4, window=0)
    ctx_plan.params["metric"] = "context"
    with pytest.raises(AccelError, match="the plan's metric 'context'"):
        accel.patch(m, "tca", plan=ctx_plan, block=4, sink=4, window=0)
    ctx_plan = tca_plan([[1, 2]] * 4)
    ctx_plan.params["metric"] = "context"
    with pytest.raises(AccelError, match="calibrated with metric='context'"):
        accel.patch(m, "tca", plan=ctx_plan, metric="cosine", **KW)
    with pytest.raises(AccelError, match="calibrated with block=4"):
        accel.patch(m, "tca", plan=tca_plan([[1, 2]] * 4), block=8, sink=4, window=8)
    with pytest.raises(AccelError, match="1..4"):
        accel.patch(m, "tca", plan=tca_plan([[1, 7]] * 4), **KW)
    with pytest.raises(AccelError, match="errors"):
        accel.patch(m, "tca", plan=tca_plan([[1, 2]] * 4), tolerance=0.1, **KW)
    with pytest.raises(AccelError, match="accel plan --model PATH --policy tca"):
        accel.patch(m, "tca")  # no plan ships for a random model
    assert not hasattr(m.model.layers[0].self_attn, "_accel")


def test_calibration_end_to_end_and_tolerance_picks_quotas_at_patch_time():
    from accel.calibration.tca import calibrate_tca

    m = model4("llama")

    class Tok:
        def __call__(self, text, return_tensors=None, **kw):
            return {"input_ids": torch.tensor([[3 + (ord(c) % 200) for c in text]])}

    txt = "the quick brown fox jumps over the lazy dog " * 10
    plan = calibrate_tca(m, Tok(), [txt, txt[::-1]], tokens=300, steps=32, progress=False, tolerance=0.2, **KW)
    plan.validate()
    assert plan.policy == "tca" and plan.params["block"] == 4 and plan.params["metric"] == "context"
    for lp in plan.layers:
        errs = lp.params["errors"]
        assert len(errs) == 2 and all(len(e) == 4 and e[3] == 0.0 for e in errs)  # keeping the whole block: exact
        for hp, e in zip(lp.heads, errs):
            assert e[hp.budget - 1] <= 0.2 and all(x > 0.2 for x in e[: hp.budget - 1])  # the sparsest within it
    again = TCA.TCAPolicy(tolerance=0.2, **KW)  # tolerance= at patch time follows the calibrator's rule
    assert all(again.quotas(plan, i, 2).tolist() == [h.budget for h in lp.heads] for i, lp in enumerate(plan.layers))
    ids = torch.randint(3, 200, (1, 120), generator=torch.Generator().manual_seed(7))
    ref = gen(m, ids, "dense", new=6)
    assert same(ref, gen(m, ids, "tca", new=6, plan=plan, tolerance=0.0, **KW))  # tolerance 0: every head whole
    out = gen(m, ids, "tca", new=6, plan=plan, **KW)
    assert out.sequences.shape[1] == 126


def test_inline_boolean_options_read_as_booleans():
    """``name@flag=False`` (Python spelling) and ``flag=false`` (JSON) both turn a flag off; a string that is neither
    is refused rather than read as a true value."""
    from accel.policies.registry import make_policy

    for spec in ("tca@sparse_prefill=False", "tca@sparse_prefill=false", "moa@sparse_prefill=False"):
        p = make_policy(spec).kv[0]
        assert p.sparse_prefill is False and p.dense_prefill is True, spec
    assert make_policy("snapkv@budget=None@budget_ratio=0.5").kv[0].budget is None
    for spec in ("tca@sparse_prefill=no", "moa@sparse_prefill=off"):
        with pytest.raises(AccelError, match="sparse_prefill must be True or False"):
            make_policy(spec)
