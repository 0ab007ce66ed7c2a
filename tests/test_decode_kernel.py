"""C++ CPU decode attention vs the pure-torch reference, over shapes that catch bugs."""
import math

import pytest
import torch

from accel import _ext
from accel.ops.attention import decode_attention
from accel.ops._reference import decode_attention_ref



def test_cpu_extension_is_built():
    """scripts/setup.sh builds accel._C; the CPU kernels must be there, not silently replaced."""
    assert _ext.HAS_CPU_EXT, _ext.CPU_EXT_REASON

# (dtype, atol): fp32 cache is exact up to reduction order; bf16 cache is compared against the
# reference run on the same bf16 values upcast, so only accumulation order differs as well.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def _case(B, H, Hkv, D, cap, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256, 40])
@pytest.mark.parametrize("G", [1, 2, 3, 4, 8])
def test_matches_reference_ragged_lengths(dtype, D, G):
    Hkv = 2
    B, cap = 3, 97
    q, k, v = _case(B, G * Hkv, Hkv, D, cap, dtype)
    lengths = torch.tensor([[97, 1], [50, 33], [64, 96]], dtype=torch.int32)
    out, lse = decode_attention(q, k, v, lengths, scale=1 / math.sqrt(D), return_lse=True, backend="cpp")
    ro, rl = decode_attention_ref(q, k, v, lengths, scale=1 / math.sqrt(D), return_lse=True)
    torch.testing.assert_close(out, ro, atol=TOL[dtype], rtol=1e-4)
    torch.testing.assert_close(lse, rl, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_valid_mask_and_strided_views(dtype):
    B, H, Hkv, D, cap = 2, 6, 2, 64, 300
    q, kbuf, vbuf = _case(B, H, Hkv, D, cap, dtype, seed=1)
    k, v = kbuf[:, :, 10:250], vbuf[:, :, 10:250]  # non-contiguous views, as the cache hands out
    valid = torch.rand(B, 240, generator=torch.Generator().manual_seed(2)) > 0.3
    out = decode_attention(q, k, v, valid=valid, backend="cpp")
    ref = decode_attention_ref(q, k, v, torch.full((B, Hkv), 240, dtype=torch.int32), valid=valid, scale=1 / 8)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("n_sel", [1, 17, 64, 200])
@pytest.mark.parametrize("D,G", [(64, 1), (80, 3), (128, 4), (256, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_index_lists_unsorted_ragged(n_sel, D, G, dtype):
    """Sparse decode over unsorted, duplicate-free index lists with a different count per (b, head)."""
    B, Hkv, cap = 2, 2, 200
    q, k, v = _case(B, G * Hkv, Hkv, D, cap, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    idx = torch.stack([torch.stack([torch.randperm(cap, generator=g)[:n_sel] for _ in range(Hkv)]) for _ in range(B)]).int()
    lengths = torch.tensor([[n_sel, max(1, n_sel // 2)], [max(1, n_sel - 3), n_sel]], dtype=torch.int32)
    out = decode_attention(q, k, v, lengths, indices=idx, backend="cpp")
    ref = decode_attention_ref(q, k, v, lengths, indices=idx, scale=1 / math.sqrt(D))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_selecting_every_token_equals_dense_sdpa():
    B, H, Hkv, D, T = 2, 8, 2, 64, 333
    q, k, v = _case(B, H, Hkv, D, T, torch.float32, seed=5)
    idx = torch.arange(T, dtype=torch.int32).expand(B, Hkv, T).contiguous()
    out = decode_attention(q, k, v, torch.full((B, Hkv), T, dtype=torch.int32), indices=idx, backend="cpp")
    sd = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(out, sd, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multithreaded_split_matches_single_thread(dtype):
    """Two threads split the tokens (log-sum-exp merge of the spans; bf16 spans un-split their accumulators first)."""
    B, H, Hkv, D, T = 1, 9, 3, 64, 5000
    q, k, v = _case(B, H, Hkv, D, T, dtype, seed=6)
    ln = torch.full((B, Hkv), T, dtype=torch.int32)
    ext = _ext.cpu_ext()
    one = ext.decode_attention(q, k, v, ln, None, None, 0.125, True, 1)
    two = ext.decode_attention(q, k, v, ln, None, None, 0.125, True, 2)
    torch.testing.assert_close(one[0], two[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one[1], two[1], atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    ext = _ext.cpu_ext()
    q = torch.randn(1, 4, 64)
    k = torch.randn(1, 2, 10, 64)
    with pytest.raises(RuntimeError, match="outside \\[0, cache capacity"):
        ext.decode_attention(q, k, k, torch.full((1, 2), 11, dtype=torch.int32), None, None, 1.0, False, 1)
    with pytest.raises(RuntimeError, match="head_dim"):
        ext.decode_attention(torch.randn(1, 4, 32), k, k, torch.full((1, 2), 10, dtype=torch.int32), None, None, 1.0, False, 1)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        ext.decode_attention(torch.randn(1, 3, 64), k, k, torch.full((1, 2), 10, dtype=torch.int32), None, None, 1.0, False, 1)
    with pytest.raises(RuntimeError, match="indices must lie in"):
        ext.decode_attention(q, k, k, torch.full((1, 2), 1, dtype=torch.int32),
                             torch.full((1, 2, 1), 10, dtype=torch.int32), None, 1.0, False, 1)


def test_scattered_read_probe_sums_the_given_rows():
    C = _ext.cpu_ext()
    buf = torch.randn(300, 32)
    rows = torch.tensor([5, 7, 200, 299, 0], dtype=torch.int32)
    for dist in (0, 2, 16):
        assert C.scattered_read_probe(buf, rows, dist) == pytest.approx(buf[rows.long()].sum().item(), rel=1e-4, abs=1e-3)
    with pytest.raises(RuntimeError, match="out of range"):
        C.scattered_read_probe(buf, torch.tensor([300], dtype=torch.int32), 0)


def test_flush_cache_lines_keeps_values_and_row_read_ceiling_is_positive():
    import platform

    from accel.perf import cold_call_time, measure_row_read_bandwidth

    C = _ext.cpu_ext()
    t = torch.randn(1000, 64)
    before = t.clone()
    flushed = C.flush_cache_lines(t)
    assert flushed == (platform.machine() in ("x86_64", "AMD64", "i386", "i686"))
    assert torch.equal(t, before)
    calls = []
    assert cold_call_time(lambda: calls.append(1), repeats=3, flush=[t]) >= 0 and len(calls) == 4
    bw = measure_row_read_bandwidth(t, torch.tensor([1, 50, 999]), repeats=2, flush_only_buf=True)
    assert 0 < bw < float("inf")


def _pool_case(dtype, seed=0, D=64):
    """A ragged row pool: per-(b, h) segments of different lengths and capacities, and the same
    tokens laid out as a padded [B, Hkv, S, D] cache for the reference."""
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv = 2, 6, 3
    ln = torch.tensor([[5, 0, 17], [9, 30, 1]], dtype=torch.int32)
    caps = ln.long() + torch.tensor([[2, 4, 0], [1, 3, 5]])
    off = torch.zeros(B * Hkv, dtype=torch.long)
    off[1:] = torch.cumsum(caps.flatten(), 0)[:-1]
    off = off.view(B, Hkv)
    R = int(caps.sum())
    kp, vp = torch.randn(R, D, generator=g).to(dtype), torch.randn(R, D, generator=g).to(dtype)
    kk = torch.zeros(B, Hkv, 40, D, dtype=dtype)
    vv = torch.zeros_like(kk)
    for b in range(B):
        for h in range(Hkv):
            o, n = int(off[b, h]), int(ln[b, h])
            kk[b, h, :n], vv[b, h, :n] = kp[o : o + n], vp[o : o + n]
    q = torch.randn(B, H, D, generator=g)
    return q, kp, vp, kk, vv, ln, off


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ragged_pool_matches_padded_reference(backend, dtype):
    q, kp, vp, kk, vv, ln, off = _pool_case(dtype)
    out, lse = decode_attention(q, kp, vp, ln, offsets=off, return_lse=True, backend=backend)
    ro, rl = decode_attention_ref(q, kk, vv, ln, scale=1 / 8, return_lse=True)
    torch.testing.assert_close(out, ro, atol=TOL[dtype], rtol=1e-4)
    fin = torch.isfinite(rl)
    assert torch.equal(fin, torch.isfinite(lse))
    torch.testing.assert_close(lse[fin], rl[fin], atol=1e-5, rtol=1e-5)
    # sparse: index lists local to each head's segment, and the fused logits output
    g = torch.Generator().manual_seed(3)
    idx = torch.zeros(2, 3, 4, dtype=torch.int32)
    n = torch.zeros(2, 3, dtype=torch.int32)
    for b in range(2):
        for h in range(3):
            m = min(4, int(ln[b, h]))
            if m:
                idx[b, h, :m] = torch.randperm(int(ln[b, h]), generator=g)[:m].sort().values.int()
            n[b, h] = m
    sc = torch.empty(2, 6, 40)
    out = decode_attention(q, kp, vp, n, offsets=off, indices=idx, backend=backend, scores=sc)
    ro = decode_attention_ref(q, kk, vv, n, indices=idx, scale=1 / 8)
    torch.testing.assert_close(out, ro, atol=TOL[dtype], rtol=1e-4)
    ref_sc = torch.einsum("bhd,bhtd->bht", q, kk.float().repeat_interleave(2, 1)) / 8
    for b in range(2):
        for hq in range(6):
            h = hq // 2
            sel = idx[b, h, : n[b, h]].long()
            torch.testing.assert_close(sc[b, hq, sel], ref_sc[b, hq, sel], atol=1e-4, rtol=1e-4)


def test_ragged_pool_bad_offsets_are_clear_errors():
    q, kp, vp, kk, vv, ln, off = _pool_case(torch.float32)
    with pytest.raises(RuntimeError, match="outside"):
        decode_attention(q, kp, vp, ln, offsets=off + kp.shape[0], backend="cpp")
    with pytest.raises(RuntimeError, match="capacity"):
        decode_attention(q, kp, vp, ln + 1000, offsets=off, backend="cpp")


@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("G", [1, 2, 3, 4])
def test_bf16_queries_over_a_bf16_cache_match_the_reference(D, G):
    """A bf16 model's queries hold bf16 values: over a bf16 cache the kernel then scores with vdpbf16ps where the CPU
    has it (exact products, only the summation order differs), in dense spans, under a padding mask, and over index
    lists with per-query-head masks."""
    Hkv, B, cap = 2, 3, 150
    q, k, v = _case(B, G * Hkv, Hkv, D, cap, torch.bfloat16, seed=5)
    q = q.bfloat16().float()  # fp32 rows holding bf16 values, as the fused stack hands a bf16 model's queries
    lengths = torch.tensor([[150, 1], [70, 33], [64, 149]], dtype=torch.int32)
    out, lse = decode_attention(q, k, v, lengths, scale=1 / math.sqrt(D), return_lse=True, backend="cpp")
    ro, rl = decode_attention_ref(q, k, v, lengths, scale=1 / math.sqrt(D), return_lse=True)
    torch.testing.assert_close(out, ro, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, rl, atol=1e-4, rtol=1e-5)
    valid = torch.rand(B, cap, generator=torch.Generator().manual_seed(6)) > 0.3
    out = decode_attention(q, k, v, valid=valid, backend="cpp")
    ref = decode_attention_ref(q, k, v, torch.full((B, Hkv), cap, dtype=torch.int32), valid=valid,
                               scale=1 / math.sqrt(D))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    g = torch.Generator().manual_seed(7)
    idx = torch.stack([torch.stack([torch.randperm(cap, generator=g)[:90].sort().values for _ in range(Hkv)])
                       for _ in range(B)]).int()
    mask = torch.randint(1, 2 ** G, idx.shape, generator=g, dtype=torch.int64)
    n = torch.full((B, Hkv), 90, dtype=torch.int32)
    out = decode_attention(q, k, v, n, indices=idx, head_mask=mask, backend="cpp")
    ref = decode_attention(q, k, v, n, indices=idx, head_mask=mask, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
