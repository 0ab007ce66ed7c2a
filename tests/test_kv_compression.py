"""KV-cache compression: the ragged per-head cache, exactness when the budget covers the
context, real byte savings, decode-time eviction at a constant budget, kept-set invariants, padding."""
import warnings

import pytest
import torch

import accel
from accel.cache.accel_cache import AccelCache
from accel.cache.ragged import RaggedKV
from accel.policies import budgeted as K
from accel.policies.h2o import column_sums
from accel.policies.pyramidkv import pyramid_budgets
from accel.policies.registry import make_policy

from .conftest import gen, hand_plan, model4, same

KV = ["streaming", "snapkv", "pyramidkv", "h2o"]
KV_ALL = KV + ["taskkv"]


def prompt(n=60, seed=1, B=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (B, n), generator=g)


# -- the ragged store ----------------------------------------------------------------------------------
def test_ragged_store_append_evict_grow_and_reorder():
    g = torch.Generator().manual_seed(0)
    B, Hkv, T, D = 2, 3, 10, 4
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    keep = torch.tensor([[[0, 2, 5], [1, 9, 9], [3, 4, 6]], [[7, 8, 9], [0, 0, 0], [2, 3, 4]]])
    counts = torch.tensor([[3, 2, 3], [3, 1, 2]])
    rg = RaggedKV.from_dense(k, v, keep, counts, counts + 1)
    assert rg.k.shape[0] == int((counts + 1).sum())  # memory follows the per-head counts
    kk, vv, live = rg.padded()
    for b in range(B):
        for h in range(Hkv):
            n = int(counts[b, h])
            assert torch.equal(kk[b, h, :n], k[b, h, keep[b, h, :n]])
            assert torch.equal(rg.pos[rg.offsets[b, h] : rg.offsets[b, h] + n], keep[b, h, :n])
    nk = torch.randn(B, Hkv, 1, D, generator=g)
    rg.append(nk, nk, position=10)
    assert torch.equal(rg.lengths, (counts + 1).int()) and rg.num_reallocations == 0
    rg.append(nk, nk, position=11)  # full segments grow (one re-layout), contents survive
    assert rg.num_reallocations == 1 and torch.equal(rg.lengths, (counts + 2).int())
    kk2, _, _ = rg.padded()
    assert torch.equal(kk2[0, 0, :3], k[0, 0, [0, 2, 5]])
    # evict slot 0 of head (0, 0) only: the last row moves into it
    which = torch.zeros(B, Hkv, dtype=torch.bool)
    which[0, 0] = True
    rg.evict(torch.zeros(B, Hkv, dtype=torch.long), which)
    rows, live = rg.rows()
    assert sorted(rg.pos[rows[0, 0]][live[0, 0]].tolist()) == [2, 5, 10, 11]
    rg.select_batch(torch.tensor([1, 1, 0]))
    assert rg.shape == (3, 3) and torch.equal(rg.lengths[2], torch.tensor([4, 4, 5], dtype=torch.int32))


def _victim_by_the_rule(pos, score, se, rc, by_age):
    """The eviction rule as one reads it: the lowest score (by_age: oldest position) among rows neither a sink
    (pos < se) nor among the rc newest positions, the first on ties, with the scalar rule's NaN behaviour (a NaN
    eligible row first in line stays the pick); else the oldest non-sink row; else the oldest row."""
    newest = max(pos)
    best = fb = oldest = None
    for i, p in enumerate(pos):
        if oldest is None or p < pos[oldest]:
            oldest = i
        if p < se:
            continue
        if fb is None or p < pos[fb]:
            fb = i
        if p > newest - rc:
            continue
        if by_age:
            if best is None or p < pos[best]:
                best = i
        elif best is None or score[i] < score[best]:
            best = i
    return best if best is not None else (fb if fb is not None else oldest)


@pytest.fixture
def two_threads():
    """torch (and the extension's OpenMP loops) on two threads for the test (the suite runs on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("heads", [3, 48])  # 48 x ~1100 rows: the threaded path of the C++ eviction
@pytest.mark.parametrize("by_age", [False, True])
def test_cpp_eviction_picks_the_rules_victim(heads, by_age, two_threads):
    from accel import _ext

    if not _ext.HAS_CPU_EXT:
        pytest.skip("the C++ CPU extension is not built")
    g = torch.Generator().manual_seed(3 + heads)
    n, D = 1100, 4
    caps = torch.full((1, heads), n + 2)
    offsets = torch.arange(heads) * (n + 2)
    R = int(caps.sum())
    k, v = torch.randn(R, D, generator=g), torch.randn(R, D, generator=g)
    pos, score = torch.full((R,), -1, dtype=torch.long), torch.zeros(R)
    lengths = torch.full((heads,), n, dtype=torch.int32)
    sink_end, recent = torch.full((heads,), 16), torch.full((heads,), 32)
    recent[::2] = 0
    for h in range(heads):
        o = h * (n + 2)
        pos[o:o + n] = torch.randperm(3 * n, generator=g)[:n]
        kind = h % 6
        s = torch.rand(n, generator=g)
        if kind == 1:
            s = torch.floor(s * 4)  # ties: the first row at the least score
        elif kind == 2:
            s[torch.randint(0, n, (5,), generator=g)] = float("nan")
            if h % 12 == 2:  # the first eligible row NaN: the scalar rule keeps it as the victim
                p = pos[o:o + n]
                first = int(torch.nonzero((p >= 16) & (p <= int(p.max()) - int(recent[h])))[0])
                s[first] = float("nan")
        elif kind == 3:
            s[:] = float("inf")  # every eligible row +inf: the first eligible one
        elif kind == 4:
            sink_end[h] = 10 * n  # every row a sink: the oldest row
        elif kind == 5:
            recent[h] = 10 * n  # every row recent: the oldest non-sink row
        score[o:o + n] = s
    budget = lengths.long() - torch.randint(1, 4, (heads,), generator=g)
    ref_pos, ref_score, ref_k = pos.clone(), score.clone(), k.clone()
    ref_len = lengths.clone()
    for h in range(heads):  # the reference: evict one row at a time by the rule, moving the last row into it
        o = h * (n + 2)
        while int(ref_len[h]) > int(budget[h]):
            m = int(ref_len[h])
            vic = _victim_by_the_rule(ref_pos[o:o + m].tolist(), ref_score[o:o + m].tolist(), int(sink_end[h]),
                                      int(recent[h]), by_age)
            ref_pos[o + vic], ref_score[o + vic], ref_k[o + vic] = ref_pos[o + m - 1], ref_score[o + m - 1], ref_k[o + m - 1]
            ref_pos[o + m - 1] = -1
            ref_len[h] = m - 1
    _ext.cpu_ext().ragged_evict(k, v, pos, score, offsets, lengths, budget, sink_end, recent, by_age)
    assert torch.equal(lengths, ref_len)
    assert torch.equal(pos, ref_pos)
    assert torch.equal(k, ref_k)
    assert torch.equal(score.nan_to_num(-7.0), ref_score.nan_to_num(-7.0))


def test_cpp_score_accumulation_is_the_same_on_one_and_two_threads():
    """The accumulation splits heads over threads past 32K rows; each head's scores are its own, so the result is the
    same bits on one thread and on two."""
    from accel import _ext

    if not _ext.HAS_CPU_EXT:
        pytest.skip("the C++ CPU extension is not built")
    g = torch.Generator().manual_seed(5)
    B, Hkv, G, W = 4, 3, 3, 3000
    lengths = torch.randint(2000, W + 1, (B * Hkv,), generator=g).to(torch.int32)
    offsets = torch.arange(B * Hkv) * W
    logits = torch.randn(B, Hkv * G, W, generator=g)
    lse = torch.logsumexp(logits, -1)
    lse[0, 1] = float("-inf")  # a head that attended to nothing adds nothing
    base = torch.rand(B * Hkv * W, generator=g)
    out = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            sc = base.clone()
            _ext.cpu_ext().ragged_accumulate(logits, lse, offsets, lengths, sc)
            out.append(sc)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], base)


# -- exactness and savings on tiny models --------------------------------------------------------------
@pytest.mark.exactness
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "phi3"])
@pytest.mark.parametrize("policy", KV_ALL)
def test_budget_covering_the_context_equals_dense(arch, policy):
    m = model4(arch)
    ids = prompt()
    ref = gen(m, ids, "dense")
    out = gen(m, ids, policy, budget_ratio=1.0)
    assert same(ref, out)
    out = gen(m, ids, policy, budget=200, budget_ratio=None)  # token budget past prompt + generation
    assert same(ref, out)


@pytest.mark.parametrize("policy", KV)
def test_compressed_cache_holds_the_budget_and_stays_there(policy):
    m = model4("llama")
    ids = prompt(200)
    with accel.patch(m, policy, budget=50, budget_ratio=None) as h:
        out = m.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        cache = out.past_key_values
        assert isinstance(cache, AccelCache)
        total = 0
        seq = h.runtime.sequence(cache)  # the policy's per-sequence state: never on the cache
        for i, layer in enumerate(cache.layers):
            rg = layer.ragged
            assert rg is not None and layer.k_buf is None  # the dense buffers are gone
            assert not hasattr(rg, "budget")
            budget = seq.layer_state[i]["eviction"].budget
            # every head at its budget after 40 new tokens (pyramidkv: its layer's budget)
            assert torch.equal(rg.lengths.long(), budget), (rg.lengths, budget)
            if policy != "pyramidkv":
                assert torch.all(budget == 50)
            # bytes really allocated: the pools (budget + 1 spare row per head) and small metadata
            per_row = rg.row_bytes()
            assert rg.k.shape[0] == int((budget + 1).sum())
            assert layer.allocated_bytes() < 1.2 * int((budget + 1).sum()) * per_row
            total += int(budget.sum())
        assert abs(total - 4 * 2 * 50) <= 4 * 2  # pyramidkv redistributes the same total (rounding)
        assert cache.nbytes() == total * per_row
    assert h.runtime.stats["kv_read_bytes"] > 0


def test_pyramidkv_budgets_decrease_and_sum_to_the_total():
    base = torch.tensor([400, 1000])
    b = pyramid_budgets(base, 24, 32, 20.0)
    stack = torch.stack(b)  # [L, B]
    assert torch.all(stack[1:] <= stack[:-1])
    total = (stack - 32).sum(0)
    assert torch.all((total - 24 * (base - 32)).abs() <= 24)  # rounding only


def test_streaming_keeps_sinks_and_recent_and_evicts_the_oldest():
    m = model4("llama")
    ids = prompt(100)
    with accel.patch(m, "streaming", sink=4, budget=20, budget_ratio=None):
        out = m.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    for layer in out.past_key_values.layers:
        rg = layer.ragged
        rows, live = rg.rows()
        for b in range(1):
            for h in range(2):
                pos = sorted(rg.pos[rows[b, h]][live[b, h]].tolist())
                # 100 prompt + 6 appended decode tokens (the last generated token is not cached yet)
                assert pos == [0, 1, 2, 3] + list(range(106 - 16, 106)), pos


def test_snapkv_keeps_the_window_and_the_top_scored_tokens():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 1, 4, 2, 64, 8
    q, k = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    pol = make_policy("snapkv", {"budget": 20, "budget_ratio": None, "window": 8, "kernel": 1}).kv[0]
    s = pol.token_scores(K.PrefillView(query=q), k, None, torch.full((B, Hkv), 20), D ** -0.5)
    keep, counts = K.keep_top(s, torch.full((B, Hkv), 20))
    assert torch.all(counts == 20)
    # reference: window queries' attention summed, mean over the group, top 12 + window 8
    logits = torch.einsum("bhqd,bhtd->bhqt", q[:, :, -8:], k.repeat_interleave(2, 1)) * D ** -0.5
    causal = torch.arange(T).view(1, T) <= torch.arange(T - 8, T).view(8, 1)
    a = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).sum(2).view(B, Hkv, 2, T).mean(2)
    for h in range(Hkv):
        ref = set(a[0, h, : T - 8].topk(12).indices.tolist()) | set(range(T - 8, T))
        assert set(keep[0, h].tolist()) == ref


def test_h2o_column_sums_equal_the_dense_attention_matrix():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 37, 8
    q, k = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False
    got = column_sums(q, k, valid, 0.3, max_elems=500)  # several query blocks
    logits = torch.einsum("bhqd,bhtd->bhqt", q, k.repeat_interleave(2, 1)) * 0.3
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool)).view(1, 1, T, T) & valid.view(B, 1, 1, T) & valid.view(B, 1, T, 1)
    ref = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).nan_to_num(0).sum(2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.exactness
@pytest.mark.parametrize("policy", KV_ALL)
def test_left_padded_batch_matches_each_row_alone(policy):
    """A left-padded batch compresses every row as if it were alone (padding is never kept)."""
    m = model4("llama")
    a, b = prompt(80, seed=2)[0], prompt(60, seed=3)[0]
    ids = torch.zeros(2, 80, dtype=torch.long)
    mask = torch.zeros(2, 80, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 20:], mask[1, 20:] = b, 1
    kw = dict(budget_ratio=0.5)
    both = gen(m, ids, policy, mask=mask, new=6, **kw)
    for row, x in ((0, a), (1, b)):
        alone = gen(m, x.view(1, -1), policy, new=6, **kw)
        assert torch.equal(both.sequences[row, 80:], alone.sequences[0, x.numel():])
        assert max((s[row] - t[0]).abs().max().item() for s, t in zip(both.scores, alone.scores)) < 1e-4


def test_bad_budgets_and_unsupported_compositions_are_clear_errors():
    m = model4("llama")
    for kw, msg in (({"budget_ratio": 1.5}, "budget_ratio"), ({"budget": 0, "budget_ratio": None}, "budget"),
                    ({"decode": "sometimes"}, "decode"), ({"budget": None, "budget_ratio": None}, "budget")):
        with pytest.raises(accel.AccelError, match=msg):
            accel.patch(m, "snapkv", **kw)
    with pytest.raises(accel.AccelError, match="not supported yet"):
        accel.patch(m, "recycled+snapkv")
    with pytest.raises(accel.AccelError, match="not supported yet"):
        accel.patch(m, "hylra+duo")


# -- layer-reuse attention over a compressed cache -------------------------------------------------------
REUSE = [("hylra", {"plan": "hand", "sink": 4, "recent": 8, "chunk": 4}),
         ("delta", {"full_layers": [0], "delta_layers": [1], "page_size": 4, "recent_pages": 2})]


def _reuse_kw(kw):
    kw = dict(kw)
    if kw.get("plan") == "hand":
        kw["plan"] = hand_plan()
    return kw


@pytest.mark.parametrize("attn,kw", REUSE)
@pytest.mark.parametrize("kv", ["snapkv", "h2o", "pyramidkv", "taskkv"])
def test_layer_reuse_over_a_compressed_cache(attn, kw, kv):
    """hylra / delta decode over a compressed cache: with a top-k covering the context it is exactly the
    KV policy alone; with a small top-k the reuse layers read fewer rows, and the cache holds the same
    bytes as the KV policy alone (compression and attention sparsity stack)."""
    m = model4("llama")
    ids = prompt(90)
    spec = f"{attn}+{kv}@budget=30@budget_ratio=null"
    alone = gen(m, ids, f"{kv}@budget=30@budget_ratio=null", new=8)
    assert same(gen(m, ids, spec, new=8, topk=4096, **_reuse_kw(kw)), alone, 1e-4)
    res = {}
    for name, s, extra in (("alone", f"{kv}@budget=30@budget_ratio=null", {}), ("both", spec, {"topk": 16, **_reuse_kw(kw)})):
        with accel.patch(m, s, **extra) as h:
            out = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
            res[name] = (h.runtime.stats["kv_read_bytes"], out.past_key_values.nbytes(), out.sequences)
    assert res["both"][0] < 0.9 * res["alone"][0]  # reuse layers read at most topk rows per head
    assert res["both"][1] == res["alone"][1]
    assert res["both"][2].shape == res["alone"][2].shape


def test_ragged_sparse_attend_matches_a_masked_reference():
    """A reuse layer over a compressed cache attends to exactly the selected positions its heads hold."""
    from types import SimpleNamespace

    from accel.attention import decode as S

    g = torch.Generator().manual_seed(3)
    B, Hkv, G, T, D = 2, 2, 2, 20, 8
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    keep = torch.stack([torch.stack([torch.randperm(T, generator=g)[:12] for _ in range(Hkv)]) for _ in range(B)])
    counts = torch.tensor([[12, 9], [7, 12]])
    rg = RaggedKV.from_dense(k, v, keep, counts, counts + 2)
    ctx = SimpleNamespace(cache_layer=SimpleNamespace(ragged=rg, cumulative_length=T),
                          runtime=SimpleNamespace(stats={"kv_read_bytes": 0}))
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    sel = torch.full((B, Hkv, 10), -1, dtype=torch.int32)
    sel_n = torch.tensor([[10, 6], [8, 10]])
    for b in range(B):
        for h in range(Hkv):
            sel[b, h, : sel_n[b, h]] = torch.randperm(T, generator=g)[: sel_n[b, h]].sort().values.int()
    out = S.ragged_sparse_attend(ctx, q, 0.3, sel, sel_n.int())
    for b in range(B):
        for h in range(Hkv):
            held = set(keep[b, h, : counts[b, h]].tolist())
            both = sorted(held & set(sel[b, h, : sel_n[b, h]].tolist()))
            for gq in range(G):
                qh = q[b, h * G + gq, 0]
                if not both:
                    continue
                p = torch.softmax(k[b, h, both] @ qh * 0.3, 0)
                assert torch.allclose(out[b, 0, h * G + gq], p @ v[b, h, both], atol=1e-5)
    assert ctx.runtime.stats["kv_read_bytes"] > 0
    from accel import _ext

    if _ext.HAS_CPU_EXT:  # the C++ position -> row map equals its torch twin (also for a layer-wide set)
        for ix, cnt in ((sel, sel_n.int()), (sel[:, :1], sel_n[:, :1].int())):
            a = S.positions_to_slots(rg, ix, T)
            b = _ext.cpu_ext().ragged_positions_to_slots(rg.pos, rg.offsets.reshape(-1), rg.lengths.reshape(-1), ix.int(),
                                                         cnt, T)
            assert torch.equal(a[1], b[1])
            for bb in range(B):
                for h in range(Hkv):
                    assert torch.equal(a[0][bb, h, : a[1][bb, h]], b[0][bb, h, : b[1][bb, h]])


# -- DuoAttention head types -------------------------------------------------------------------------------
def duo_plan(scores, sink=4, recent=8):
    from accel.plan import HeadPlan, LayerPlan, Plan

    layers = [LayerPlan(mode="compress", kv="duo", heads=[HeadPlan(kind="streaming", score=s) for s in row])
              for row in scores]
    return Plan(policy="duo", num_layers=len(scores), num_kv_heads=len(scores[0]), layers=layers,
                params={"sink": sink, "recent": recent})


SCORES = [[0.9, 0.1], [0.5, 0.2], [0.05, 0.7], [0.3, 0.4]]


def test_duo_all_retrieval_is_dense_and_all_streaming_is_streamingllm():
    m = model4("llama")
    ids = prompt(100)
    plan = duo_plan(SCORES)
    ref = gen(m, ids, "dense")
    assert same(ref, gen(m, ids, "duo", plan=plan, sink=4, recent=8, budget_ratio=1.0))
    assert same(ref, gen(m, ids, "duo", plan=plan, sink=4, recent=8, sparsity=0.0))
    stream = gen(m, ids, "streaming", sink=4, budget=12, budget_ratio=None)
    assert same(stream, gen(m, ids, "duo", plan=plan, sink=4, recent=8, middle=0, sparsity=1.0))


def test_duo_ranks_heads_globally_and_retrieval_heads_keep_everything():
    m = model4("llama")
    ids = prompt(100)
    plan = duo_plan(SCORES)
    with accel.patch(m, "duo", plan=plan, sink=4, recent=8, sparsity=0.5):  # 4 of 8 heads retrieval
        out = m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    top = {(0, 0), (2, 1), (1, 0), (3, 1)}  # scores 0.9, 0.7, 0.5, 0.4
    for li, layer in enumerate(out.past_key_values.layers):
        for h in range(2):
            n = int(layer.ragged.lengths[0, h])
            assert n == (104 if (li, h) in top else 12), (li, h, n)  # 100 prompt + 4 cached decode tokens
    # budget_ratio: N * (f * n - S) / (n - S) retrieval heads, f = 0.25, n = 100, S = 12 -> floor(8 * 13 / 88) = 1
    with accel.patch(m, "duo", plan=plan, sink=4, recent=8, budget_ratio=0.25):
        out = m.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    full = [(li, h) for li, layer in enumerate(out.past_key_values.layers) for h in range(2)
            if int(layer.ragged.lengths[0, h]) > 12]
    assert full == [(0, 0)]


def _kept_positions(m, ids, policy, **kw):
    with accel.patch(m, policy, **kw) as h, torch.no_grad():
        m(input_ids=ids, use_cache=True)
        cache = h.cache
    return _kept_in(cache)


def _kept_in(cache):
    out = []
    for layer in cache.layers:
        rows, live = layer.ragged.rows()
        out.append([sorted(layer.ragged.pos[rows[0, hh]][live[0, hh]].tolist()) for hh in range(rows.shape[1])])
    return out


def test_duo_middle_streaming_heads_keep_snapkv_top_tokens_and_retrieval_heads_everything():
    """duo's ``middle`` extension: a streaming head keeps its sinks, its recent tokens and its ``middle``
    best tokens by SnapKV's pooled window attention -- with sink 0 and recent = SnapKV's window, the very
    set SnapKV keeps at budget ``window + middle``; retrieval heads still keep the whole prompt."""
    m = model4("llama")
    ids = prompt(100)
    plan = duo_plan(SCORES)
    snap = _kept_positions(m, ids, "snapkv", budget=8 + 20, budget_ratio=None, window=8)
    duo = _kept_positions(m, ids, "duo", plan=plan, sink=0, recent=8, middle=20, window=8, sparsity=1.0)
    assert duo == snap
    assert all(len(h) == 28 for layer in duo for h in layer)
    mixed = _kept_positions(m, ids, "duo", plan=plan, sink=4, recent=8, middle=20, window=8, sparsity=0.5)
    top = {(0, 0), (2, 1), (1, 0), (3, 1)}
    for li, layer in enumerate(mixed):
        for hh, kept in enumerate(layer):
            if (li, hh) in top:
                assert kept == list(range(100))
            else:
                assert len(kept) == 32 and set(range(4)) | set(range(92, 100)) <= set(kept)
    # decode: streaming heads stay at their size, and every one of them holds its newest `recent` tokens
    with accel.patch(m, "duo", plan=plan, sink=4, recent=8, middle=20, window=8, sparsity=1.0):
        out = m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    for layer in out.past_key_values.layers:
        rows, live = layer.ragged.rows()
        for hh in range(rows.shape[1]):
            kept = set(layer.ragged.pos[rows[0, hh]][live[0, hh]].tolist())
            assert len(kept) == 32 and set(range(4)) | set(range(111 - 8, 111)) <= kept, sorted(kept)
    # the retrieval-head count follows S = sink + recent + middle: floor(8 * (25 - 32) / 68) < 0 -> none
    none = _kept_positions(m, ids, "duo", plan=plan, sink=4, recent=8, middle=20, budget_ratio=0.25)
    assert all(len(h) == 32 for layer in none for h in layer)


def test_duo_without_a_plan_names_the_command():
    m = model4("llama")
    with pytest.raises(accel.AccelError, match="accel plan"):
        accel.patch(m, "duo")


def test_duo_streaming_error_is_zero_when_the_window_covers_the_context():
    from accel.calibration.duo import streaming_errors

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 8, 16, generator=g), torch.randn(2, 40, 16, generator=g), torch.randn(2, 40, 16, generator=g)
    assert torch.all(streaming_errors(q, k, v, 0.25, sink=4, recent=40) < 1e-6)
    e = streaming_errors(q, k, v, 0.25, sink=2, recent=4)
    assert e.shape == (2,) and torch.all(e > 0)
    assert torch.all(streaming_errors(q, k, v, 0.25, sink=2, recent=4, reduce="max") >= e)  # worst step >= mean


def test_duo_far_mass_scores_a_copying_head_high_and_a_local_head_zero():
    """far_mass: attention mass outside sink + recent, max over the group and (by default) the steps."""
    from accel.calibration.duo import far_mass

    D, T, S = 8, 40, 3
    k = torch.zeros(2, T, D)
    k[0, 20, 0] = 50.0  # KV head 0: one far key every query matches strongly (a needle)
    q = torch.zeros(4, S, D)
    q[0:2, :, 0] = 1.0  # the queries of KV head 0 look for it
    fm = far_mass(q, k, 1.0, sink=2, recent=4)
    assert fm[0] > 0.99  # copies from the middle: streaming would drop ~all of its attention
    # KV head 1 attends uniformly: its far share is the middle's share of the causal prefix
    assert abs(fm[1].item() - (T - 2 - 4) / T) < 1e-5
    assert torch.all(far_mass(q, k, 1.0, sink=2, recent=T) < 1e-6)  # window covers everything
    assert torch.all(far_mass(q, k, 1.0, sink=2, recent=4, reduce="mean") <= fm + 1e-6)


# -- Task-KV ---------------------------------------------------------------------------------------------
def test_taskkv_heterogeneous_heads_keep_everything_and_the_rest_keep_sink_recent_middle():
    m = model4("llama")
    ids = prompt(200)
    with accel.patch(m, "taskkv", budget_ratio=0.3, het_fraction=0.25, sink=4, recent=8, window=8):
        out = m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    layers = out.past_key_values.layers
    # (a layer whose heads are all heterogeneous simply stays dense)
    full = [(li, h) for li, l in enumerate(layers) for h in range(2) if int(l.head_lengths[0, h]) >= 200]
    assert len(full) == 2  # 25% of the 8 KV heads of the model
    # the others: (f n N - n_het n) / (N - n_het) = (0.3*200*8 - 2*200) / 6 = 13 -> floor 13 tokens
    for li, l in enumerate(layers):
        if l.ragged is None:
            assert all((li, h) in full for h in range(2)) and int(l.head_lengths[0, 0]) == 205
            continue
        rg = l.ragged
        rows, live = rg.rows()
        for h in range(2):
            if (li, h) in full:
                assert int(rg.lengths[0, h]) == 205  # every prompt and cached decode token
                continue
            assert int(rg.lengths[0, h]) == 13
            pos = set(rg.pos[rows[0, h]][live[0, h]].tolist())
            assert {0, 1, 2, 3} <= pos and set(range(205 - 8, 205)) <= pos  # sinks and the newest tokens


def test_taskkv_all_heterogeneous_is_dense():
    m = model4("llama")
    ids = prompt(100)
    assert same(gen(m, ids, "dense"), gen(m, ids, "taskkv", budget_ratio=0.3, het_fraction=1.0))


# -- MoA ---------------------------------------------------------------------------------------------------
def moa_plan(spans):
    from accel.plan import HeadPlan, LayerPlan, Plan

    layers = [LayerPlan(mode="compress", kv="moa", heads=[HeadPlan(kind="budget", alpha=a, beta=b) for a, b in row])
              for row in spans]
    return Plan(policy="moa", num_layers=len(spans), num_kv_heads=len(spans[0]), layers=layers)


def test_moa_full_spans_are_dense_and_constant_spans_are_streamingllm():
    m = model4("llama")
    ids = prompt(300)
    ref = gen(m, ids, "dense")
    assert same(ref, gen(m, ids, "moa", plan=moa_plan([[(0.0, 1.0)] * 2] * 4), max_new_tokens=12))
    # alpha = 192, beta = 0: cache 192 = 64 sinks + 128 recent, like streaming(sink=64, budget=192)
    stream = gen(m, ids, "streaming", sink=64, budget=192, budget_ratio=None)
    plan = moa_plan([[(192.0, 0.0)] * 2] * 4)
    assert same(stream, gen(m, ids, "moa", plan=plan, sparse_prefill=False))


def test_moa_heads_keep_their_own_span_and_sparse_prefill_matches_the_block_reference():
    from accel.ops.sparse import block_sparse_prefill_ref, sink_window_blocks
    from accel.policies.moa import moa_span

    m = model4("llama")
    ids = prompt(300)
    spans = [[(0.0, 0.5), (128.0, 0.0)], [(0.0, 1.0), (-64.0, 0.75)], [(256.0, 0.0), (0.0, 0.25)], [(0.0, 1.0)] * 2]
    plan = moa_plan(spans)
    with accel.patch(m, "moa", plan=plan, max_new_tokens=12):
        out = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    for li, layer in enumerate(out.past_key_values.layers):
        for h, (a, b) in enumerate(spans[li]):
            cache = min(moa_span(a, b, 312), 300)
            n = int(layer.head_lengths[0, h])
            assert n == (307 if cache >= 300 else cache), (li, h, n, cache)
    # the sparse prefill of one layer equals the dense attention under the same block mask
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    from accel.ops.sparse import block_sparse_prefill

    blocks, counts = sink_window_blocks(4, 300, 300, sink=[64, 64, 64, 64], window=[64, 64, 128, 128])
    torch.testing.assert_close(block_sparse_prefill(q, k, v, blocks, counts),
                               block_sparse_prefill_ref(q, k, v, blocks, counts), atol=1e-5, rtol=1e-5)


def test_moa_band_loss_and_span_solver():
    from accel.calibration.moa import band_loss, moa_span, solve_spans

    g = torch.Generator().manual_seed(0)
    T, S = 300, 6
    p = torch.softmax(torch.randn(2, S, T, generator=g), -1)
    p = p * (torch.arange(T).view(1, T) <= torch.arange(T - S, T).view(S, 1))
    p = p / p.sum(-1, keepdim=True)
    spans = [128, 192, 300]
    got = band_loss(p, spans)
    for j, span in enumerate(spans):
        for h in range(2):
            ref = 0.0
            for s in range(S):
                pos = T - S + s
                sk = min(span, 64)
                keep = (torch.arange(T) < sk) | ((torch.arange(T) > pos - (span - sk)) & (torch.arange(T) <= pos))
                ref += float(1 - p[h, s][keep].sum()) / S
            assert abs(float(got[h, j]) - ref) < 1e-5
    assert moa_span(0, 1, 1000) == 1000 and moa_span(-1024, 0.5, 1000) == 128 and moa_span(100, 0.125, 1000) == 256
    # solver vs brute force on a tiny instance
    import itertools

    loss = torch.rand(4, 3, 2, generator=g)
    dens = torch.tensor([[0.2, 0.1], [0.5, 0.4], [1.0, 1.0]])
    choice = solve_spans(loss, dens, 0.5)
    best = min((c for c in itertools.product(range(3), repeat=4)
                if all(sum(dens[x, l] for x in c) <= 0.5 * 4 + 1e-9 for l in range(2))),
               key=lambda c: sum(float(loss[h, x].sum()) for h, x in enumerate(c)))
    assert abs(sum(float(loss[h, int(x)].sum()) for h, x in enumerate(choice)) - sum(float(loss[h, x].sum()) for h, x in enumerate(best))) < 1e-6


def test_moa_calibration_end_to_end_on_a_tiny_model():
    """calibrate_moa runs the model (LM head on the last position only), profiles every head at each length and
    returns a valid moa plan with its per-density solutions; the policy generates from it."""
    from accel.calibration.moa import calibrate_moa

    m = model4()

    class Tok:
        def __call__(self, text, return_tensors=None, **kw):
            return {"input_ids": torch.tensor([[3 + (ord(c) % 200) for c in text]])}

    txt = "the quick brown fox jumps over the lazy dog " * 40
    seen = []
    hook = m.lm_head.register_forward_hook(lambda mod, a, o: seen.append(a[0].shape[1]))
    try:
        plan = calibrate_moa(m, Tok(), [txt, txt[::-1]], lengths=(200, 256), steps=8, densities=(0.9,), progress=False)
    finally:
        hook.remove()
    assert seen and set(seen) == {1}
    plan.validate()
    assert plan.policy == "moa" and plan.num_layers == 4 and "solutions" in plan.params
    ids = torch.randint(3, 200, (1, 150), generator=torch.Generator().manual_seed(1))
    out = gen(m, ids, "moa", new=4, plan=plan, max_new_tokens=4)
    assert out.sequences.shape[1] == 154


@pytest.mark.parametrize("policy", ["h2o", "streaming", "taskkv", "duo"])
def test_cpp_cache_bookkeeping_matches_the_torch_fallback(policy, monkeypatch):
    """Append, eviction and attention accumulation run in C++ when the extension is built; the pure-torch
    path (machines without it) must generate the same tokens and keep the same sets."""
    from accel import _ext

    if not _ext.HAS_CPU_EXT:
        pytest.skip("the C++ extension is not built")
    m = model4("llama")
    ids = prompt(150, B=2)
    kw = dict(budget=40, budget_ratio=None)
    if policy == "duo":
        kw = dict(plan=duo_plan(SCORES), sink=4, recent=8, sparsity=0.5)

    def run():
        with accel.patch(m, policy, **kw):
            return m.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                              output_scores=True)

    a = run()
    monkeypatch.setattr(_ext, "HAS_CPU_EXT", False)
    b = run()
    assert same(a, b, tol=1e-4)
    for la, lb in zip(a.past_key_values.layers, b.past_key_values.layers):
        if la.ragged is None:
            continue
        ra, rb = la.ragged, lb.ragged
        assert torch.equal(ra.lengths, rb.lengths)
        for bb in range(2):
            for h in range(2):
                rows_a, live_a = ra.rows()
                rows_b, live_b = rb.rows()
                assert sorted(ra.pos[rows_a[bb, h]][live_a[bb, h]].tolist()) == sorted(rb.pos[rows_b[bb, h]][live_b[bb, h]].tolist())


def test_layer_reuse_over_a_compressed_cache_in_a_padded_batch():
    """Left-padded batch: hylra over snapkv with a covering top-k equals snapkv alone row for row, and a
    small top-k still decodes every row."""
    m = model4("llama")
    ids = prompt(70, B=2)
    mask = torch.ones_like(ids)
    mask[1, :15] = 0
    ids[1, :15] = 0
    kv = "snapkv@budget=24@budget_ratio=null"
    alone = gen(m, ids, kv, mask=mask, new=6)
    kw = {"plan": hand_plan(), "sink": 4, "recent": 8, "chunk": 4}
    assert same(gen(m, ids, f"hylra+{kv}", mask=mask, new=6, topk=4096, **kw), alone, 1e-4)
    small = gen(m, ids, f"hylra+{kv}", mask=mask, new=6, topk=16, **kw)
    assert small.sequences.shape == alone.sequences.shape


@pytest.mark.parametrize("policy,kw", [
    ("snapkv", dict(budget=30, budget_ratio=None)),
    ("pyramidkv", dict(budget=30, budget_ratio=None)),
    ("h2o", dict(budget=30, budget_ratio=None)),
    ("taskkv", dict(budget_ratio=0.4)),
    ("duo", dict(plan=duo_plan(SCORES), sink=4, recent=8, middle=20, window=8, sparsity=0.5)),
])
def test_eval_harness_fork_compresses_like_the_policys_own_prefill(policy, kw):
    """``accel eval`` prefills each sample once with dense attention, records the statistics the KV policies
    need, and compresses a fork of that cache per policy: the kept set must be exactly what the policy keeps
    when it runs the prefill itself, and compressing (outside ``no_grad``, as the harness does) must not
    build an autograd graph through the model's weights."""
    from accel.eval import runner

    m = model4("llama")
    ids = prompt(100)
    ref = _kept_positions(m, ids, policy, **kw)
    base, _ = runner._prefill(m, ids, torch.ones_like(ids), runner._stats_needed([policy], {k: v for k, v in kw.items() if k != "plan"}))
    cache = runner.fork_cache(base)
    assert torch.is_grad_enabled()
    with accel.patch(m, policy, **kw) as h, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner._compress_fork(h, cache, torch.ones_like(ids))
    assert not [w for w in caught if "requires_grad" in str(w.message)], [str(w.message) for w in caught]
    assert _kept_in(cache) == ref
    for layer in cache.layers:
        rg = layer.ragged
        assert not any(t.requires_grad for t in (rg.k, rg.v, rg.score) if t is not None)


def test_a_compressed_cache_keeps_its_budget_under_a_new_patch_and_in_a_deep_copy():
    """The eviction state lives beside the cache (accel.cache.sequences), not in the handle that compressed it: a
    cache continued under a new patch, and a deep copy of it (a branched conversation), keep every head at its
    budget and continue exactly alike."""
    import copy

    from accel import compat

    m = model4("llama")
    ids = prompt(200)
    with accel.patch(m, "h2o", budget=40, budget_ratio=None):
        out = m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = compat.output_cache(out)
    branch = copy.deepcopy(cache)
    steps = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(5))
    logits = []
    for c in (cache, branch):
        got = []
        with accel.patch(m, "h2o", budget=40, budget_ratio=None), torch.no_grad():
            for t in range(steps.shape[1]):
                o = m(input_ids=steps[:, t:t + 1], use_cache=True, **compat.cache_kwargs(m, c))
                got.append(o.logits[:, -1])
        for layer in c.layers:
            assert torch.all(layer.ragged.lengths == 40), layer.ragged.lengths
        logits.append(torch.stack(got))
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_a_second_turn_on_a_compressed_cache_returns_every_head_to_its_budget(name):
    """A multi-token forward on a compressed cache (the next turn of a conversation) appends its tokens to every head
    and the policy then evicts back to the budgets, as a decode step does."""
    from accel import compat

    m = model4("llama")
    with accel.patch(m, name, budget=40, budget_ratio=None, **({"window": 4, "min_budget": 0} if name == "snapkv" else {})):
        out = m.generate(prompt(200), max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        cache = compat.output_cache(out)
        turn = torch.randint(3, 256, (1, 15), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            m(input_ids=turn, use_cache=True, **compat.cache_kwargs(m, cache))
    for layer in cache.layers:
        assert torch.all(layer.ragged.lengths == 40), layer.ragged.lengths


@pytest.mark.parametrize("name", ["snapkv", "duo"])
def test_a_second_turn_on_a_growing_cache_keeps_every_token(name):
    """Under decode="grow" no head evicts after the prompt is compressed, in a decode step or in the next turn."""
    from accel import compat

    m = model4("llama")
    kw = (dict(budget=40, budget_ratio=None, min_budget=0, window=4) if name == "snapkv"
          else dict(plan=duo_plan(SCORES), sink=4, recent=8, sparsity=0.5))
    with accel.patch(m, name, decode="grow", **kw):
        out = m.generate(prompt(200), max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        cache = compat.output_cache(out)
        layers = [layer for layer in cache.layers if layer.ragged is not None]
        assert layers  # the prompt was compressed
        before = [layer.ragged.lengths.clone() for layer in layers]
        turn = torch.randint(3, 256, (1, 15), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            m(input_ids=turn, use_cache=True, **compat.cache_kwargs(m, cache))
    for layer, n in zip(layers, before):
        assert torch.equal(layer.ragged.lengths, n + 15), (layer.ragged.lengths, n)
