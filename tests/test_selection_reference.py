"""Invariants of the selection references (the oracle later kernels are tested against)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from accel.ops._reference import decode_attention_ref
from accel.ops._selection_reference import (group_probs_ref, page_minmax_ref, quest_page_scores_ref,
                                            select_topk_ref)


def _qk(B=2, H=6, Hkv=2, T=100, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, T + 7, D, generator=g)


def test_budget_covering_everything_selects_all_and_equals_dense():
    q, k = _qk()
    idx = select_topk_ref(q, k, 100, budget=100, chunk=8, sink=4, recent=16)
    assert torch.equal(idx, torch.arange(100).expand(2, 2, 100))
    v = torch.randn_like(k)
    lengths = torch.full((2, 2), 100, dtype=torch.int32)
    sparse = decode_attention_ref(q, k, v, lengths, indices=idx.int())
    dense = decode_attention_ref(q, k, v, lengths)
    torch.testing.assert_close(sparse, dense)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(20, 90), budget=st.integers(1, 120), chunk=st.sampled_from([1, 4, 16]),
       sink=st.integers(0, 8), recent=st.integers(0, 20), agg=st.sampled_from(["max", "mean", "sum", "shared"]))
def test_selection_invariants(T, budget, chunk, sink, recent, agg):
    q, k = _qk(T=T)
    idx = select_topk_ref(q, k, T, budget, agg=agg, chunk=chunk, sink=sink, recent=recent)
    assert idx.shape[1] == (1 if agg == "shared" else 2)
    for row in idx.reshape(-1, idx.shape[-1]):
        r = row[row >= 0]
        assert torch.all(r[1:] > r[:-1]), "sorted and unique"
        assert r.min() >= 0 and r.max() < T
        s = set(r.tolist())
        assert set(range(min(sink, T))) <= s, "sink tokens forced in"
        assert set(range(max(0, T - recent), T)) <= s, "recent tokens forced in"


def test_topk_per_kv_head_uses_max_over_group():
    q, k = _qk(T=50)
    p = group_probs_ref(q, k, 50).view(2, 2, 3, 50).max(dim=2).values
    idx = select_topk_ref(q, k, 50, budget=10, agg="max")
    want = p.topk(10, dim=-1).indices.sort(-1).values
    assert torch.equal(idx, want)


def test_quest_bound_is_an_upper_bound():
    q, k = _qk(T=64, seed=3)
    kmin, kmax = page_minmax_ref(k, 64, 16)
    ub = quest_page_scores_ref(q, kmin, kmax, agg="none")  # [B, H, pages]
    G = 3
    for h in range(6):
        s = torch.einsum("bd,btd->bt", q[:, h], k[:, h // G, :64])
        per_page = s.view(2, 4, 16).max(-1).values
        assert torch.all(ub[:, h] >= per_page - 1e-5)


def test_quest_metadata_incremental_equals_reference():
    from accel.cache import AccelCache
    from accel.cache.quest import QuestMetadata

    g = torch.Generator().manual_seed(9)
    cache = AccelCache(num_layers=1)
    meta = QuestMetadata(page_size=16)
    for n in (37, 1, 1, 14, 1, 40, 3, 1):
        kv = torch.randn(2, 2, n, 32, generator=g)
        keys, _ = cache.update(kv, kv, 0)
        mn, mx = meta.bounds(keys)
        rmn, rmx = page_minmax_ref(keys, keys.shape[2], 16)
        assert torch.equal(mn, rmn) and torch.equal(mx, rmx)
    q = torch.randn(2, 6, 32, generator=g)
    ub = meta.page_scores(q, keys, agg="max")
    ref = quest_page_scores_ref(q, *page_minmax_ref(keys, keys.shape[2], 16), agg="max")
    torch.testing.assert_close(ub, ref)
    assert meta.full_pages == keys.shape[2] // 16


@pytest.mark.parametrize("agg", ["max", "mean", "sum", "none"])
def test_quest_selection_kernel_equals_the_torch_path(agg):
    """Quest's page selection in one C++ call (accel/cpu/quest.h) selects the positions of the torch path: strided
    views of the summaries, budgets from one page to more than the context, left padding. ``agg="none"`` (every query
    head's bounds from one pass over the summaries) selects for query head kh * G + g what query heads g, G + g, ...
    select as groups of one, and its merged form (one C++ pass, as the decode uses it) is the union of the G
    selections with each position's heads."""
    from accel.ops._selection_reference import merge_head_selections_ref
    from accel.policies.quest import select_pages

    g = torch.Generator().manual_seed(11)
    B, H, Hkv, D, P = 2, 6, 2, 64, 16
    for T in (17, 160, 333):
        n = -(-T // P)
        bmin = torch.randn(B, Hkv, n + 3, D, generator=g)  # views of larger buffers, as the summaries are
        bmax = bmin + torch.rand(B, Hkv, n + 3, D, generator=g)
        kmin, kmax = bmin[:, :, :n], bmax[:, :, :n]
        assert not kmin.is_contiguous() and kmin.stride() == kmax.stride()
        q = torch.randn(B, H, D, generator=g)
        for k_pages in (1, 3, n // 2 + 1, n + 2):
            for first in (None, torch.tensor([0, 37])):
                idx, cnt = select_pages(q, kmin, kmax, n, k_pages, P, T, agg, first, merged=False)
                ridx, rcnt = select_pages(q, kmin, kmax, n, k_pages, P, T, agg, first, backend="torch", merged=False)
                assert torch.equal(cnt, rcnt) and torch.equal(idx, ridx), (T, k_pages, first)
                if agg == "none":
                    union = select_pages(q, kmin, kmax, n, k_pages, P, T, agg, first)
                    runion = select_pages(q, kmin, kmax, n, k_pages, P, T, agg, first, backend="torch")
                    for a, r, m in zip(union, runion, merge_head_selections_ref(idx, cnt)):
                        assert torch.equal(a, m) and torch.equal(r, m), (T, k_pages, first)
                assert int(cnt.max()) <= min(k_pages, n) * P and bool((idx[..., :1] >= 0).all())
                if agg == "none":
                    G = H // Hkv
                    assert idx.shape[:3] == (G, B, Hkv) and cnt.shape == (G, B, Hkv)
                    for gi in range(G):
                        one = select_pages(q[:, gi::G].contiguous(), kmin, kmax, n, k_pages, P, T, "max", first)
                        assert torch.equal(idx[gi], one[0]) and torch.equal(cnt[gi], one[1]), (T, k_pages, gi)


@pytest.mark.parametrize("agg", ["max", "mean", "none"])
def test_quest_selection_kernel_on_long_contexts_and_ties(agg):
    """Above 1024 pages the C++ selection brackets its threshold from a sample of the bounds (sixteen pages at a time
    summed in one tree). Random bounds: it selects the torch path's positions. Many equal bounds (integer summaries
    and queries, so every summation order gives the same exact bounds), left padding, budgets from a few pages to all
    of them: it keeps the current page and the k - 1 best of the others, ties to the lower page."""
    from accel.ops._selection_reference import merge_head_selections_ref
    from accel.policies.quest import select_pages

    g = torch.Generator().manual_seed(17)
    B, H, Hkv, D, P = 2, 6, 2, 64, 4
    n = 2043
    T = n * P - 1
    kmin = torch.randn(B, Hkv, n, D, generator=g)
    kmax = kmin + torch.rand(B, Hkv, n, D, generator=g)
    q = torch.randn(B, H, D, generator=g)
    for k_pages in (3, 64, 511, 1500):
        for first in (None, torch.tensor([0, 1001])):
            idx, cnt = select_pages(q, kmin, kmax, n, k_pages, P, T, agg, first, merged=False)
            ridx, rcnt = select_pages(q, kmin, kmax, n, k_pages, P, T, agg, first, backend="torch", merged=False)
            assert torch.equal(cnt, rcnt) and torch.equal(idx, ridx), (k_pages, first)
            if agg == "none":  # the merged form: the union of the G selections
                for a, r in zip(select_pages(q, kmin, kmax, n, k_pages, P, T, agg, first),
                                merge_head_selections_ref(idx, cnt)):
                    assert torch.equal(a, r), (k_pages, first)
    kmin = torch.randint(-3, 3, (B, Hkv, 9, D), generator=g).float()[:, :, torch.randint(0, 9, (n,), generator=g)]
    kmax = kmin + torch.randint(0, 2, kmin.shape, generator=g).float()
    q = torch.randint(-2, 3, (B, H, D), generator=g).float()
    ub = quest_page_scores_ref(q, kmin, kmax, agg=agg)  # exact: small integers; agg="none": [B, H, pages]
    G = H // Hkv
    for k_pages in (3, 64, 511, 1500, n):
        for first in (None, torch.tensor([0, 1001])):
            idx, cnt = select_pages(q, kmin, kmax, n, k_pages, P, T, agg, first, merged=False)
            for b in range(B):
                for h in range(H if agg == "none" else Hkv):
                    sc = ub[b, h].clone()
                    if first is not None:
                        sc[: int(first[b]) // P] = float("-inf")
                    others = sorted(range(n - 1), key=lambda j: (-float(sc[j]), j))[: min(k_pages, n) - 1]
                    want = [t for j in sorted(others + [n - 1]) for t in range(j * P, min((j + 1) * P, T))]
                    at = (h % G, b, h // G) if agg == "none" else (b, h)  # query head kh * G + g at [g, b, kh]
                    got = idx[at][: int(cnt[at])].tolist()
                    assert got == want, (agg, k_pages, first, b, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bfloat16_summaries_are_rounded_outward_and_stay_an_upper_bound(dtype):
    """bfloat16 page summaries (``summary_dtype="bfloat16"``) hold each page's min rounded down and max rounded up, so the bound is
    still >= q . k of every key of the page; a bf16 cache's summaries are its exact min and max. The C++ selection
    reads them as the torch path does."""
    from accel.cache.quest import QuestMetadata, bf16_outward
    from accel.policies.quest import select_pages

    g = torch.Generator().manual_seed(13)
    keys = (torch.randn(2, 2, 203, 64, generator=g) * 4).to(dtype)
    meta = QuestMetadata(page_size=4, dtype=torch.bfloat16)
    mn, mx = meta.bounds(keys)
    assert mn.dtype == torch.bfloat16 and mn.shape[2] == 51
    rmn, rmx = page_minmax_ref(keys.float(), keys.shape[2], 4)
    assert bool((mn.float() <= rmn).all()) and bool((mx.float() >= rmx).all())
    if dtype == torch.bfloat16:
        assert torch.equal(mn.float(), rmn) and torch.equal(mx.float(), rmx)
    else:  # the next bf16 value outward, never further
        assert torch.equal(mn, bf16_outward(rmn, up=False)) and torch.equal(mx, bf16_outward(rmx, up=True))
        assert bool((mn.float() > rmn - rmn.abs() / 64).all()) and not torch.equal(mn.float(), rmn)
    q = torch.randn(2, 6, 64, generator=g)
    ub = quest_page_scores_ref(q, mn.float(), mx.float(), agg="max")
    qk = torch.einsum("bkgd,bktd->bkgt", q.view(2, 2, 3, 64), keys.float()).amax(2)  # [B, Hkv, T]
    per_page = torch.nn.functional.pad(qk, (0, 1), value=float("-inf")).view(2, 2, 51, 4).amax(-1)
    assert bool((ub >= per_page - 1e-4).all())
    for k_pages in (3, 10, 50):
        idx, cnt = select_pages(q, mn, mx, 51, k_pages, 4, 203, "max")
        ridx, rcnt = select_pages(q, mn, mx, 51, k_pages, 4, 203, "max", backend="torch")
        assert torch.equal(cnt, rcnt) and torch.equal(idx, ridx)


def test_a_nan_key_gives_its_page_a_nan_summary_and_the_first_rank_in_both_paths():
    """NaN keys propagate into the page summaries (as torch's amin / amax) in float32 and bfloat16, and the C++
    selection ranks a NaN bound first, as torch's topk does."""
    from accel.cache.quest import QuestMetadata
    from accel.policies.quest import select_pages

    g = torch.Generator().manual_seed(14)
    keys = torch.randn(1, 1, 64, 16, generator=g)
    keys[0, 0, 21, 5] = float("nan")  # page 5 of 16 at page size 4
    q = torch.randn(1, 3, 16, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        mn, mx = QuestMetadata(page_size=4, dtype=dtype).bounds(keys)
        assert bool(torch.isnan(mn[0, 0, 5, 5])) and bool(torch.isnan(mx[0, 0, 5, 5]))
        assert not bool(torch.isnan(mn[0, 0, 4]).any())
        idx, cnt = select_pages(q, mn, mx, 16, 3, 4, 64, "max")
        ridx, rcnt = select_pages(q, mn, mx, 16, 3, 4, 64, "max", backend="torch")
        assert torch.equal(idx, ridx) and torch.equal(cnt, rcnt)
        assert 20 in idx[0, 0].tolist() and 60 in idx[0, 0].tolist()


@pytest.mark.parametrize("agg", ["max", "mean", "sum", "none"])
def test_the_current_page_is_attended_whatever_the_other_bounds(agg):
    """Infinite and NaN keys give pages +inf or NaN bounds (a +inf and a -inf key in one page: a NaN bound); the current
    page is still always attended, by the C++ selection and the torch path alike."""
    from accel.cache.quest import QuestMetadata
    from accel.policies.quest import select_pages

    g = torch.Generator().manual_seed(15)
    keys = torch.randn(1, 1, 30, 16, generator=g)
    keys[0, 0, 5, 0] = float("inf")  # page 1: a +inf bound for a positive query coordinate
    keys[0, 0, 9, 0], keys[0, 0, 10, 0] = float("inf"), float("-inf")  # page 2: NaN bound
    keys[0, 0, 13, 3] = float("nan")  # page 3
    q = torch.ones(1, 3, 16)
    mn, mx = QuestMetadata(page_size=4).bounds(keys)  # 8 pages, the last partial
    for k_pages in (1, 2, 3, 4):
        for backend in (None, "torch"):
            idx, cnt = select_pages(q, mn, mx, 8, k_pages, 4, 30, agg, backend=backend, merged=False)
            for i, c in zip(idx.reshape(-1, idx.shape[-1]), cnt.reshape(-1)):  # agg="none": every query head
                pages = sorted({p // 4 for p in i[:c].tolist()})
                assert len(pages) == k_pages and pages[-1] == 7 and set(i[:c].tolist()) >= {28, 29}
                assert set(pages[:-1]) <= {1, 2, 3}  # the infinite and NaN bounds rank first
