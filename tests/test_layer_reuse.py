"""HyLRA, DELTA and Recycled Attention (RefreshKV): exactness when the budget covers the context, selection
invariants, the HyLRA DP and profiler statistics, plans, padding and clean removal."""
import importlib
import random
import string

import pytest
import torch

import accel
from accel.errors import AccelError
from accel.ops._selection_reference import select_topk_ref
from accel.attention import decode as D
from accel.attention import selection as S
from accel.calibration.dp import brute_force, hylra_dp, path_value
from accel.plan import LayerPlan, Plan

from .conftest import gen, hand_plan, model4, same
from accel.calibration.hylra import _ratio90, layer_statistics, mass_recall_matrix, overlap_matrix


SMALL = {"hylra": {"sink": 4, "recent": 8}, "hip": {"sink": 4, "window": 8, "key_block": 4, "dense_layers": 1}, "delta": {"page_size": 4, "recent_pages": 2}, "recycled": {"compact": False}}
CASES = [("hylra", {"plan": "hand"}), ("delta", {"full_layers": [0], "delta_layers": [1]}), ("quest", {}), ("hip", {}),
         ("hip", {"refresh": 1, "representative": "first"}), ("recycled", {}),
         ("recycled", {"schedule": "fixed", "stride": 3})]


@pytest.mark.exactness
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "phi3"])
@pytest.mark.parametrize("policy,kw", CASES)
def test_budget_covering_the_context_equals_dense(arch, policy, kw):
    m = model4(arch)
    ids = torch.randint(3, 256, (1, 90), generator=torch.Generator().manual_seed(1))
    ref = gen(m, ids, "dense")
    kw = dict(kw)
    if kw.get("plan") == "hand":
        kw["plan"] = hand_plan()
    assert same(gen(m, ids, policy, topk=4096, **kw), ref)
    assert same(gen(m, ids, policy, topk_ratio=1.0, **kw), ref)


@pytest.mark.parametrize("policy,kw", CASES)
def test_small_budget_runs_sparse_and_stays_close(policy, kw):
    m = model4("llama")
    ids = torch.randint(3, 256, (1, 120), generator=torch.Generator().manual_seed(2))
    ref = gen(m, ids, "dense")
    kw = dict(kw)
    if kw.get("plan") == "hand":
        kw["plan"] = hand_plan()
    calls = []
    cls = accel.get_policy_class(policy)
    mod = importlib.import_module(cls.decode.__module__)  # where its decode is written
    orig = mod.sparse_attend
    orig_stack = getattr(cls, "stack_layer", None)  # a decode the one-call C++ stack runs (quest)

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    def stack_spy(*a, **k):
        spec = orig_stack(*a, **k)
        if spec is not None:  # the stack selects this layer's pages
            calls.append(1)
        return spec

    mod.sparse_attend = spy
    if orig_stack is not None:
        cls.stack_layer = stack_spy
    try:
        out = gen(m, ids, policy, topk=32, **SMALL.get(policy, {}), **kw)
    finally:
        mod.sparse_attend = orig
        if orig_stack is not None:
            cls.stack_layer = orig_stack
    assert calls, "no layer took the sparse path"
    assert out.sequences.shape == ref.sequences.shape
    assert not same(out, ref, tol=0.0)  # lossy at 32 of ~130 tokens on a random model


def test_recycled_refreshkv_invariants():
    """Strict fixed schedule: S=1 is dense; between full steps |C_p| = K and new tokens are in it."""
    m = model4("llama")
    ids = torch.randint(3, 256, (1, 80), generator=torch.Generator().manual_seed(3))
    assert same(gen(m, ids, "recycled", topk=16, schedule="fixed", stride=1), gen(m, ids, "dense"))
    seen = []
    import accel.policies.recycled as R

    orig = R.sparse_attend

    def spy(ctx, query, key, value, mask, scaling, idx, counts):
        seen.append((key.shape[2], idx.clone(), ctx.state["t_full"]))
        return orig(ctx, query, key, value, mask, scaling, idx, counts)

    R.sparse_attend = spy
    try:
        gen(m, ids, "recycled", topk=16, schedule="fixed", stride=5, new=10, compact=False)
    finally:
        R.sparse_attend = orig
    assert seen
    for T, idx, t_full in seen:
        assert idx.shape[-1] == 16  # |C_p| = K
        row = idx[0, 0]
        assert torch.all(row[1:] > row[:-1]) and int(row.max()) < T and int(row.min()) >= 0
        assert set(range(t_full, T)) <= set(row.tolist())  # tokens since the last full step are in C_p


def test_select_from_scores_matches_reference():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 6, 2, 77, 16
    q, k = torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    s = torch.einsum("bhgd,bhtd->bhgt", q.view(B, Hkv, 3, D), k).reshape(B, H, T) * D ** -0.5
    lse = torch.logsumexp(s, -1)
    for agg in ("max", "mean", "sum", "shared"):
        for chunk, sink, recent, budget in ((1, 0, 0, 10), (4, 4, 8, 24), (8, 8, 16, 40), (4, 0, 0, 500)):
            idx, counts = S.select_from_scores(s, lse, Hkv, budget, agg=agg, chunk=chunk, sink=sink, recent=recent)
            ref = select_topk_ref(q, k, T, budget, agg=agg, chunk=chunk, sink=sink, recent=recent)
            n = ref.shape[-1]
            assert torch.equal(idx[..., :n].long(), ref) and torch.all(counts == (ref >= 0).sum(-1))


def test_gather_rows_equals_torch_gather_on_cache_views():
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(4, 3, 100, 8, generator=g)
    views = (buf, buf[1:3, :, 5:90], buf[:, 1:], buf.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :50])
    for x in views:
        idx = torch.randint(0, x.shape[2], (x.shape[0], x.shape[1], 7), generator=g)
        ref = torch.gather(x, 2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))
        assert torch.equal(D.gather_rows(x, idx), ref)


def test_selection_with_left_padding_starts_the_sink_at_the_first_real_token():
    B, H, Hkv, T = 2, 2, 1, 40
    s = torch.randn(B, H, T)
    s[1, :, :10] = float("-inf")  # row 1 is left-padded by 10
    lse = torch.logsumexp(s, -1)
    idx, counts = S.select_from_scores(s, lse, Hkv, 12, agg="max", chunk=1, sink=3, recent=4,
                                       first_valid=torch.tensor([0, 10]))
    row1 = idx[1, 0, : counts[1, 0]].tolist()
    assert {10, 11, 12} <= set(row1) and {36, 37, 38, 39} <= set(row1) and min(row1) >= 10


@pytest.mark.exactness
@pytest.mark.parametrize("policy,kw", CASES)
def test_left_padded_batch_equals_dense_when_budget_covers(policy, kw):
    m = model4("llama")
    a = torch.randint(3, 256, (2, 70), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(a)
    mask[1, :15] = 0
    a[1, :15] = 0
    kw = dict(kw)
    if kw.get("plan") == "hand":
        kw["plan"] = hand_plan()
    assert same(gen(m, a, policy, mask=mask, topk=4096, **kw), gen(m, a, "dense", mask=mask))
    out = gen(m, a, policy, mask=mask, topk=24, **SMALL.get(policy, {}), **kw)
    assert out.sequences.shape == (2, 82)


def test_remove_restores_hooks_and_attention():
    m = model4("llama")
    before = [len(mod._forward_hooks) for mod in m.modules()]
    impl = m.config._attn_implementation
    h = accel.patch(m, "recycled")
    # one per q_proj, and the take-over check on the model
    assert sum(len(mod._forward_hooks) for mod in m.modules()) == sum(before) + 4 + 1
    h.remove()
    assert [len(mod._forward_hooks) for mod in m.modules()] == before and m.config._attn_implementation == impl


def test_bad_knobs_and_missing_plan_are_clear_errors():
    m = model4("llama")
    with pytest.raises(accel.AccelError, match="accel plan --model"):
        accel.patch(m, "hylra")
    with pytest.raises(accel.AccelError, match="topk_ratio must be in"):
        accel.patch(m, "delta", topk_ratio=1.5)
    with pytest.raises(accel.AccelError, match="sink \\+ recent"):
        accel.patch(m, "hylra", plan=hand_plan(), topk=8, sink=8, recent=8)
    with pytest.raises(accel.AccelError, match="schedule must be"):
        accel.patch(m, "recycled", schedule="sometimes")
    with pytest.raises(accel.AccelError, match="outside 0..3"):
        accel.patch(m, "delta", delta_layers=[7])
    with pytest.raises(accel.PlanValidationError, match="reuse_src"):
        Plan.from_dict({**hand_plan().to_dict(), "layers": [LayerPlan(mode="reuse", reuse_src=3).__dict__] * 4})


# -- the DP ---------------------------------------------------------------------------------------------
def test_dp_special_cases():
    L = 6
    eye = torch.eye(L)
    assert hylra_dp(eye, c_max=L - 1) == [-1] * L  # nothing to share: every layer an anchor
    assert hylra_dp(torch.ones(L, L), c_max=0) == [-1] + [0] * (L - 1)  # one anchor, everyone reuses it
    cfg = hylra_dp(torch.ones(L, L), c_max=2, rollback={3})
    assert cfg[3] == -1
    last = 0
    for j, c in enumerate(cfg):  # reuse points at the most recent anchor
        if c == -1:
            last = j
        else:
            assert c == last


def test_dp_matches_brute_force():
    rng = torch.Generator().manual_seed(5)
    for trial in range(25):
        L = 3 + trial % 5
        A = torch.triu(torch.rand(L, L, generator=rng))
        A.fill_diagonal_(1.0)
        tables = [A, torch.triu(torch.rand(L, L, generator=rng)).fill_diagonal_(1.0)] if trial % 2 else A
        c_max = trial % 4
        rollback = {L - 1} if trial % 3 == 0 and c_max > 0 else set()
        cfg = hylra_dp(tables, c_max, rollback)
        assert sum(c == -1 for c in cfg) - 1 <= c_max and all(cfg[r] == -1 for r in rollback)
        assert path_value(tables, cfg) == pytest.approx(brute_force(tables, c_max, rollback))


def test_profiler_statistics():
    one_hot = torch.zeros(1, 3, 8)
    one_hot[..., 2] = 1.0
    assert torch.allclose(_ratio90(one_hot, torch.tensor([8, 8, 8])), torch.full((1, 3), 1 / 8))
    uniform = torch.full((1, 2, 10), 0.1)
    assert torch.allclose(_ratio90(uniform, torch.tensor([10, 10])), torch.full((1, 2), 0.9), atol=0.11)
    m = torch.zeros(1, 4, 6, dtype=torch.bool)
    m[..., :3] = True
    d = torch.zeros_like(m)
    d[..., 3:] = True
    ov = overlap_matrix([m, m.clone(), d])
    assert ov[0, 0, 1] == 1 and ov[0, 0, 2] == 0 and ov[0, 1, 0] == 0  # upper-triangular + diagonal
    q, k = torch.randn(4, 5, 8), torch.randn(2, 40, 8)
    r, mask = layer_statistics(q, k, 8 ** -0.5, chunk=4, preserved=12, sink=4, recent=4)
    assert r.shape == (2, 5) and mask.shape == (2, 5, 10) and torch.all(mask.sum(-1) == 3)


def test_mass_recall_matrix():
    """Share of each query head's attention mass inside the donor's selection of its KV head: 1 when
    the donor keeps every chunk the head attends, 0 when disjoint, the worst step with reduce='min'."""
    Hkv, G, S, nC = 2, 2, 3, 4
    donor = torch.zeros(Hkv, S, nC, dtype=torch.bool)
    donor[0, :, :2] = True  # KV head 0 keeps chunks 0-1
    donor[1, :, 2:] = True  # KV head 1 keeps chunks 2-3
    mass = torch.zeros(Hkv * G, S, nC)
    mass[0:2, :, 0] = 1.0  # heads of KV head 0 attend chunk 0: inside
    mass[2, :, 0] = 1.0  # a head of KV head 1 attends chunk 0: outside its KV head's selection
    mass[3, :, 2] = 0.5
    mass[3, :, 1] = 0.5
    mass[3, 1] = 0.0
    mass[3, 1, 1] = 1.0  # one step puts everything outside
    own = torch.ones(Hkv, S, nC, dtype=torch.bool)
    mean = mass_recall_matrix([donor, own], [mass, mass])
    assert mean.shape == (4, 2, 2) and torch.all(mean[:, 0, 0] == 1) and torch.all(mean[:, 1, 1] == 1)
    assert mean[0, 0, 1] == 1 and mean[1, 0, 1] == 1 and mean[2, 0, 1] == 0
    assert abs(mean[3, 0, 1].item() - 1 / 3) < 1e-6 and mean[3, 1, 0] == 0  # (0.5 + 0 + 0.5) / 3; lower triangle 0
    worst = mass_recall_matrix([donor, own], [mass, mass], reduce="min")
    assert worst[3, 0, 1] == 0 and worst[0, 0, 1] == 1


def test_calibrate_produces_a_valid_plan_that_round_trips(tmp_path):
    m = model4("gemma3_text")
    random.seed(0)
    txt = " ".join("".join(random.choice(string.ascii_lowercase) for _ in range(5)) for _ in range(300))

    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=True):
            return {"input_ids": torch.tensor([[3 + (ord(c) % 250) for c in text]])}

    p = accel.calibrate(m, Tok(), [txt, txt[::-1]], tokens=256, steps=16, sparsity=0.5, computed_ratio=0.5, progress=False)
    assert [lp.mode for i, lp in enumerate(p.layers) if i in (0, 2)] == ["full", "full"]  # sliding layers stay exact
    assert p.provenance["fingerprint"].startswith("gemma3_text-L4") and p.provenance["args"]["n_texts"] == 2
    p.save(tmp_path / "plan.json")
    q = Plan.load(tmp_path / "plan.json")
    assert q.to_dict() == p.to_dict()
    ids = torch.randint(3, 256, (1, 60), generator=torch.Generator().manual_seed(6))
    assert same(gen(m, ids, "hylra", plan=q, topk=4096), gen(m, ids, "dense"))
    for metric in ("overlap", "mass"):  # every similarity the DP can use gives a valid plan
        o = accel.calibrate(m, Tok(), [txt], tokens=256, steps=16, sparsity=0.5, computed_ratio=0.5, metric=metric,
                            progress=False)
        assert o.provenance["args"]["metric"] == metric and o.provenance["args"]["data"] == "user texts"
        o.validate(num_layers=4)
    with pytest.raises(AccelError, match="metric must be"):
        accel.calibrate(m, Tok(), [txt], tokens=256, steps=16, metric="kl", progress=False)
    with pytest.raises(AccelError, match="does not apply"):  # not silently ignored
        accel.calibrate(m, Tok(), [txt], policy="moa", metric="mass", progress=False)
    with pytest.raises(AccelError, match=r"calibrate\(duo\): option data does not apply"):
        accel.calibrate(m, Tok(), [txt], policy="duo", data="essays", progress=False)
    with pytest.raises(AccelError, match="calibrate\\(duo\\): metric"):  # forwarded to the duo profiler
        accel.calibrate(m, Tok(), [txt], policy="duo", metric="mass_min", progress=False)


def test_runtime_counts_the_kv_bytes_decode_actually_reads():
    m = model4("llama")
    ids = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(7))
    read = {}
    for name, pol, kw in (("dense", "dense", {}), ("hylra", "hylra", {"plan": hand_plan(), "topk": 32, "sink": 4,
                                                                         "recent": 8})):
        with accel.patch(m, pol, **kw) as h:
            m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            read[name] = h.runtime.stats["kv_read_bytes"] / h.runtime.stats["decode_layer_calls"]
    # dense: every layer reads ~201-204 tokens x 2 heads x (K+V) x 16 x 4 bytes
    assert 200 * 2 * 2 * 16 * 4 <= read["dense"] <= 205 * 2 * 2 * 16 * 4
    # hylra: layers 0 (full), 2 (select: scores over K, then 32 rows), 1 and 3 (32 rows each)
    assert read["hylra"] < 0.75 * read["dense"]


@pytest.mark.parametrize("schedule", ["fixed", "dynamic"])
def test_recycled_compact_partial_cache_attends_the_same_tokens_as_the_index_path(schedule):
    from accel.policies.recycled import RecycledPolicy

    m = model4("llama")
    ids = torch.randint(3, 256, (1, 150), generator=torch.Generator().manual_seed(8))
    calls = []
    orig = RecycledPolicy._partial_compact

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    RecycledPolicy._partial_compact = spy
    try:
        a = gen(m, ids, "recycled", topk=24, schedule=schedule, stride=4, qc=3, threshold=0.9, new=20)
    finally:
        RecycledPolicy._partial_compact = orig
    b = gen(m, ids, "recycled", topk=24, schedule=schedule, stride=4, qc=3, threshold=0.9, new=20, compact=False)
    assert calls and same(a, b, tol=1e-4)


def test_short_prompts_keep_at_least_min_topk_tokens():
    assert S.token_budget(5, None, 0.125, 64) == 64 and S.token_budget(4096, None, 0.125, 64) == 512
    assert S.token_budget(5, 3, 0.125, 64) == 3  # an explicit topk is taken as given
    m = model4("llama")
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(9))
    ref = gen(m, ids, "dense")
    for pol, kw in (("recycled", {}), ("delta", {}), ("hylra", {"plan": hand_plan()})):
        assert same(gen(m, ids, pol, **kw), ref)  # 30 + 12 tokens < 64: exact with the default ratio


@pytest.mark.parametrize("agg", S.AGG_CHOICES)
def test_cpp_selection_from_logits_matches_torch(agg):
    """The C++ selection anchors use (``select_from_logits``) picks the same positions as the torch
    path, with left padding (sink from the first real token) and budgets below / above the context."""
    from accel import _ext

    if not _ext.HAS_CPU_EXT:
        pytest.skip(_ext.CPU_EXT_REASON)
    g = torch.Generator().manual_seed(5)
    for B, H, Hkv, T, chunk, sink, recent, budget in ((2, 4, 2, 300, 4, 4, 8, 40), (2, 6, 3, 301, 1, 3, 5, 17),
                                                      (3, 4, 2, 200, 8, 16, 16, 60), (2, 4, 2, 100, 4, 4, 8, 200)):
        sc = torch.randn(B, H, T + 3, generator=g) * 3
        fv = torch.tensor([0] + [7] * (B - 1))
        for b in range(B):
            sc[b, :, : fv[b]] = float("-inf")
        lse = torch.logsumexp(sc[:, :, :T], -1)
        kw = dict(agg=agg, chunk=chunk, sink=sink, recent=recent, first_valid=fv, T=T)
        i_t, c_t, _ = S.select_from_scores(sc, lse, Hkv, budget, return_scores=True, **kw)  # torch path
        i_c, c_c = S.select_from_scores(sc, lse, Hkv, budget, **kw)  # C++ path
        assert torch.equal(c_t, c_c)
        for b in range(B):
            for h in range(c_t.shape[1]):
                assert torch.equal(i_t[b, h, : c_t[b, h]], i_c[b, h, : c_c[b, h]])


def test_quest_per_query_head_selection_attends_each_heads_own_pages():
    """agg="none" (the paper's per-head selection, written for multi-head attention): each query head attends to the
    pages whose bound for that head alone is highest, with the current page; its output is exact attention over its
    own positions, for every head of a GQA group and every row of a left-padded batch (the per-layer path; the one-call
    C++ stack equals it bit for bit: tests/test_fused_decode.py). A budget that covers the context is dense attention."""
    from accel.ops._selection_reference import page_minmax_ref, quest_page_scores_ref
    import accel.policies.quest as Q

    m = model4("llama")  # 4 query heads on 2 KV heads
    ids = torch.randint(3, 256, (2, 150), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    seen = []
    orig = Q.sparse_attend

    def spy(ctx, query, key, value, attention_mask, scaling, *sels):
        out = orig(ctx, query, key, value, attention_mask, scaling, *sels)
        seen.append((query.clone(), key.clone(), value.clone(), scaling, sels, out.clone()))
        return out

    Q.sparse_attend = spy
    try:
        with accel.patch(m, "quest", agg="none", topk=64, page_size=16, fused_decode=False):  # 4 pages of 16
            m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    finally:
        Q.sparse_attend = orig
    assert len(seen) == 2 * 5  # layers 2 and 3, five decode steps
    differs = False
    for q, k, v, scaling, sels, out in seen:
        B, H, _, Dh = q.shape
        Hkv, T = k.shape[1], k.shape[2]
        G = H // Hkv
        n_pages = (T + 15) // 16
        kmin, kmax = page_minmax_ref(k, T, 16)
        uidx, ucnt, umask = sels  # the group's union of pages, bit g for query head kh * G + g
        assert umask.dtype == torch.int64 and umask.shape == uidx.shape
        for b in range(B):
            for kh in range(Hkv):
                held = umask[b, kh, : ucnt[b, kh]]
                assert bool((held != 0).all()) and bool((held >> G == 0).all())  # every entry some head's, no other bits
        per_head = [[[uidx[b, kh, : ucnt[b, kh]][((umask[b, kh, : ucnt[b, kh]] >> g) & 1) == 1] for kh in range(Hkv)]
                     for b in range(B)] for g in range(G)]
        differs |= any(not torch.equal(per_head[0][b][kh], per_head[g][b][kh])
                       for g in range(1, G) for b in range(B) for kh in range(Hkv))
        for head in range(H):
            kh, g = divmod(head, G)
            ub = quest_page_scores_ref(q[:, kh * G + g: kh * G + g + 1, 0], kmin[:, kh:kh + 1], kmax[:, kh:kh + 1], "max")
            for b in range(B):
                pos = per_head[g][b][kh].long()
                pages = set((pos // 16).tolist())
                sc = ub[b, 0, : n_pages - 1].clone()
                first = 13 if b == 1 else 0
                sc[: first // 16] = float("-inf")  # pages of padding only are never picked
                assert pages == set(sc.topk(3).indices.tolist()) | {n_pages - 1}
                keep = pos[pos >= first]
                w = torch.softmax((k[b, kh, keep].float() @ q[b, head, 0].float()) * scaling, 0)
                torch.testing.assert_close(out[b, 0, head].float(), w @ v[b, kh, keep].float(), rtol=1e-5, atol=1e-5)
    assert differs  # the heads of a group did pick different pages somewhere
    ref = gen(m, ids, "dense", mask=mask, new=6)
    assert same(gen(m, ids, "quest", mask=mask, new=6, agg="none", topk_ratio=1.0), ref)


@pytest.mark.parametrize("summaries", ["float32", "bfloat16"])
def test_quest_attends_the_pages_with_the_highest_bounds_and_the_current_page(summaries):
    """Quest (methods.md 7.5) with one page set per KV head (agg="max"): the first two layers stay dense; elsewhere each
    KV head attends to the ceil(topk / page) pages (at least 3) whose key min/max bound q.k highest (the largest over
    its query heads), always with the current page, every
    page whole; the incremental page metadata gives the reference's bounds (bfloat16 summaries: its min and max
    rounded outward). (The per-layer path, seen through its ``sparse_attend``; the one-call C++ stack equals it bit
    for bit: tests/test_fused_decode.py.)"""
    from accel.cache.quest import bf16_outward
    from accel.ops._selection_reference import page_minmax_ref, quest_page_scores_ref
    import accel.policies.quest as Q

    m = model4("llama")
    ids = torch.randint(3, 256, (1, 150), generator=torch.Generator().manual_seed(7))
    seen = []
    orig = Q.sparse_attend

    def spy(ctx, query, key, value, mask, scaling, idx, counts):
        seen.append((ctx.layer_idx, query.clone(), key.clone(), idx.clone(), counts.clone()))
        return orig(ctx, query, key, value, mask, scaling, idx, counts)

    Q.sparse_attend = spy
    try:
        gen(m, ids, "quest", topk=64, page_size=16, summary_dtype=summaries, agg="max", new=8,
            fused_decode=False)  # 4 pages, one set per KV head
    finally:
        Q.sparse_attend = orig
    assert seen and {s[0] for s in seen} == {2, 3}
    for _, q, k, idx, counts in seen:
        T = k.shape[2]
        n_pages = (T + 15) // 16
        kmin, kmax = page_minmax_ref(k, T, 16)
        if summaries == "bfloat16":
            kmin, kmax = bf16_outward(kmin, up=False).float(), bf16_outward(kmax, up=True).float()
        ub = quest_page_scores_ref(q[:, :, 0], kmin, kmax, "max")[0]  # [Hkv, n_pages]
        for h in range(k.shape[1]):
            got = idx[0, h, : counts[0, h]].long()
            assert torch.equal(got, got.sort().values)
            pages = sorted(set((got // 16).tolist()))
            assert len(pages) == 4 and pages[-1] == n_pages - 1  # the current page is always attended
            want = set(ub[h, : n_pages - 1].topk(3).indices.tolist()) | {n_pages - 1}
            assert set(pages) == want
            assert int(counts[0, h]) == 3 * 16 + (T - 16 * (n_pages - 1))  # whole pages, the last one partial
