"""Token selection and block-sparse prefill: C++ kernels against the pure-torch references."""
import math

import pytest
import torch

from accel.ops._reference import decode_attention_ref
from accel.ops._selection_reference import select_topk_ref
from accel.ops.attention import decode_attention
from accel.ops.sparse import (block_sparse_prefill, block_sparse_prefill_ref, select_topk, sink_window_blocks,
                              vertical_slash_blocks)


@pytest.mark.parametrize("agg", ["max", "mean", "sum", "shared"])
@pytest.mark.parametrize("T,budget,chunk,sink,recent", [(100, 100, 8, 4, 16), (97, 20, 1, 4, 8), (300, 64, 16, 16, 32),
                                                         (50, 7, 4, 0, 0), (129, 1000, 1, 0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_select_matches_reference(agg, T, budget, chunk, sink, recent, dtype):
    g = torch.Generator().manual_seed(T + budget)
    q = torch.randn(2, 6, 64, generator=g)
    k = torch.randn(2, 2, T + 5, 64, generator=g).to(dtype)
    idx, cnt = select_topk(q, k, [T, T], budget, agg=agg, chunk=chunk, sink=sink, recent=recent, backend="cpp")
    ref = select_topk_ref(q, k, T, budget, agg=agg, chunk=chunk, sink=sink, recent=recent)
    n = ref.shape[-1]
    assert torch.equal(idx[..., :n].long(), ref) and bool((cnt == n).all())


def test_select_then_sparse_decode_equals_dense_when_budget_covers_context():
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, D, T = 2, 8, 2, 128, 333
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    idx, cnt = select_topk(q, k, [T, T], T, agg="max", chunk=16, sink=4, recent=64)
    out = decode_attention(q, k, v, cnt, indices=idx)
    torch.testing.assert_close(out, decode_attention_ref(q, k, v, torch.full((B, Hkv), T, dtype=torch.int32),
                                                         scale=1 / math.sqrt(D)), atol=2e-5, rtol=1e-4)


def test_select_batch_with_different_lengths():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 64, generator=g)
    k = torch.randn(2, 1, 200, 64, generator=g)
    idx, cnt = select_topk(q, k, [200, 90], 32, agg="mean", chunk=1, sink=4, recent=8)
    for b, T in enumerate([200, 90]):
        ref = select_topk_ref(q[b : b + 1], k[b : b + 1], T, 32, agg="mean", sink=4, recent=8)
        assert torch.equal(idx[b, :, : cnt[b, 0]].long(), ref[0])
        assert int(idx[b].max()) < T


@pytest.mark.parametrize("D", [64, 128, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Tq", [200, 203])
def test_block_sparse_prefill_sink_window_matches_reference(D, dtype, Tq):
    """Query blocks of 64 rows and a last block of 8 or 11 (every row tiling of the kernels: 6, 2 and 1 rows)."""
    g = torch.Generator().manual_seed(D)
    B, H, Hkv, Tk = 2, 4, 2, Tq + 60  # queries are the last Tq positions (chunked prefill)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    blocks, counts = sink_window_blocks(H, Tq, Tk, sink=[64, 0, 64, 128], window=[64, 128, 0, 64])
    out = block_sparse_prefill(q, k, v, blocks, counts, backend="cpp")
    ref = block_sparse_prefill_ref(q, k, v, blocks, counts)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_block_sparse_prefill_vertical_slash_and_full_equals_sdpa():
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, T, D = 1, 4, 4, 256, 64
    q, k, v = (torch.randn(B, x, T, D, generator=g) for x in (H, Hkv, Hkv))
    blocks, counts = vertical_slash_blocks(H, T, T, vertical=[[0], [0, 1], [], [2]], slash=[[1], [], [1, 2], [3]])
    out = block_sparse_prefill(q, k, v, blocks, counts, backend="cpp")
    torch.testing.assert_close(out, block_sparse_prefill_ref(q, k, v, blocks, counts), atol=2e-5, rtol=1e-4)
    # a window that covers everything is exactly causal dense attention
    blocks, counts = sink_window_blocks(H, T, T, sink=0, window=T)
    out = block_sparse_prefill(q, k, v, blocks, counts, backend="cpp")
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, sd, atol=2e-5, rtol=1e-4)


def test_select_rejects_bad_arguments():
    import accel

    q = torch.randn(1, 2, 16)
    k = torch.randn(1, 1, 10, 16)
    with pytest.raises(accel.AccelError, match="aggregation must be one of"):
        select_topk(q, k, [10], 4, agg="median")
    with pytest.raises(accel.AccelError, match="budget and chunk must be >= 1"):
        select_topk(q, k, [10], 0)


def test_shared_selection_decodes_every_kv_head_over_the_same_set():
    g = torch.Generator().manual_seed(11)
    B, H, Hkv, D, T = 2, 8, 2, 64, 150
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    idx, cnt = select_topk(q, k, [T, T], 40, agg="shared", chunk=4, sink=4, recent=8)
    assert idx.shape[1] == 1
    out = decode_attention(q, k, v, cnt, indices=idx)
    ref = decode_attention_ref(q, k, v, cnt.expand(B, Hkv), indices=idx.expand(B, Hkv, -1), scale=1 / math.sqrt(D))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def _head_selections(G, B, Hkv, W, T, seed):
    """G random sorted, repeat-free selections per (sequence, KV head), of random lengths (0 included), -1 padded."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((G, B, Hkv, W), -1, dtype=torch.int32)
    counts = torch.zeros(G, B, Hkv, dtype=torch.int32)
    for s in range(G):
        for b in range(B):
            for h in range(Hkv):
                n = int(torch.randint(0, W + 1, (1,), generator=g)) if (s + b + h) % 4 else W
                pos = torch.randperm(T, generator=g)[:n].sort().values
                idx[s, b, h, :n] = pos.to(torch.int32)
                counts[s, b, h] = n
    return idx, counts


@pytest.mark.parametrize("G", [1, 3, 4, 8, 64])
def test_merged_head_selections_are_the_union_with_each_heads_bit(G):
    """The union of G per-query-head selections (the torch path's; the C++ selection's merged form equals it:
    tests/test_selection_reference.py): every position of any selection once, ascending, its bit g set exactly when
    selection g holds it, -1 / 0 padding."""
    from accel.ops._selection_reference import merge_head_selections_ref

    B, Hkv, W, T = 2, 3, 24, 60
    idx, counts = _head_selections(G, B, Hkv, W, T, seed=G)
    pos, n, mask = merge_head_selections_ref(idx, counts)
    assert pos.shape == (B, Hkv, G * W) and mask.dtype == torch.int64
    for b in range(B):
        for h in range(Hkv):
            sets = [set(idx[s, b, h, : counts[s, b, h]].tolist()) for s in range(G)]
            union = sorted(set().union(*sets))
            m = int(n[b, h])
            assert pos[b, h, :m].tolist() == union and bool((pos[b, h, m:] == -1).all())
            assert bool((mask[b, h, m:] == 0).all())
            for i, p in enumerate(union):
                assert int(mask[b, h, i]) % 2**64 == sum(1 << s for s in range(G) if p in sets[s])  # bit 63: < 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,Hkv,D", [(6, 2, 64), (8, 2, 128), (4, 4, 80), (8, 1, 64), (64, 1, 64)])
def test_head_mask_attends_each_query_head_over_its_own_entries(dtype, H, Hkv, D):
    """decode_attention with a head mask: query head kh * G + g attends exactly the listed positions of its bit, with a
    left-padding mask, against the torch reference, against one call per query head, and against each head's own
    selection attended alone (the per-query-head decode before the union)."""
    from accel.ops._selection_reference import merge_head_selections_ref
    from accel.ops.attention import per_query_head

    G = H // Hkv
    B, T = 2, 150
    g = torch.Generator().manual_seed(H * D)
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(B, Hkv, T + 7, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T + 7, D, generator=g).to(dtype)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :11] = False
    sel, counts = _head_selections(G, B, Hkv, 70, T, seed=D)
    counts = counts.clamp(min=1)
    sel[:, :, :, 0] = torch.where(sel[:, :, :, 0] < 0, T - 1, sel[:, :, :, 0])  # no empty selection
    idx, n, mask = merge_head_selections_ref(sel, counts)
    scale = 1 / math.sqrt(D)
    out, lse = decode_attention(q, k, v, n, indices=idx, valid=valid, scale=scale, head_mask=mask, return_lse=True)
    ref, ref_lse = decode_attention_ref(q, k, v, n, indices=idx, valid=valid, scale=scale, head_mask=mask,
                                        return_lse=True)
    tol = dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    split, split_lse = per_query_head(q, k, v, n, idx, mask, valid, scale, True, "cpp")
    torch.testing.assert_close(split, out, **tol)
    torch.testing.assert_close(split_lse, lse, **tol)
    for s in range(G):  # each query head's own selection, attended as a group of one
        alone = decode_attention(q[:, s::G].contiguous(), k, v, counts[s], indices=sel[s].contiguous(), valid=valid,
                                 scale=scale)
        torch.testing.assert_close(out[:, s::G], alone, **tol)
    if G > 1:  # the mask takes effect
        assert not torch.equal(out, decode_attention(q, k, v, n, indices=idx, valid=valid, scale=scale))


def test_head_mask_refusals():
    from accel.errors import AccelError

    q, k = torch.randn(1, 2, 64), torch.randn(1, 1, 10, 64)
    idx = torch.arange(4, dtype=torch.int32).view(1, 1, 4)
    n = torch.tensor([[4]], dtype=torch.int32)
    with pytest.raises(AccelError, match="head_mask needs indices"):
        decode_attention(q, k, k, n, head_mask=torch.ones(1, 1, 4, dtype=torch.int64))
    with pytest.raises(AccelError, match="int64 shaped like indices"):
        decode_attention(q, k, k, n, indices=idx, head_mask=torch.ones(1, 1, 4, dtype=torch.int32))
