"""HiP attention (methods.md 7.4): the hierarchical search finds the exact block top-k when branches are scored
exhaustively, the mask always holds the sinks and the window, masks are reused between refreshes, and left-padded
rows start their sinks at their first real token. (Exactness with a covering budget: tests/test_layer_reuse.py.)"""
import pytest
import torch

import accel
import accel.policies.hip as HIP
from accel.errors import AccelError

from .conftest import gen, left_padded, model4, same


def _block_max(q, k, scaling, kb):
    B, H, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    s = torch.einsum("bhgd,bhtd->bhgt", q.view(B, Hkv, H // Hkv, D), k).amax(2) * scaling  # [B, Hkv, T]
    return s.view(B, Hkv, T // kb, kb).amax(-1)


def test_exhaustive_scoring_gives_the_exact_block_top_k():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D, kb = 2, 6, 2, 512, 16, 8
    for trial in range(4):
        q, k = torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
        for n_blocks in (4, 8, 16):
            kept = HIP.search_blocks(q, k, torch.zeros(B, dtype=torch.long), 0, 0, n_blocks, kb, "max", 0.25)
            assert kept.shape[-1] == n_blocks * kb and bool((kept >= 0).all())
            want = _block_max(q, k, 0.25, kb).topk(n_blocks, dim=-1).indices.sort(-1).values
            got = (kept.view(B, Hkv, n_blocks, kb) // kb)
            assert torch.equal(got[..., 0], want)  # whole, aligned blocks: the n best by their largest logit
            assert torch.equal(got, got[..., :1].expand_as(got))


@pytest.mark.parametrize("backend", [None, "torch"])
def test_representative_keys_that_cover_every_child_score_it_exhaustively(backend):
    """``rep_keys``: a child scores as the largest logit of that many of its keys (from its start, or centred on its
    middle). Keys that cover every child give the exhaustive search's branches (``representative="max"``); one key
    per child is the single-key search; in between, every kept child's score is the largest over its keys counted."""
    g = torch.Generator().manual_seed(21)
    B, H, Hkv, T, D = 2, 6, 2, 600, 16
    q, k = torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    first = torch.tensor([0, 37])
    for rep in ("middle", "first"):
        for n_blocks, kb in ((12, 4), (30, 2)):
            lo, hi, start = HIP.initial_branches(first, Hkv, T, 4, 16, n_blocks, kb)
            longest = int((hi - lo).max())
            ex = HIP.hip_step(q, k, lo, hi, kb, "max", 0.125, 0, first, start, 4, 16, backend="torch")
            got = HIP.hip_step(q, k, lo, hi, kb, rep, 0.125, 0, first, start, 4, 16, backend=backend,
                               rep_keys=longest)
            assert torch.equal(got[0], ex[0]) and torch.equal(got[1], ex[1]) and torch.equal(got[3], ex[3])
            one = HIP.hip_step(q, k, lo, hi, kb, rep, 0.125, 0, first, start, 4, 16, backend=backend)
            two = HIP.hip_step(q, k, lo, hi, kb, rep, 0.125, 0, first, start, 4, 16, backend=backend, rep_keys=2)
            assert not torch.equal(one[0], ex[0]) and not torch.equal(two[0], one[0])  # the keys counted matter
            levels, L = 0, longest
            while L > kb:
                levels, L = levels + 1, (L + 1) // 2
            # rows scored: one per child and level with one key (every child non-empty here), more with more keys
            assert bool((one[5] <= 2 * n_blocks * levels).all()) and bool((one[5] >= 2 * n_blocks).all())
            assert bool((two[5] > one[5]).all()) and bool((got[5] > two[5]).all())
    s = HIP._child_scores(q.view(B, Hkv, 3, D), k, torch.tensor([[[10, 20, 30]] * Hkv] * B),
                          torch.tensor([[[20, 23, 31]] * Hkv] * B), "middle", None, 1.0, 4)
    logit = torch.einsum("bhgd,bhtd->bhgt", q.view(B, Hkv, 3, D), k).amax(2)
    assert torch.allclose(s[..., 0], logit[..., 13:17].amax(-1))  # centred on the middle: (10 + 20 - 4) // 2 = 13
    assert torch.allclose(s[..., 1], logit[..., 20:23].amax(-1))  # clipped to the child
    assert torch.allclose(s[..., 2], logit[..., 30])


@pytest.mark.parametrize("rep", ["middle", "first"])
def test_a_nan_key_ranks_its_child_first_in_both_searches(rep):
    """A NaN key's logit makes its child's score +inf in the C++ search and the torch path alike (NaN ranks first):
    the same branches; with first keys as representatives (the NaN key stays its branch's first key at every level)
    the NaN key is among the positions attended."""
    g = torch.Generator().manual_seed(8)
    B, H, Hkv, T, D = 1, 6, 2, 400, 16
    q, k = torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    first = torch.zeros(B, dtype=torch.long)
    for rk in (1, 4):
        lo, hi, start = HIP.initial_branches(first, Hkv, T, 4, 16, 12, 4)
        probe = HIP.hip_step(q, k, lo, hi, 4, rep, 0.125, 0, first, start, 4, 16, rep_keys=rk)
        # a key the search scores at its first level (the first representative of branch 3), in KV head 1
        kk = k.clone()
        c0, c1 = int(lo[0, 1, 3]), int(hi[0, 1, 3])
        mid = (c0 + c1) // 2
        t = c0 if rep == "first" else max(c0, (c0 + mid - rk) // 2)
        kk[0, 1, t, 5] = float("nan")
        c = HIP.hip_step(q, kk, lo, hi, 4, rep, 0.125, 0, first, start, 4, 16, rep_keys=rk)
        r = HIP.hip_step(q, kk, lo, hi, 4, rep, 0.125, 0, first, start, 4, 16, backend="torch", rep_keys=rk)
        assert all(torch.equal(x, y) for x, y in zip(c[:2] + c[3:], r[:2] + r[3:]))
        n = int(c[4][0, 1])
        if rep == "first":
            assert t in c[3][0, 1, :n].tolist() and t not in probe[3][0, 1, : int(probe[4][0, 1])].tolist()


def test_a_build_before_rep_keys_runs_the_torch_search(monkeypatch):
    """An extension built before ``rep_keys`` (its hip_search takes neither rep_keys nor returns the rows scored)
    is not called: the torch search runs, the same positions."""
    from accel import _ext

    class OldBuild:
        def hip_search(self, *a):
            raise AssertionError("an old build must not be called")

    OldBuild.hip_search.__doc__ = "HiP's hierarchical branch search: split every branch in two"
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(1, 4, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    first = torch.zeros(1, dtype=torch.long)
    lo, hi, start = HIP.initial_branches(first, 2, 300, 4, 16, 10, 4)
    want = HIP.hip_step(q, k, lo, hi, 4, "middle", 0.125, 0, first, start, 4, 16)
    monkeypatch.setattr(_ext, "cpu_ext", lambda: OldBuild())
    got = HIP.hip_step(q, k, lo, hi, 4, "middle", 0.125, 0, first, start, 4, 16)
    assert all(torch.equal(x, y) for x, y in zip(want[:2] + want[3:], got[:2] + got[3:]))


def test_the_search_reads_few_keys_and_keeps_sinks_and_window():
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, T, D = 1, 3, 1, 1000, 8
    q, k = torch.randn(B, H, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    first = torch.tensor([37])  # left padding: the sinks start at the first real token
    for rep in ("middle", "first"):
        kept = HIP.search_blocks(q, k, first, 4, 16, 10, 8, rep, 1.0)
        row = kept[0, 0][kept[0, 0] >= 0]
        assert row[:4].tolist() == [37, 38, 39, 40]
        assert bool((row[4:] >= 41).all()) and bool((row < T - 16).all())
        assert torch.all(row[1:] > row[:-1]) and len(row) <= 4 + 10 * 8
        idx, counts = HIP.with_window(kept, T, T + 3, 16)  # three steps later: the window follows
        got = idx[0, 0, : counts[0, 0]].tolist()
        assert got[-16:] == list(range(T + 3 - 16, T + 3)) and got[: len(row)] == row.tolist()
        assert int(counts[0, 0]) == len(row) + 16


def _run_spied(m, ids, **kw):
    seen = []
    orig = HIP.sparse_attend

    def spy(ctx, query, key, value, mask, scaling, idx, counts):
        if ctx.layer_idx == 2:
            lo, hi = ctx.state["hip"][3]
            seen.append((key.shape[2], idx.clone(), counts.clone(), lo.clone(), hi.clone()))
        return orig(ctx, query, key, value, mask, scaling, idx, counts)

    HIP.sparse_attend = spy
    try:
        with accel.patch(m, "hip", **kw) as h:
            m.generate(ids, max_new_tokens=9, do_sample=False, pad_token_id=0)
            stats = dict(h.runtime.stats)
    finally:
        HIP.sparse_attend = orig
    return seen, stats


def test_masks_are_searched_every_refresh_steps_and_reused_between():
    m = model4("llama")
    ids = torch.randint(3, 256, (1, 150), generator=torch.Generator().manual_seed(4))
    kw = dict(topk=48, sink=4, window=8, key_block=4, refresh=4)
    seen, stats = _run_spied(m, ids, refine_levels=0, **kw)
    assert len(seen) == 8  # the 8 decode steps (the first token comes from the prefill)
    assert stats["hip_searches"] == 2 * 2 and stats["hip_refinements"] == 2 * 6  # layers 2, 3; full at steps 1, 5
    for s in (seen[1], seen[2], seen[3]):  # no refinement: the kept blocks of step 1, the window moved on
        T, idx, counts = s[:3]
        for h in range(idx.shape[1]):  # heads may keep different counts (a row's shorter last branch)
            keep0 = seen[0][1][0, h, : int(seen[0][2][0, h]) - 8]
            assert int(counts[0, h]) == keep0.shape[0] + 8 and torch.equal(idx[0, h, : keep0.shape[0]], keep0)
            assert idx[0, h, int(counts[0, h]) - 8: int(counts[0, h])].tolist() == list(range(T - 8, T))
    # refining the finest level at every step: each step's blocks lie inside the coarse branches of the last search
    seen, _ = _run_spied(m, ids, refine_levels=1, **kw)
    for step, (T, idx, counts, lo, hi) in enumerate(seen):
        base = seen[step - step % 4]
        assert torch.equal(lo, base[3]) and torch.equal(hi, base[4])  # the cache holds the last search's branches
        assert int((hi - lo).max()) <= 8
        for h in range(idx.shape[1]):
            row = idx[0, h, : counts[0, h]]
            mid = row[(row >= 4) & (row < base[0] - 8)]  # between the sinks and the window of the last search
            inside = ((mid.view(-1, 1) >= lo[0, h].view(1, -1)) & (mid.view(-1, 1) < hi[0, h].view(1, -1))).any(1)
            assert bool(inside.all()) and len(mid) <= 10 * 4


def test_left_padded_batch_equals_dense_with_a_covering_budget_and_runs_sparse_below_it():
    m = model4("llama")
    ids, mask = left_padded(L=80)
    ref = gen(m, ids, "dense", mask)
    assert same(gen(m, ids, "hip", mask, topk=4096), ref)
    seen = []
    orig = HIP.sparse_attend

    def spy(ctx, query, key, value, mask_, scaling, idx, counts):
        seen.append((idx.clone(), counts.clone()))
        return orig(ctx, query, key, value, mask_, scaling, idx, counts)

    HIP.sparse_attend = spy
    try:
        out = gen(m, ids, "hip", mask, topk=24, sink=2, window=4, key_block=2, dense_layers=1)
    finally:
        HIP.sparse_attend = orig
    assert seen and out.sequences.shape == ref.sequences.shape
    first = mask.argmax(1)
    for idx, counts in seen:
        for b in range(ids.shape[0]):
            row = idx[b, 0, : counts[b, 0]].tolist()
            assert row[:2] == [int(first[b]), int(first[b]) + 1]  # the sinks: the row's first real tokens
            assert len(row) <= 24


def test_bad_options_are_refused_in_one_line():
    m = model4("llama")
    for kw, why in (({"representative": "last"}, "representative must be one of"), ({"key_block": 0}, "key_block"),
                    ({"refresh": 0}, "refresh"), ({"topk": -3}, "topk"),
                    # the default sink + window (80) would not fit: the message names them as hip does
                    ({"topk": 40}, r"sink \+ window \(16 \+ 64\) exceed topk=40; .* lower sink/window or raise topk"),
                    ({"rep_keys": 0}, "rep_keys"), ({"rep_keys": 4, "representative": "max"}, "use rep_keys=1"),
                    ({"rep_keys": 4, "sparse_prefill": True}, "use rep_keys=1")):
        with pytest.raises(AccelError, match=why):
            accel.patch(m, "hip", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_cpu_search_equals_the_torch_path(dtype):
    """accel._C.hip_search (accel/cpu/hip.h) against the torch twin: the same branches, coarse level and positions,
    for both representatives, left padding, strided cache views and empty children (key_block 1)."""
    from accel import _ext

    if not (_ext.HAS_CPU_EXT and hasattr(_ext.cpu_ext(), "hip_search")):
        pytest.fail("the C++ extension is not built with hip_search")
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, T, D = 3, 6, 2, 700, 32
    buf = torch.randn(B, Hkv, T + 50, D, generator=g).to(dtype)
    key = buf[:, :, :T]  # a strided view, as the cache hands it over
    q = torch.randn(B, H, D, generator=g).to(dtype).float()
    first = torch.tensor([0, 13, 101])
    for rep, aligned, rk in [(r, a, k) for r in ("middle", "first") for a in (False, True) for k in (1, 3, 4, 16)]:
        for n_blocks, kb, sink, window, levels in ((20, 4, 8, 32, 2), (37, 1, 0, 0, 3), (5, 8, 4, 16, 0)):
            lo, hi, start = HIP.initial_branches(first, Hkv, T, sink, window, n_blocks, kb, aligned)
            coarse_at = kb << levels if levels else 0
            c = HIP.hip_step(q, key, lo, hi, kb, rep, 0.125, coarse_at, first, start, sink, window, aligned=aligned,
                             rep_keys=rk)
            t = HIP.hip_step(q, key, lo, hi, kb, rep, 0.125, coarse_at, first, start, sink, window, backend="torch",
                             aligned=aligned, rep_keys=rk)
            assert torch.equal(c[0], t[0]) and torch.equal(c[1], t[1])
            if coarse_at:
                assert torch.equal(c[2][0], t[2][0]) and torch.equal(c[2][1], t[2][1])
            assert torch.equal(c[4], t[4]) and torch.equal(c[5], t[5])  # the key rows scored: the same count
            for b in range(B):
                for h in range(Hkv):
                    n = int(c[4][b, h])
                    assert torch.equal(c[3][b, h, :n], t[3][b, h, :n]) and bool((c[3][b, h, n:] == -1).all())
            # a later step refines from the coarse level at a longer context: the window follows
            if coarse_at:
                c2 = HIP.hip_step(q, key, c[2][0], c[2][1], kb, rep, 0.125, 0, first, start, sink, window,
                                  aligned=aligned, rep_keys=rk)
                t2 = HIP.hip_step(q, key, t[2][0], t[2][1], kb, rep, 0.125, 0, first, start, sink, window,
                                  backend="torch", aligned=aligned, rep_keys=rk)
                assert torch.equal(c2[4], t2[4]) and torch.equal(c2[0], t2[0]) and torch.equal(c2[5], t2[5])


def test_tied_children_keep_the_lower_ones_in_both_searches():
    """Children whose scores tie go to the lower child: with every key equal all children tie and both searches keep
    the first n at every level; with two tied groups of keys the C++ selection keeps the same set as the torch sort."""
    from accel import _ext

    if not (_ext.HAS_CPU_EXT and hasattr(_ext.cpu_ext(), "hip_search")):
        pytest.fail("the C++ extension is not built with hip_search")
    B, H, Hkv, T, D = 1, 4, 2, 900, 16
    q = torch.ones(B, H, D)
    first = torch.zeros(B, dtype=torch.long)
    flat = torch.ones(B, Hkv, T, D)
    g = torch.Generator().manual_seed(3)
    two = torch.where(torch.rand(B, Hkv, T, 1, generator=g) < 0.5, 1.0, 2.0).expand(B, Hkv, T, D).contiguous()
    for key in (flat, two):
        for n_blocks, kb in ((40, 4), (100, 2)):
            lo, hi, start = HIP.initial_branches(first, Hkv, T, 4, 16, n_blocks, kb)
            c = HIP.hip_step(q, key, lo, hi, kb, "middle", 0.125, 0, first, start, 4, 16)
            t = HIP.hip_step(q, key, lo, hi, kb, "middle", 0.125, 0, first, start, 4, 16, backend="torch")
            assert torch.equal(c[0], t[0]) and torch.equal(c[1], t[1]) and torch.equal(c[4], t[4])
            for h in range(Hkv):  # the positions (the two searches pad their lists to different widths)
                n = int(c[4][0, h])
                assert torch.equal(c[3][0, h, :n], t[3][0, h, :n])
            if key is flat:  # every level keeps its first n children: the branches pack the span's start
                assert int(c[0][0, 0, 0]) == int(start.view(-1)[0]) and bool((c[0][..., 1:] >= c[0][..., :-1]).all())


def test_sparse_prefill_attends_sinks_window_and_searched_blocks_and_is_off_for_padding():
    """sparse_prefill (off by default): each 64-token query block attends to its sink blocks, its window up to the
    diagonal and the searched blocks in between, within the budget, computed by the block-sparse kernel; a padded
    prompt and a covering budget keep the exact prefill."""
    from accel.ops.sparse import BLOCK, block_sparse_prefill_ref

    g = torch.Generator().manual_seed(6)
    B, H, Hkv, T, D = 2, 6, 2, 700, 16
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    budget, sink, window = 256, 16, 64
    blocks, counts = HIP.prefill_blocks(q, k, 0.25, budget, sink, window)
    nqb = -(-T // BLOCK)
    assert blocks.shape[:3] == (B, H, nqb)
    for b in range(B):
        for h in range(H):
            for i in range(nqb):
                got = blocks[b, h, i, : counts[b, h, i]].tolist()
                assert got == sorted(set(got)) and all(0 <= j <= i for j in got)
                assert {0} | set(range(max(0, i - 1), i + 1)) <= set(got)  # sink block, window up to the diagonal
                assert len(got) == min(i + 1, budget // BLOCK)  # 1 sink + 1 searched + 2 window blocks
            assert torch.equal(blocks[b, h], blocks[b, h - h % 3])  # one selection per KV head
    ref = torch.cat([block_sparse_prefill_ref(q[b:b + 1], k[b:b + 1], v[b:b + 1], blocks[b], counts[b], 0.25)
                     for b in range(B)])
    from accel.ops.sparse import block_sparse_prefill

    out = torch.cat([block_sparse_prefill(q[b:b + 1], k[b:b + 1], v[b:b + 1], blocks[b], counts[b], scale=0.25)
                     for b in range(B)])
    assert (out.float() - ref).abs().max().item() < 1e-4

    m = model4("llama")
    ids = torch.randint(3, 256, (1, 300), generator=torch.Generator().manual_seed(8))
    kw = dict(topk=160, sink=16, window=64, dense_layers=1)
    with accel.patch(m, "hip", sparse_prefill=True, **kw) as h:
        sparse = m(ids).logits
        assert h.runtime.stats.get("hip_prefill_blocks", 0) > 0
    with accel.patch(m, "hip", **kw) as h:
        exact = m(ids).logits
        assert "hip_prefill_blocks" not in h.runtime.stats
    dense = m(ids).logits
    assert torch.equal(exact, dense) and not torch.allclose(sparse, dense, atol=1e-4)
    ids2, mask = left_padded(B=2, L=300, pads=(0, 9))
    with accel.patch(m, "hip", sparse_prefill=True, **kw) as h:
        padded = m(ids2, attention_mask=mask).logits
        assert "hip_prefill_blocks" not in h.runtime.stats
    assert torch.allclose(padded, m(ids2, attention_mask=mask).logits, atol=1e-5)
    with pytest.raises(AccelError, match="representative='max'"):
        accel.patch(m, "hip", sparse_prefill=True, representative="max")


def test_tokens_added_to_the_cache_by_a_second_turn_start_a_new_search():
    """The cached branches cover the context of their search: a multi-token forward on the same cache (a second
    turn) must not reuse them, or the tokens between the old search and the new window would never be read."""
    m = model4("llama")
    ids = torch.randint(3, 256, (1, 150), generator=torch.Generator().manual_seed(9))
    kw = dict(topk=48, sink=4, window=8, key_block=4, refresh=100, dense_layers=3)  # one sparse layer
    with accel.patch(m, "hip", **kw) as h:
        out = m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        assert h.runtime.stats["hip_searches"] == 1
        more = torch.cat([out.sequences, torch.randint(3, 256, (1, 60), generator=torch.Generator().manual_seed(10))], 1)
        m.generate(more, past_key_values=out.past_key_values, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert h.runtime.stats["hip_searches"] == 2


def test_aligned_branches_end_at_the_key_block_so_a_step_attends_its_whole_budget():
    """branches="aligned": the starting branches are key_block * 2**m long, so the search ends on branches of exactly
    key_block tokens: a step attends sink + window + n_blocks * key_block tokens, less at most key_block - 1 where a
    row's shorter last branch is kept (not the 60-80% of its budget that halving equal splits of the span leaves)."""
    g = torch.Generator().manual_seed(11)
    B, H, Hkv, D = 2, 4, 2, 16
    for T, budget, kb in ((2048, 256, 4), (4096, 512, 4), (3001, 300, 8), (700, 150, 2)):
        key = torch.randn(B, Hkv, T, D, generator=g)
        q = torch.randn(B, H, D, generator=g)
        first = torch.tensor([0, 37])
        sink, window = 16, 64
        n_blocks = -(-(budget - sink - window) // kb)
        lo, hi, start = HIP.initial_branches(first, Hkv, T, sink, window, n_blocks, kb, aligned=True)
        lengths = (hi - lo)[hi > lo]
        assert bool((lengths == lengths.max()).sum() >= lengths.numel() - B * Hkv)  # equal but each row's last
        top = int(lengths.max())
        assert top % kb == 0 and (top // kb) & (top // kb - 1) == 0 and top * n_blocks >= T - window - sink
        for backend in ("cpu", "torch"):
            lo2, hi2, _, idx, counts, _ = HIP.hip_step(q, key, lo, hi, kb, "middle", 0.25, 0, first, start, sink, window,
                                                     backend=backend, aligned=True)
            assert bool(((hi2 - lo2) <= kb).all())
            full = sink + window + n_blocks * kb  # only a row's last, shorter branch can end below key_block
            assert bool((counts <= full).all() and (counts > full - kb).all()), (T, budget, kb, backend, counts)
