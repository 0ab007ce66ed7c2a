"""The Triton decode kernel, run by Triton's CPU interpreter (TRITON_INTERPRET=1) on tiny shapes.

The interpreter must be switched on before triton is imported, so the check runs in a subprocess.
"""
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import math, torch
    from accel.kernels.attention.decode import decode_attention_triton
    from accel.ops._reference import decode_attention_ref
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for (H, Hkv, D) in ((6, 2, 64), (3, 1, 80), (8, 8, 16)):
            B, cap = 2, 70
            q = torch.randn(B, H, D, generator=g)
            k = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
            v = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
            lengths = torch.randint(1, cap + 1, (B, Hkv), generator=g, dtype=torch.int32)
            valid = torch.rand(B, cap, generator=g) > 0.25
            out, lse = decode_attention_triton(q, k, v, lengths, valid=valid, num_splits=2)
            ro, rl = decode_attention_ref(q, k, v, lengths, valid=valid, scale=1 / math.sqrt(D), return_lse=True)
            assert (out - ro).abs().max() < 1e-4, ("dense", dtype, H, D, (out - ro).abs().max())
            fin = torch.isfinite(rl)
            assert torch.equal(fin, torch.isfinite(lse))  # rows with no valid token: lse = -inf in both
            assert (lse[fin] - rl[fin]).abs().max() < 1e-4
            idx = torch.stack([torch.stack([torch.randperm(cap, generator=g)[:20] for _ in range(Hkv)]) for _ in range(B)]).int()
            ln = torch.full((B, Hkv), 13, dtype=torch.int32)
            out, _ = decode_attention_triton(q, k, v, ln, indices=idx)
            ro = decode_attention_ref(q, k, v, ln, indices=idx, scale=1 / math.sqrt(D))
            assert (out - ro).abs().max() < 1e-4, ("sparse", dtype, H, D)
    # ragged row pool (compressed cache): per-head segments at row offsets, dense and sparse
    for dtype in (torch.float32, torch.bfloat16):
        B, H, Hkv, D = 2, 6, 3, 64
        ln = torch.tensor([[5, 0, 17], [9, 30, 1]], dtype=torch.int32)
        caps = ln.long() + torch.tensor([[2, 4, 0], [1, 3, 5]])
        off = torch.cumsum(caps.flatten(), 0).roll(1); off[0] = 0
        R = int(caps.sum())
        kp = torch.randn(R, D, generator=g).to(dtype); vp = torch.randn(R, D, generator=g).to(dtype)
        q = torch.randn(B, H, D, generator=g)
        kk = torch.zeros(B, Hkv, 40, D, dtype=dtype); vv = torch.zeros_like(kk)
        for i in range(B * Hkv):
            b, h = divmod(i, Hkv)
            kk[b, h, : ln[b, h]] = kp[off[i] : off[i] + ln[b, h]]; vv[b, h, : ln[b, h]] = vp[off[i] : off[i] + ln[b, h]]
        R4 = (R, D)
        kx = kp.view(1, 1, *R4).expand(B, Hkv, *R4); vx = vp.view(1, 1, *R4).expand(B, Hkv, *R4)
        out, lse = decode_attention_triton(q, kx, vx, ln, offsets=off.view(B, Hkv), num_splits=2)
        ro, rl = decode_attention_ref(q, kk, vv, ln, scale=1 / math.sqrt(D), return_lse=True)
        assert (out - ro).abs().max() < 1e-4, ("pool", dtype, (out - ro).abs().max())
    # a head mask (quest's per-query-head pages): one Triton call per query head of each group
    from accel.ops.attention import decode_attention
    B, H, Hkv, D, cap = 2, 6, 2, 64, 70
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(B, Hkv, cap, D, generator=g); v = torch.randn(B, Hkv, cap, D, generator=g)
    idx = torch.stack([torch.stack([torch.randperm(cap, generator=g)[:30].sort().values for _ in range(Hkv)])
                       for _ in range(B)]).int()
    ln = torch.tensor([[30, 21], [9, 30]], dtype=torch.int32)
    mask = torch.randint(1, 8, (B, Hkv, 30), generator=g)  # bits of the G = 3 query heads, every entry someone's
    out = decode_attention(q, k, v, ln, indices=idx, head_mask=mask, backend="triton")
    ro = decode_attention_ref(q, k, v, ln, indices=idx, head_mask=mask, scale=1 / math.sqrt(D))
    assert (out - ro).abs().max() < 1e-4, ("head_mask", (out - ro).abs().max())
    # token selection
    from accel.kernels.attention.select import select_topk_triton
    from accel.ops._selection_reference import select_topk_ref
    for agg in ("max", "mean", "sum", "shared"):
        q = torch.randn(2, 6, 64, generator=g)
        k = torch.randn(2, 2, 100, 64, generator=g)
        idx, cnt = select_topk_triton(q, k, [100, 100], 24, agg=agg, chunk=4, sink=4, recent=8)
        ref = select_topk_ref(q, k, 100, 24, agg=agg, chunk=4, sink=4, recent=8)
        assert torch.equal(idx[..., : ref.shape[-1]].long(), ref), ("select", agg)
    # block-sparse prefill
    from accel.kernels.attention.block_sparse import block_sparse_prefill_triton
    from accel.ops.sparse import block_sparse_prefill_ref, sink_window_blocks
    for D in (64, 40):
        q = torch.randn(1, 4, 100, D, generator=g)
        k = torch.randn(1, 2, 150, D, generator=g)
        v = torch.randn(1, 2, 150, D, generator=g)
        blocks, counts = sink_window_blocks(4, 100, 150, sink=[64, 0, 64, 0], window=[64, 64, 0, 128])
        out = block_sparse_prefill_triton(q, k, v, blocks, counts)
        ref = block_sparse_prefill_ref(q, k, v, blocks, counts)
        assert (out - ref).abs().max() < 1e-4, ("block_sparse", D, (out - ref).abs().max())
    print("TRITON_OK")
    """
)


def test_triton_decode_matches_reference_in_interpreter():
    env = {"TRITON_INTERPRET": "1"}
    import os

    env = {**os.environ, **env}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert "TRITON_OK" in r.stdout, r.stdout + r.stderr


LATENT_SCRIPT = """
import torch
from accel.kernels.attention.latent import latent_decode_triton
from accel.ops.latent import latent_decode_ref
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for (B, H, dl, dr, T) in ((2, 5, 24, 8, 37), (1, 20, 32, 16, 70), (2, 3, 16, 0, 9)):
        q = torch.randn(B, H, dl + dr, generator=g)
        kv = torch.randn(B, T, dl + dr, generator=g).to(dtype)
        ln = torch.randint(0, T + 1, (B,), generator=g, dtype=torch.int32); ln[0] = T
        valid = torch.rand(B, T, generator=g) > 0.25
        idx = torch.stack([torch.randperm(T, generator=g)[: T // 2] for _ in range(B)]).int()
        for kw, lens in (({}, ln), ({"valid": valid}, ln), ({"indices": idx}, ln.clamp(max=T // 2))):
            o, lse = latent_decode_triton(q, kv, lens, dl, scale=0.2, **kw)
            ro, rl = latent_decode_ref(q, kv, lens, dl, scale=0.2, **kw)
            fin = torch.isfinite(rl)
            assert torch.equal(fin, torch.isfinite(lse)), (dtype, B, H, list(kw))
            assert (o - ro).abs().max() < 1e-4, (dtype, B, H, list(kw), float((o - ro).abs().max()))
            assert (lse[fin] - rl[fin]).abs().max() < 1e-4
print("LATENT_TRITON_OK")
"""


def test_triton_latent_decode_matches_reference_in_interpreter():
    """The MLA / TPLA-shard latent decode kernel (kernels/attention/latent.py): dense, masked and sparse,
    fp32 and bf16 rows, head counts that do not fill a block, no rotary part."""
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", LATENT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert "LATENT_TRITON_OK" in r.stdout, r.stdout + r.stderr
