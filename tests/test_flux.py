"""Flux Attention's layer router: forced full routes equal dense and forced sparse routes equal the backend alone
(four architectures, padded batches), a covering budget is exact, per-request routes (a padded batch equals each row
alone, the target ratio per row), rows followed through beam search, the evaluation harness's shared prefill, router
training end to end, refusals."""
import copy

import pytest
import torch

import accel
from accel import compat
from accel.cache import sequences
from accel.errors import AccelError
from accel.plan import LayerPlan, Plan
from accel.policies import flux as FX

from .conftest import gen, left_padded, model4, same

KW = dict(topk=24, min_topk=0, sink=4, recent=8, chunk=4, page_size=4, probe=8, feature_ratio=0.25)


def flux_plan(n=4, sliding=(), router=None, backends=("quest", "select", "window")):
    """A flux plan for an ``n``-layer model: routed layers (sliding ones stay full) and, with ``router``, the given
    router weights for every backend (default: random weights that depend on the features)."""
    layers = [LayerPlan(mode="full" if i in sliding else "flux", attention="flux") for i in range(n)]
    F = len(FX.FEATURES)
    if router is None:
        g = torch.Generator().manual_seed(11)
        router = {"w1": torch.randn(F + n, 8, generator=g).tolist(), "b1": [0.0] * 8,
                  "w2": torch.randn(8, generator=g).tolist(), "b2": 0.0, "mu": [0.0] * F, "sd": [1.0] * F,
                  "threshold": 0.0, "static_order": list(range(n))[::-1]}
    args = FX.FluxPolicy(**KW).feature_args()
    return Plan(policy="flux", num_layers=n, num_kv_heads=2, layers=layers,
                params={"routers": {b: router for b in backends}, "features": list(FX.FEATURES), "feature_args": args})


def feature_router(n=4):
    """A router that ranks layers by their first feature alone (the log of the attention mass a sink + window of the
    feature budget misses), so two different prompts get different routes."""
    F = len(FX.FEATURES)
    w1 = torch.zeros(F + n, 8)
    w1[0, 0] = 1.0
    w2 = torch.zeros(8)
    w2[0] = 1.0
    return {"w1": w1.tolist(), "b1": [20.0] + [0.0] * 7, "w2": w2.tolist(), "b2": 0.0, "mu": [0.0] * F,
            "sd": [1.0] * F, "threshold": 20.0, "static_order": [3, 2, 1, 0]}


def two_prompts(L=64, pads=(0, 11), seed=5):
    ids, mask = left_padded(B=2, L=L, pads=pads, seed=seed)
    ids[1, pads[1]:] = torch.arange(L - pads[1]) % 5 + 7  # a short repeated cycle: attention unlike the random row's
    return ids, mask


def sliding_of(m):
    types = getattr(m.config, "layer_types", None) or []
    return tuple(i for i, t in enumerate(types) if t != "full_attention")


@pytest.mark.exactness
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_forced_full_routes_and_a_covering_budget_equal_dense(arch):
    m = model4(arch)
    ids, mask = left_padded(B=3, L=60, pads=(0, 7, 19), seed=4)
    plan = flux_plan(sliding=sliding_of(m))
    ref = gen(m, ids, "dense", mask=mask, new=14)
    for backend in FX.BACKENDS:
        assert same(ref, gen(m, ids, "flux", mask=mask, new=14, plan=plan, backend=backend, route="full", **KW))
        cover = {**KW, "topk": 4096}
        assert same(ref, gen(m, ids, "flux", mask=mask, new=14, plan=plan, backend=backend, route="sparse", **cover))
        assert same(ref, gen(m, ids, "flux", mask=mask, new=14, plan=plan, backend=backend, **cover))
    sparse = gen(m, ids, "flux", mask=mask, new=14, plan=plan, route="sparse", **KW)
    assert not same(ref, sparse)  # the sparse layers do change the attention


@pytest.mark.exactness
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_forced_sparse_routes_equal_the_backend_alone(arch):
    """route='sparse' with backend quest is Quest on every routed layer; with backend select it is a hylra plan whose
    routed layers all select their own top-k."""
    m = model4(arch)
    sl = sliding_of(m)
    ids, mask = left_padded(B=2, L=70, pads=(0, 9), seed=6)
    plan = flux_plan(sliding=sl)
    quest_plan = Plan(policy="quest", num_layers=4, num_kv_heads=2,
                      layers=[LayerPlan(mode="full" if i in sl else "quest", attention="quest") for i in range(4)])
    for summaries, agg in (("float32", "max"), ("bfloat16", "max"), ("float32", "none")):
        q = gen(m, ids, "quest", mask=mask, new=12, plan=quest_plan, topk=24, min_topk=0, page_size=4, agg=agg,
                summary_dtype=summaries)
        f = gen(m, ids, "flux", mask=mask, new=12, plan=plan, backend="quest", route="sparse", summary_dtype=summaries,
                **dict(KW, agg=agg))
        assert same(q, f)
    hy_plan = Plan(policy="hylra", num_layers=4, num_kv_heads=2,
                   layers=[LayerPlan(mode="full" if i in sl else "select", attention="hylra") for i in range(4)])
    h = gen(m, ids, "hylra", mask=mask, new=12, plan=hy_plan, topk=24, chunk=4, sink=4, recent=8, agg="max", min_topk=0)
    f = gen(m, ids, "flux", mask=mask, new=12, plan=plan, backend="select", route="sparse", **KW)
    assert same(h, f, tol=1e-4)


def test_rows_routed_differently_with_each_query_head_on_its_own_pages_equal_their_own_layouts():
    """flux over quest with agg='none' (every query head selects its own pages): where the rows of a batch take
    different routes, each row generates what quest with agg='none' does on the same batch with that row's routes
    as its plan (full where the row runs full attention)."""
    m = model4("llama")
    ids, mask = two_prompts()
    plan = flux_plan(router=feature_router())
    with accel.patch(m, "flux", plan=plan, backend="quest", full_ratio=0.5, **dict(KW, agg="none")) as h:
        f = m.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                       output_scores=True, pad_token_id=0)
        routes = sequences.state_of(h.runtime.last_cache).shared["flux.route"]["route"]
    assert not torch.equal(routes[0], routes[1]) and bool(routes.any(1).all()) and not bool(routes.all(1).any())
    for b in range(2):
        own = Plan(policy="quest", num_layers=4, num_kv_heads=2,
                   layers=[LayerPlan(mode="full" if bool(routes[b, i]) else "quest", attention="quest") for i in range(4)])
        q = gen(m, ids, "quest", mask=mask, new=10, plan=own, topk=24, min_topk=0, page_size=4, agg="none")
        assert torch.equal(f.sequences[b], q.sequences[b])
        assert max((x[b] - y[b]).abs().max().item() for x, y in zip(f.scores, q.scores)) < 1e-4


def test_window_backend_attends_sink_and_recent_of_each_row():
    first = torch.tensor([0, 5])
    idx, counts = FX.window_positions(first, 40, 12, 4)
    assert counts.view(-1).tolist() == [12, 12]
    assert idx[0, 0].tolist() == [0, 1, 2, 3] + list(range(32, 40))
    assert idx[1, 0].tolist() == [5, 6, 7, 8] + list(range(32, 40))
    assert FX.window_positions(first, 10, 12, 4) is None  # the budget covers the context


def test_routes_follow_the_target_ratio_per_row_and_a_padded_batch_equals_each_row_alone():
    """Each row's features and routes are what it gets alone; the two rows take different routes, so layers where
    they disagree run one sparse call with the full-attention row selecting every position; with a budget in tokens
    and the window backend (whose positions follow each row's real tokens) each row generates what it does alone."""
    m = model4("llama")
    ids, mask = two_prompts()
    plan = flux_plan(router=feature_router())
    kw = dict(KW, backend="window", full_ratio=0.5)
    with accel.patch(m, "flux", plan=plan, **kw) as h:
        both = m.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                          output_scores=True, pad_token_id=0)
        st = h.runtime.stats
        assert st["flux_routed_layers"] == 8 and st["flux_full_layers"] == 4  # 2 of 4 layers per row
        seq = sequences.state_of(h.runtime.last_cache)
        feats = torch.stack([seq.layer_state[i]["flux.features"][0] for i in range(4)], 1)
        routes = seq.shared["flux.route"]["route"]
        text = h.summary()
    assert not torch.equal(routes[0], routes[1])  # per request
    assert "flux: backend window, routing ratio" in text and "2 of 4 routed layers full" in text
    assert str(torch.nonzero(routes[1]).flatten().tolist()) in text
    score = FX.Router.from_plan(plan, "window").scores(feats, torch.arange(4))
    assert torch.equal(routes, torch.zeros(2, 4, dtype=torch.bool).scatter_(1, score.topk(2, dim=1).indices, True))
    for b, pad in enumerate((0, 11)):
        with accel.patch(m, "flux", plan=plan, **kw) as h:
            alone = m.generate(ids[b:b + 1, pad:], max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                               output_scores=True, pad_token_id=0)
            seq = sequences.state_of(h.runtime.last_cache)
            f1 = torch.stack([seq.layer_state[i]["flux.features"][0] for i in range(4)], 1)
            assert torch.equal(seq.shared["flux.route"]["route"][0], routes[b])
        assert torch.allclose(f1[0], feats[b], atol=1e-4)
        assert torch.equal(both.sequences[b, 64:], alone.sequences[0, 64 - pad:])
        assert max((x[b] - y[0]).abs().max().item() for x, y in zip(both.scores, alone.scores)) < 1e-4


def test_a_row_shorter_than_the_probe_reads_finite_features():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 10, 16, generator=g), torch.randn(2, 2, 10, 16, generator=g)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :7] = False  # 3 real tokens, probe of 8
    f = FX.layer_features(q, k, valid, 0.25, 8, 2, lambda T: max(1, T // 4))
    assert bool(torch.isfinite(f).all())
    alone = FX.layer_features(q[1:, :, 7:], k[1:, :, 7:], None, 0.25, 8, 2, lambda T: max(1, T // 4))
    assert torch.allclose(f[1], alone[0], atol=1e-5)


def test_threshold_static_and_the_full_ratio_ends():
    m = model4("llama")
    ids = torch.randint(3, 200, (1, 80), generator=torch.Generator().manual_seed(9))
    plan = flux_plan()
    with accel.patch(m, "flux", plan=plan, routing="static", full_ratio=0.5, **KW), torch.no_grad():
        out = m(input_ids=ids, use_cache=True)
        m(input_ids=ids[:, -1:], use_cache=True, **compat.cache_kwargs(m, compat.output_cache(out)))
        r = sequences.state_of(compat.output_cache(out)).shared["flux.route"]["route"]
    assert r[0].tolist() == [False, False, True, True]  # static order 3, 2, 1, 0: the top half
    pol = FX.FluxPolicy(routing="threshold", **KW)
    with accel.patch(m, pol, plan=plan) as h, torch.no_grad():
        out = m(input_ids=ids, use_cache=True)
        m(input_ids=ids[:, -1:], use_cache=True, **compat.cache_kwargs(m, compat.output_cache(out)))
        r = sequences.state_of(compat.output_cache(out)).shared["flux.route"]["route"]
        rt = h.runtime
        feats = torch.stack([rt.layer_state[i]["flux.features"][0] for i in range(4)], 1)
    score = FX.Router.from_plan(plan, "quest").scores(feats, torch.arange(4))
    assert torch.equal(r, score > 0.0)
    ref = gen(m, ids, "dense", new=6)
    for routing in ("ratio", "threshold", "static"):  # full_ratio=1: every layer full, exact
        assert same(ref, gen(m, ids, "flux", new=6, plan=plan, routing=routing, full_ratio=1, **KW))
    zero = gen(m, ids, "flux", new=6, plan=plan, routing="threshold", full_ratio=0, **KW)
    assert same(zero, gen(m, ids, "flux", new=6, plan=plan, route="sparse", **KW))  # full_ratio=0: every layer sparse


def test_dense_layers_are_always_full_and_count_in_the_ratio():
    """dense_layers=k: the model's first k layers run full for every request whatever their scores (also at
    full_ratio=0, and where they alone exceed full_ratio), and the router picks the rest of the full_ratio among the
    other layers (ratio: by score; static: by the plan's order; threshold: the layers past the threshold, plus the
    k)."""
    m = model4("llama")
    ids, mask = two_prompts()
    plan = flux_plan(router=feature_router())
    for routing, dense, ratio in (("ratio", 1, 0.5), ("ratio", 2, 0.5), ("static", 1, 0.5), ("threshold", 1, 0.25),
                                  ("ratio", 0, 0.5), ("ratio", 1, 0.0), ("ratio", 3, 0.25)):
        with accel.patch(m, "flux", plan=plan, **dict(KW, backend="window", full_ratio=ratio, routing=routing,
                                                      dense_layers=dense)) as h:
            m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
            seq = sequences.state_of(h.runtime.last_cache)
            routes = seq.shared["flux.route"]["route"]
            feats = torch.stack([seq.layer_state[i]["flux.features"][0] for i in range(4)], 1)
            text = h.summary()
        score = FX.Router.from_plan(plan, "window").scores(feats, torch.arange(4))
        want = torch.zeros(2, 4, dtype=torch.bool)
        n_rest = max(0, round(ratio * 4) - dense)  # full_ratio=0 or 1/4 with more dense layers: only those
        if routing == "ratio" and n_rest:
            want.scatter_(1, score[:, dense:].topk(n_rest, dim=1).indices + dense, True)
        elif routing == "static":  # feature_router's order: 3, 2, 1, 0
            want[:, 3] = True
        else:
            want = score > 20.0
        want[:, :dense] = True
        assert torch.equal(routes, want), (routing, dense)
        assert (f"the first {dense} always" in text) == (dense > 0)
        if dense == 0:
            assert not bool(routes[:, 0].any())  # the router alone leaves layer 0 sparse in both rows
    with pytest.raises(AccelError, match="^flux: dense_layers must be an integer >= 0, got -1$"):
        accel.patch(m, "flux", plan=plan, dense_layers=-1, **KW)


@pytest.mark.exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_quest_backend_runs_in_the_one_call_stack_bit_for_bit(dtype):
    """With the quest backend, a decode step whose layers each run full or sparse for every row runs in the one-call
    C++ stack (Quest's pages selected and attended there); a step where two rows take different routes on a layer
    runs the layers one by one. Either way tokens, logits and the KV bytes counted equal the per-layer path's; the
    window and select backends never take the stack."""
    m = copy.deepcopy(model4("llama")).to(dtype)
    plan = flux_plan(router=feature_router())
    cases = [(left_padded(B=2, L=70, pads=(0, 9), seed=6), dict(routing="static"), 11),  # same layers in both rows
             (two_prompts(), dict(), 0)]  # rows routed differently
    for (ids, mask), opts, stack_calls in cases:
        res = {}
        for whole in (True, False):
            with accel.patch(m, "flux", plan=plan, full_ratio=0.5, **opts, **KW) as h, torch.no_grad():
                assert h.runtime.fused._stack_reason is None
                h.runtime.fused.whole_stack = whole
                out = m.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                 return_dict_in_generate=True, output_scores=True, pad_token_id=0)
                res[whole] = (out, dict(h.runtime.stats))
        (a, sa), (b, sb) = res[True], res[False]
        assert torch.equal(a.sequences, b.sequences) and all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))
        assert sa.pop("stack_calls", 0) == stack_calls and sa == sb
    for backend in ("window", "select"):
        with accel.patch(m, "flux", plan=plan, backend=backend, **KW) as h:
            assert f"flux's {backend!r} backend" in h.runtime.fused._stack_reason


def test_routes_follow_reordered_rows():
    """Rows with different routes swapped after routing (what reorder_cache does in beam search) keep their routes."""
    m = model4("llama")
    ids, mask = two_prompts(pads=(0, 0))
    plan = flux_plan(router=feature_router())
    nxt = torch.tensor([[5], [9]])

    def run(swap):
        with accel.patch(m, "flux", plan=plan, full_ratio=0.5, **KW), torch.no_grad():
            out = m(input_ids=ids, use_cache=True)
            cache = compat.output_cache(out)
            out = m(input_ids=nxt, use_cache=True, **compat.cache_kwargs(m, cache))
            cache = compat.output_cache(out)
            routes = sequences.state_of(cache).shared["flux.route"]["route"]
            step = nxt
            if swap:
                cache.reorder_cache(torch.tensor([1, 0]))
                step = nxt.flip(0)
            return m(input_ids=step, use_cache=True, **compat.cache_kwargs(m, cache)).logits[:, -1], routes

    plain, routes = run(False)
    swapped, _ = run(True)
    assert not torch.equal(routes[0], routes[1])
    assert torch.allclose(swapped.flip(0), plain, atol=1e-5)


def test_a_new_prompt_is_routed_from_its_own_prefill():
    """A continued cache is routed again after its next prompt; a prompt written under another patch (no features)
    is refused instead of being routed from the previous prompt's features."""
    m = model4("llama")
    ids = torch.randint(3, 200, (1, 70), generator=torch.Generator().manual_seed(4))
    more = torch.randint(3, 200, (1, 30), generator=torch.Generator().manual_seed(5))
    plan = flux_plan()
    with torch.no_grad():
        with accel.patch(m, "flux", plan=plan, full_ratio=0.5, **KW):
            cache = compat.output_cache(m(input_ids=ids, use_cache=True))
            cache = compat.output_cache(m(input_ids=ids[:, -1:], use_cache=True, **compat.cache_kwargs(m, cache)))
            first = sequences.state_of(cache).shared["flux.route"]
        with accel.patch(m, "dense"):
            cache = compat.output_cache(m(input_ids=more, use_cache=True, **compat.cache_kwargs(m, cache)))
        with accel.patch(m, "flux", plan=plan, full_ratio=0.5, **KW), pytest.raises(AccelError, match="latest prompt"):
            m(input_ids=more[:, -1:], use_cache=True, **compat.cache_kwargs(m, copy.deepcopy(cache)))
        with accel.patch(m, "flux", plan=plan, full_ratio=0.5, **KW):
            cache = compat.output_cache(m(input_ids=more, use_cache=True, **compat.cache_kwargs(m, cache)))
            m(input_ids=more[:, -1:], use_cache=True, **compat.cache_kwargs(m, cache))
            again = sequences.state_of(cache).shared["flux.route"]
    assert again["mark"] == first["mark"] + 2 and again is not first
    # a cache decoded under flux and continued under route="full" is dense, whatever routes it held
    with accel.patch(m, "dense"), torch.no_grad():
        ref = m(input_ids=more[:, :1], use_cache=True, **compat.cache_kwargs(m, copy.deepcopy(cache))).logits
    with accel.patch(m, "flux", plan=plan, route="full", **KW), torch.no_grad():
        out = m(input_ids=more[:, :1], use_cache=True, **compat.cache_kwargs(m, cache)).logits
    assert torch.allclose(out, ref, atol=1e-5)


def test_rows_through_reorders_and_beam_search_equal_each_request_alone():
    from accel.cache.accel_cache import AccelLayer

    layer = AccelLayer()
    layer.update(torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4))
    assert layer.rows.tolist() == [0, 1, 2]
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    layer.batch_repeat_interleave(2)
    layer.batch_select_indices(torch.tensor([0, 5]))
    assert layer.rows.tolist() == [2, 0]
    layer.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))  # a decode step keeps them
    assert layer.rows.tolist() == [2, 0]
    m = model4("llama")
    ids, mask = left_padded(B=2, L=50, pads=(0, 6), seed=3)
    plan = flux_plan()
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        ref = m.generate(ids, attention_mask=mask, **kw)
        with accel.patch(m, "flux", plan=plan, route="full", **KW):
            assert torch.equal(ref, m.generate(ids, attention_mask=mask, **kw))
        opts = dict(KW, backend="window", full_ratio=0.5)
        with accel.patch(m, "flux", plan=plan, **opts):
            beams = m.generate(ids, attention_mask=mask, **kw)
        for b, pad in enumerate((0, 6)):  # each request's beams alone: the same routes, the same beams
            with accel.patch(m, "flux", plan=plan, **opts):
                alone = m.generate(ids[b:b + 1, pad:], **kw)
            assert torch.equal(beams[b, 50:], alone[0, 50 - pad:])


def test_the_evaluation_harness_shared_prefill_routes_as_flux_own_prefill():
    from accel.eval.runner import _prefill, _stats_needed, fork_cache

    m = model4("llama")
    ids = torch.randint(3, 200, (1, 90), generator=torch.Generator().manual_seed(12))
    plan = flux_plan()
    pol = FX.FluxPolicy(full_ratio=0.5, **KW)
    need = _stats_needed(["dense", "flux"], {**KW, "full_ratio": 0.5})
    assert [type(p) for p in need] == [FX.FluxPolicy]
    base, _ = _prefill(m, ids[:, :-1], torch.ones_like(ids[:, :-1]), need)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with accel.patch(m, pol, plan=plan), torch.no_grad():
        shared = m.generate(ids, **kw, **compat.cache_kwargs(m, fork_cache(base)))
        own_cache = compat.output_cache(m(input_ids=ids[:, :-1], use_cache=True))  # flux's own prefill, same tokens
        own = m.generate(ids, **kw, **compat.cache_kwargs(m, own_cache))
    assert same(shared, own)
    assert not same(shared, gen(m, ids, "dense", new=8))


def test_router_training_end_to_end():
    from accel.calibration.flux import calibrate_flux

    m = model4("llama")

    class Tok:
        def __call__(self, text, return_tensors=None, **kw):
            return {"input_ids": torch.tensor([[3 + (ord(c) % 200) for c in text]])}

    words = "the quick brown fox jumps over the lazy dog and then runs far away from the river bank "
    pairs = [((words * 4)[i:i + 150], words[i % 20:i % 20 + 12]) for i in range(0, 80, 10)]
    plan = calibrate_flux(m, Tok(), pairs, n_cont=4, held_out=4, backends=("quest", "window"), epochs=50,
                          progress=False, **{k: v for k, v in KW.items() if k != "feature_ratio"}, feature_ratio=0.25)
    plan.validate()
    assert plan.policy == "flux" and sorted(plan.params["routers"]) == ["quest", "window"]
    assert plan.provenance["split"] == {"train": 6, "held_out": 2}
    for b in ("quest", "window"):
        labels = plan.provenance["mean_label"][b]
        assert len(labels) == 4 and all(v >= 0 for v in labels) and max(labels) > 0
        s = plan.provenance["heldout_sa_kl"][b]
        assert s["oracle"] <= s["router"] + 1e-9 and s["oracle"] <= s["static"] + 1e-9
    ids = torch.randint(3, 200, (1, 120), generator=torch.Generator().manual_seed(7))
    opts = dict(KW)
    assert same(gen(m, ids, "dense", new=6), gen(m, ids, "flux", new=6, plan=plan, full_ratio=1.0, **opts))
    out = gen(m, ids, "flux", new=6, plan=plan, backend="window", **opts)
    assert out.sequences.shape[1] == 126


def test_bad_options_plans_and_caches_are_refused_in_one_line():
    m = model4("llama")
    plan = flux_plan(backends=("quest",))
    for kw, word in ((dict(backend="hip"), "backend"), (dict(routing="best"), "routing"),
                     (dict(full_ratio=1.5), "full_ratio"), (dict(route="half"), "route"),
                     (dict(backend="select", agg="none"), "use backend='quest' or agg='max'")):
        with pytest.raises(AccelError, match=word):
            accel.patch(m, "flux", plan=plan, **{**KW, **kw})
    with pytest.raises(AccelError, match="trained for backend"):
        accel.patch(m, "flux", plan=plan, backend="window", **KW)
    with pytest.raises(AccelError, match="probe=8"):
        accel.patch(m, "flux", plan=plan, **{**KW, "probe": 4})
    plan.params["full_ratio"] = 1 / 3
    with pytest.raises(AccelError, match="set for full_ratio=0.3333"):
        accel.patch(m, "flux", plan=plan, routing="threshold", full_ratio=0.5, **KW)
    plan.params["routers"]["quest"] = dict(plan.params["routers"]["quest"], static_order=[])
    with pytest.raises(AccelError, match="static_order"):
        accel.patch(m, "flux", plan=plan, routing="static", **KW)
    with pytest.raises(AccelError, match="accel plan --model PATH --policy flux"):
        accel.patch(m, "flux")  # no router ships for a random model
    with pytest.raises(AccelError, match="compressed cache"):
        accel.patch(m, "flux+snapkv", plan=plan)
    ids = torch.randint(3, 200, (1, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with accel.patch(m, "dense"):
            cache = compat.output_cache(m(input_ids=ids, use_cache=True))
        with accel.patch(m, "flux", plan=plan, **KW), pytest.raises(AccelError, match="prefilled without"):
            m(input_ids=ids[:, -1:], use_cache=True, **compat.cache_kwargs(m, cache))
    assert not hasattr(m.model.layers[0].self_attn, "_accel")
