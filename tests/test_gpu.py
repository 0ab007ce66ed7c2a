"""GPU twins of the CPU-tested paths: the CUDA extension (``accel._C_cuda``) and the Triton kernels on a real
device, each against the pure-torch reference computed in float64 on the CPU from the same inputs, and the
patched model generating on a CUDA device.

These run only where a CUDA device is visible. The project machines and CI have none; the tests are run on a
lent GPU with ``bash bench/gpu_check.sh`` (README, "What is verified where"). On a GPU machine a missing
``accel._C_cuda`` is a failure, not a skip: the ``cuda`` backend must be built there.
"""
import math

import pytest
import torch

import accel
from accel import _ext
from accel.ops._reference import decode_attention_ref
from accel.ops._selection_reference import aggregate_ref, group_probs_ref, select_topk_ref
from accel.ops.attention import decode_attention
from accel.ops.latent import latent_decode, latent_decode_ref
from accel.ops.sparse import block_sparse_prefill, block_sparse_prefill_ref, select_topk, sink_window_blocks

from .conftest import hand_plan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run bench/gpu_check.sh on one)")

BACKENDS = ["cuda", "triton"]
DEV = "cuda"


def _need(backend):
    if backend == "cuda":
        assert _ext.HAS_CUDA_EXT, _ext.CUDA_EXT_REASON  # on a GPU machine the extension must have been built


def rel(a, b):
    """||a - b|| / ||b|| in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def cpu64(*ts):
    return [t.double().cpu() if t.is_floating_point() else t.cpu() for t in ts]


DECODE_SHAPES = [(1, 32, 8, 128, 4096), (4, 9, 3, 64, 1000), (2, 6, 2, 80, 333), (3, 8, 8, 16, 70)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_dense_masked_and_sparse(backend, dtype, shape):
    _need(backend)
    B, H, Hkv, D, T = shape
    g = gen(hash(shape) % 1000)
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(B, Hkv, T + 17, D, generator=g).to(dtype)[:, :, :T]  # a view with capacity, like the cache
    v = torch.randn(B, Hkv, T + 17, D, generator=g).to(dtype)[:, :, :T]
    lengths = torch.randint(1, T + 1, (B, Hkv), generator=g, dtype=torch.int32)
    lengths[0, 0] = T
    valid = torch.rand(B, T, generator=g) > 0.2
    valid[:, 0] = True
    S = max(1, T // 8)
    idx = torch.stack([torch.stack([torch.randperm(T, generator=g)[:S] for _ in range(Hkv)]) for _ in range(B)]).int()
    ln_idx = torch.randint(1, S + 1, (B, Hkv), generator=g, dtype=torch.int32)
    scale = 1 / math.sqrt(D)
    for kw, ln in (({}, lengths), ({"valid": valid}, lengths), ({"indices": idx}, ln_idx)):
        gkw = {n: t.to(DEV) for n, t in kw.items()}
        out, lse = decode_attention(q.to(DEV), k.to(DEV), v.to(DEV), ln.to(DEV), scale=scale, return_lse=True,
                                    backend=backend, **gkw)
        assert out.is_cuda and out.shape == (B, H, D)
        qd, kd, vd = cpu64(q, k, v)
        ro, rl = decode_attention_ref(qd, kd, vd, ln, scale=scale, return_lse=True, **kw)
        assert torch.isfinite(out).all(), (backend, list(kw))
        assert rel(out, ro) < 1e-5, (backend, dtype, shape, list(kw), rel(out, ro))
        assert (lse.double().cpu() - rl).abs().max() < 1e-4, (backend, list(kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_over_a_ragged_row_pool(backend, dtype):
    """The compressed cache's layout: per-head segments of one row pool, dense and with indices."""
    _need(backend)
    g = gen(3)
    B, H, Hkv, D = 2, 8, 4, 64
    ln = torch.randint(0, 300, (B, Hkv), generator=g, dtype=torch.int32)
    ln[0, 0] = 0  # an empty head (everything evicted): output 0, lse -inf
    ln[1, 1] = 299
    caps = ln.long() + torch.randint(0, 9, (B, Hkv), generator=g)
    off = torch.cumsum(caps.flatten(), 0).roll(1)
    off[0] = 0
    R = int(caps.sum())
    kp = torch.randn(R, D, generator=g).to(dtype)
    vp = torch.randn(R, D, generator=g).to(dtype)
    q = torch.randn(B, H, D, generator=g)
    Tm = int(ln.max())
    kk = torch.zeros(B, Hkv, Tm, D, dtype=torch.float64)
    vv = torch.zeros_like(kk)
    for i in range(B * Hkv):
        b, h = divmod(i, Hkv)
        n = int(ln[b, h])
        kk[b, h, :n] = kp[off[i] : off[i] + n].double()
        vv[b, h, :n] = vp[off[i] : off[i] + n].double()
    out, lse = decode_attention(q.to(DEV), kp.to(DEV), vp.to(DEV), ln.to(DEV), offsets=off.view(B, Hkv).to(DEV),
                                return_lse=True, backend=backend)
    ro, rl = decode_attention_ref(q.double(), kk, vv, ln, scale=1 / math.sqrt(D), return_lse=True)
    fin = torch.isfinite(rl)
    assert torch.equal(fin, torch.isfinite(lse.cpu()))
    assert rel(out, ro) < 1e-5
    assert (lse.double().cpu()[fin] - rl[fin]).abs().max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_decode(backend, dtype):
    """MLA / TPLA-shard latent rows [c | k_rope]: DeepSeek-V2-like widths (512 + 64) and a small odd case."""
    _need(backend)
    g = gen(4)
    for (B, H, dl, dr, T) in ((2, 16, 512, 64, 2000), (3, 5, 24, 8, 37)):
        q = torch.randn(B, H, dl + dr, generator=g)
        kv = torch.randn(B, T, dl + dr, generator=g).to(dtype)
        ln = torch.randint(1, T + 1, (B,), generator=g, dtype=torch.int32)
        ln[0] = T
        valid = torch.rand(B, T, generator=g) > 0.25
        valid[:, 0] = True
        idx = torch.stack([torch.randperm(T, generator=g)[: T // 2] for _ in range(B)]).int()
        for kw, lens in (({}, ln), ({"valid": valid}, ln), ({"indices": idx}, ln.clamp(max=T // 2))):
            gkw = {n: t.to(DEV) for n, t in kw.items()}
            o, lse = latent_decode(q.to(DEV), kv.to(DEV), lens.to(DEV), dl, scale=0.07, backend=backend, **gkw)
            ro, rl = latent_decode_ref(q.double(), kv.double(), lens, dl, scale=0.07, **kw)
            assert rel(o, ro) < 1e-5, (backend, dtype, B, H, list(kw), rel(o, ro))
            assert (lse.double().cpu() - rl).abs().max() < 1e-4


def _selection_mass(p_chunks, idx, chunk):
    """Summed reference chunk score of the chunks an index list covers (ties make index lists differ
    while the selected mass is the same)."""
    sel = idx[idx >= 0].long() // chunk
    return float(p_chunks[sel.unique()].sum())


@pytest.mark.parametrize("agg", ["max", "mean", "sum", "shared"])
@pytest.mark.parametrize("chunk", [1, 16])
def test_select_topk_triton(agg, chunk):
    """Token selection (the ``triton`` / ``cuda`` backends share the Triton chunk-score kernel): the same
    positions as the reference, or, where float rounding reorders near-ties, the same selected mass."""
    g = gen(5)
    B, H, Hkv, D, T, budget = 2, 32, 8, 128, 3000, 512
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    idx, cnt = select_topk(q.to(DEV), k.to(DEV), [T, T], budget, agg=agg, chunk=chunk, sink=64, recent=128, backend="triton")
    ref = select_topk_ref(q.double(), k.double(), T, budget, agg=agg, chunk=chunk, sink=64, recent=128)
    idx = idx.cpu()
    assert idx.shape[-1] >= ref.shape[-1]
    assert torch.equal(cnt.cpu(), (ref >= 0).sum(-1).int())
    if torch.equal(idx[..., : ref.shape[-1]].long(), ref):
        return
    p = aggregate_ref(group_probs_ref(q.double(), k.double(), T), Hkv, agg)
    n_chunks = (T + chunk - 1) // chunk
    pc = torch.nn.functional.pad(p, (0, n_chunks * chunk - T)).view(B, p.shape[1], n_chunks, chunk).sum(-1)
    for b in range(B):
        for h in range(p.shape[1]):
            a, r = _selection_mass(pc[b, h], idx[b, h], chunk), _selection_mass(pc[b, h], ref[b, h], chunk)
            assert abs(a - r) <= 1e-6 * max(1.0, r), (agg, chunk, b, h, a, r)


@pytest.mark.parametrize("agg", [0, 1, 2, 3])
def test_cuda_chunk_scores_kernel(agg):
    """The CUDA chunk-score kernel (probabilities from a given lse, aggregated over a KV head's query heads
    or over all heads, summed per chunk) against the float64 reference."""
    _need("cuda")
    g = gen(6)
    B, H, Hkv, D, T, chunk = 2, 12, 4, 64, 777, 16
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    scale = 1 / math.sqrt(D)
    _, lse = decode_attention_ref(q.double(), k.double(), k.double(), torch.full((B, Hkv), T, dtype=torch.int32),
                                  scale=scale, return_lse=True)
    out = _ext.cuda_ext().chunk_scores(q.to(DEV), k.to(DEV), lse.float().to(DEV), torch.full((B,), T, dtype=torch.int32,
                                       device=DEV), agg, chunk, scale)
    name = ["max", "mean", "sum", "shared"][agg]
    p = aggregate_ref(group_probs_ref(q.double(), k.double(), T, scale), Hkv, name)
    n_chunks = (T + chunk - 1) // chunk
    pc = torch.nn.functional.pad(p, (0, n_chunks * chunk - T)).view(B, p.shape[1], n_chunks, chunk).sum(-1)
    assert out.shape == pc.shape
    assert rel(out, pc) < 1e-5, (agg, rel(out, pc))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sparse_prefill(backend, dtype):
    """Per-head sink + window block patterns (MoA / DuoAttention streaming heads), chunked prefill (Tq < Tk).
    The Triton kernel's ``tl.dot`` runs in tf32 for fp32 inputs, hence its looser bound."""
    _need(backend)
    g = gen(7)
    for (H, Hkv, D, Tq, Tk) in ((8, 2, 64, 300, 420), (4, 4, 128, 256, 256), (6, 2, 40, 100, 150)):
        q = torch.randn(1, H, Tq, D, generator=g)
        k = torch.randn(1, Hkv, Tk, D, generator=g).to(dtype)
        v = torch.randn(1, Hkv, Tk, D, generator=g).to(dtype)
        sink = [64 * (h % 2) for h in range(H)]
        window = [64 * (1 + h % 3) for h in range(H)]
        blocks, counts = sink_window_blocks(H, Tq, Tk, sink=sink, window=window)
        out = block_sparse_prefill(q.to(DEV), k.to(DEV), v.to(DEV), blocks.to(DEV), counts.to(DEV), backend=backend)
        ref = block_sparse_prefill_ref(q.double(), k.double(), v.double(), blocks, counts)
        tol = 1e-5 if backend == "cuda" else 2e-3
        assert rel(out, ref) < tol, (backend, dtype, H, D, rel(out, ref))


# -- the patched model on a CUDA device ---------------------------------------------------------------------
def _model(dtype=torch.float32, layers=4):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=8,
                        num_key_value_heads=2, num_hidden_layers=layers, max_position_embeddings=1024, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    return T.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(DEV).eval()


def _gen(m, ids, policy=None, mask=None, new=16, **kw):
    args = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                return_dict_in_generate=True, output_scores=True)
    if policy is None:
        return m.generate(ids, **args)
    with accel.patch(m, policy, **kw):
        return m.generate(ids, **args)


def _close(a, b, tol=1e-4):
    """Same tokens, and logits within ``tol`` (min_new_tokens sets the EOS logit to -inf in both)."""
    if not torch.equal(a.sequences, b.sequences):
        return False
    return max(float((x - y)[torch.isfinite(y)].abs().max()) for x, y in zip(a.scores, b.scores)) <= tol


def _kw(kw):
    return {k: (hand_plan() if v == "hand" else v) for k, v in kw.items()}  # 4 layers, 2 KV heads, as _model


FULL = [("dense", {}), ("hylra", {"plan": "hand", "topk_ratio": 1.0}), ("streaming", {"budget_ratio": 1.0}), ("snapkv", {"budget_ratio": 1.0}),
        ("pyramidkv", {"budget_ratio": 1.0}), ("h2o", {"budget_ratio": 1.0}), ("recycled", {"topk_ratio": 1.0}),
        ("delta", {"full_layers": [0], "delta_layers": [1], "topk_ratio": 1.0})]


@pytest.mark.parametrize("policy,kw", FULL)
def test_patched_generation_on_cuda_equals_unpatched_when_budget_covers(policy, kw):
    """Every policy whose budget covers the context gives the unpatched model's greedy tokens and logits on the
    GPU too (the default backend there: ``cuda`` if built, else ``triton``), batch 1 and a left-padded batch."""
    m = _model()
    g = gen(8)
    ids = torch.randint(3, 256, (1, 200), generator=g).to(DEV)
    kw = _kw(kw)
    assert _close(_gen(m, ids, policy, **kw), _gen(m, ids))
    if policy in ("dense", "streaming", "snapkv", "h2o", "recycled"):
        ids = torch.randint(3, 256, (3, 120), generator=g)
        mask = torch.ones_like(ids)
        for b, p in enumerate((0, 9, 31)):
            ids[b, :p] = 0
            mask[b, :p] = 0
        ids, mask = ids.to(DEV), mask.to(DEV)
        assert _close(_gen(m, ids, policy, mask=mask, **kw), _gen(m, ids, mask=mask))


SMALL = [("hylra", {"plan": "hand", "topk_ratio": 0.25}), ("streaming", {"budget_ratio": 0.25}), ("snapkv", {"budget_ratio": 0.25}), ("pyramidkv", {"budget_ratio": 0.25}),
         ("h2o", {"budget_ratio": 0.25}), ("recycled", {"topk_ratio": 0.25}),
         ("delta", {"full_layers": [0], "delta_layers": [1], "topk_ratio": 0.25})]


@pytest.mark.parametrize("policy,kw", SMALL)
def test_lossy_policies_generate_on_cuda_in_bf16(policy, kw):
    """A quarter budget on a bf16 model on the GPU, batch 2: generation runs to the requested length with
    real vocabulary ids, and the first token's logits (computed by the dense prefill, before any eviction or
    selection acts) match dense in bf16 precision."""
    m = _model(torch.bfloat16)
    ids = torch.randint(3, 256, (2, 400), generator=gen(9)).to(DEV)
    ref = _gen(m, ids, "dense", new=24)
    out = _gen(m, ids, policy, new=24, **_kw(kw))
    assert out.sequences.shape == ref.sequences.shape == (2, 424)
    assert ((out.sequences >= 0) & (out.sequences < 256)).all()
    assert not any(torch.isnan(s).any() for s in out.scores)
    fin = torch.isfinite(ref.scores[0])
    assert rel(out.scores[0][fin], ref.scores[0][fin]) < 2e-2, (policy, rel(out.scores[0], ref.scores[0]))


def test_remove_restores_the_model_on_cuda():
    m = _model()
    ids = torch.randint(3, 256, (1, 64), generator=gen(10)).to(DEV)
    with torch.no_grad():
        ref = m(ids).logits
    before = {n: p.detach().clone() for n, p in m.state_dict().items()}
    h = accel.patch(m, "h2o", budget_ratio=0.5)
    m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    h.remove()
    assert all(torch.equal(before[n], p) for n, p in m.state_dict().items())
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref)
