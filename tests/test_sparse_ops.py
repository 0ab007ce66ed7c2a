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
