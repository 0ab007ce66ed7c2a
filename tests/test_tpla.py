"""TPLA on tiny random DeepSeek-V2/V3 models built from configs (no MLA weights install here).

Invariants of methods.md 3.7: one shard equals MLA exactly; any transform with exact reduce equals MLA; the
exact special cases (one cached token, identical keys, rope-only queries) are exact; Hadamard/PCA err less
than identity slicing on structured latents; each shard holds dc/g latent channels plus the rotary key.
"""
import copy
import math

import pytest
import torch

import accel
from accel.errors import AccelError, UnsupportedModelError
from accel.ops.latent import latent_decode, latent_decode_ref
from accel.tpla.mla import shard_rows, tpla_decode
from accel.tpla.transforms import build_transform, hadamard, pca_basis, shard_order

from .conftest import decode_logits, tiny_mla
from .conftest import mla_prompt as prompt


@pytest.mark.exactness
@pytest.mark.parametrize("version,q_lora", [(3, 48), (2, None)])
@pytest.mark.parametrize("transform", ["identity", "hadamard"])
def test_one_shard_and_exact_reduce_equal_mla(version, q_lora, transform):
    m = tiny_mla(version, q_lora)
    ids, mask = prompt(pad=3)
    ref = decode_logits(m, ids, mask)
    with torch.no_grad():
        gref = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for kw in ({"shards": 1}, {"shards": 2, "reduce": "logits"}, {"shards": 4, "reduce": "logits"}):
        with accel.patch(m, "tpla", transform=transform, **kw):
            got = decode_logits(m, ids, mask)
            with torch.no_grad():
                g = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert (got - ref).abs().max() < 1e-5, (kw, float((got - ref).abs().max()))
        assert torch.equal(g, gref), kw


def test_tpla_differs_from_mla_only_in_decode_and_pca_with_exact_reduce_is_exact():
    m = tiny_mla(3)
    ids, mask = prompt(batch=2, n=40)
    ref = decode_logits(m, ids, mask)
    with accel.patch(m, "tpla", shards=2, transform="identity"):
        got = decode_logits(m, ids, mask)
    assert (got[:, 0] - ref[:, 0]).abs().max() < 1e-5  # prefill is exact MLA
    assert (got[:, 1:] - ref[:, 1:]).abs().max() > 1e-4  # decode is TPLA, not MLA
    calib = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(5))
    with accel.patch(m, "tpla", shards=2, transform="pca", calibration=calib, reduce="logits"):
        got = decode_logits(m, ids, mask)
    assert (got - ref).abs().max() < 1e-5
    # per-shard RMSNorm of decode tokens applies to TPLA layers only: exact-reduce layers stay exact
    with accel.patch(m, "tpla", shards=2, norm_mode="per_shard", reduce="logits"):
        got = decode_logits(m, ids, mask)
    assert (got - ref).abs().max() < 1e-5
    with accel.patch(m, "tpla", shards=2, norm_mode="per_shard"):
        got = decode_logits(m, ids, mask)
    assert (got[:, 1:] - ref[:, 1:]).abs().max() > 1e-4
    # exact layers in the plan: all layers mla_exact == MLA; the handle reports them
    with accel.patch(m, "tpla", shards=2, exact_layers=[0, 1, 2]) as h:
        got = decode_logits(m, ids, mask)
        assert [lp.mode for lp in h.plan.layers] == ["mla_exact"] * 3
    assert (got - ref).abs().max() < 1e-5


def _weights(H=4, dn=16, dv=16, dc=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, dn, dc, generator=g) / dc ** 0.5, torch.randn(H, dv, dc, generator=g) / dc ** 0.5


def _mla_decode(q_nope, q_rope, lat, kr, w_uk, w_uv, scale):

    return accel.tpla.mla_reference(q_nope[:, :, None], q_rope[:, :, None], lat, kr, w_uk, w_uv, scale=scale,
                                    mask=torch.ones(1, 1, 1, lat.shape[1], dtype=torch.bool))[:, :, 0]


@pytest.mark.parametrize("rope_mode", ["replicate", "split"])
def test_exact_special_cases_of_the_spec(rope_mode):
    g = torch.Generator().manual_seed(3)
    B, H, dn, dr, dc, T = 2, 4, 16, 8, 32, 9
    w_uk, w_uv = _weights(H, dn, 16, dc)
    q_nope, q_rope = torch.randn(B, H, dn, generator=g), torch.randn(B, H, dr, generator=g)
    lat, kr = torch.randn(B, T, dc, generator=g), torch.randn(B, T, dr, generator=g)
    scale = 1 / math.sqrt(dn + dr)

    def both(qn, qr, la, k):
        rows = shard_rows(la, k, 4, rope_mode)
        return (tpla_decode(qn, qr, rows, w_uk, w_uv, scale=scale, rope_mode=rope_mode),
                _mla_decode(qn, qr, la, k, w_uk, w_uv, scale))

    a, b = both(q_nope, q_rope, lat[:, :1], kr[:, :1])  # (a) one cached token
    assert (a - b).abs().max() < 1e-5
    a, b = both(q_nope, q_rope, lat[:, :1].expand(B, T, dc), kr[:, :1].expand(B, T, dr))  # (b) identical keys
    assert (a - b).abs().max() < 1e-5
    if rope_mode == "replicate":  # (c) zero latent query: every shard sees the same (rope) logits
        a, b = both(torch.zeros_like(q_nope), q_rope, lat, kr)
        assert (a - b).abs().max() < 1e-5
    a, b = both(q_nope, q_rope, lat, kr)  # the general case is not exact
    assert (a - b).abs().max() > 1e-3


def test_hadamard_and_pca_err_less_than_identity_on_structured_latents():
    """methods.md 3.7 (5), on averages: latents with the structure of real activations (low rank plus a few
    outlier channels) and queries that attend to latent-similar tokens, as trained models' do (with purely
    random queries identity slicing wins; bench/bench_tpla.py reports both)."""
    from accel.research.tpla_errors import error_grid

    rows = error_grid(shards=(2,), query_modes=("aligned",), query_scales=(3.0,), logit_scales=("1",), seeds=4)
    err = {r["transform"]: r["rel_error"] for r in rows}
    assert err["hadamard"] < err["identity"] and err["pca-contiguous"] < err["identity"], err


def test_transforms_are_orthogonal_and_shard_order():
    h = hadamard(16)
    assert torch.allclose(h @ h.T, torch.eye(16, dtype=h.dtype), atol=1e-12)
    with pytest.raises(AccelError, match="power of two"):
        hadamard(24)
    a = torch.randn(12, 12, dtype=torch.float64)
    cov = a @ a.T
    basis, ev = pca_basis(cov)
    assert torch.allclose(basis @ basis.T, torch.eye(12, dtype=torch.float64), atol=1e-10)
    assert bool((ev[:-1] >= ev[1:]).all())
    assert shard_order(8, 2, "interleaved").tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert shard_order(8, 2, "contiguous").tolist() == list(range(8))
    u = build_transform("pca", 12, 3, cov, "interleaved")
    assert torch.allclose(u, basis[[0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]])


def test_per_shard_cache_holds_dc_over_g_plus_rope_and_remove_restores():
    m = tiny_mla(3, dc=32)
    ids, mask = prompt(batch=2, n=20)
    ref_state = copy.deepcopy(m.state_dict())
    attn0 = [layer.self_attn for layer in m.model.layers]
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    for g, rope_mode, width in ((2, "replicate", 16 + 8), (4, "replicate", 8 + 8), (4, "split", 8 + 2)):
        with accel.patch(m, "tpla", shards=g, rope_mode=rope_mode) as h, torch.no_grad():
            m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            layer = h.cache.layers[0]
            assert layer.k_buf.shape[1] == g and layer.k_buf.shape[3] == width
            per = h.shard_nbytes()
            assert len(per) == g and len(set(per)) == 1
            assert per[0] == 3 * 2 * 23 * width * 4  # layers x batch x cached tokens (20 + 3 fed back) x channels x fp32
    assert all(layer.self_attn is a for layer, a in zip(m.model.layers, attn0))
    assert all(torch.equal(v, ref_state[k]) for k, v in m.state_dict().items())
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref)


def test_tpla_errors_name_the_problem():
    m = tiny_mla(3, dc=32)
    with pytest.raises(AccelError, match="split evenly"):
        accel.patch(m, "tpla", shards=3)
    with pytest.raises(AccelError, match="calibration"):
        accel.patch(m, "tpla", transform="pca")
    with pytest.raises(AccelError, match="transform"):
        accel.patch(m, "tpla", transform="fourier")
    with pytest.raises(AccelError, match="does not compose"):
        accel.patch(m, "tpla+snapkv")
    with pytest.raises(AccelError, match="exact_layers"):
        accel.patch(m, "tpla", exact_layers=[7])
    with accel.patch(m, "tpla"):
        with pytest.raises(AccelError, match="already patched"):
            accel.patch(m, "tpla")
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="MLA"):
        accel.patch(llama, "tpla")


def test_pca_calibration_covariance_and_save_load(tmp_path):
    from accel.tpla import calibrate_pca, load_pca, save_pca

    m = tiny_mla(2, None)
    ids = torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(2))
    covs = calibrate_pca(m, ids, batch_size=2)
    assert sorted(covs) == [0, 1, 2]
    got = {}
    hk = m.model.layers[1].self_attn.kv_a_layernorm.register_forward_pre_hook(
        lambda mod, a: got.setdefault("x", []).append(a[0].detach()))
    with torch.no_grad():
        m(input_ids=ids)
    hk.remove()
    x = torch.cat(got["x"]).reshape(-1, 32).double()
    n = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(covs[1], n.T @ n / n.shape[0], atol=1e-8)
    save_pca(tmp_path / "pca.safetensors", covs)
    back = load_pca(tmp_path / "pca.safetensors")
    assert all(torch.equal(back[i], covs[i]) for i in covs)


def test_plan_round_trip_with_exact_layers(tmp_path):
    from accel.plan import Plan

    m = tiny_mla(3)
    ids, mask = prompt(n=20)
    with accel.patch(m, "tpla", shards=2, exact_layers=[1]) as h:
        h.plan.save(tmp_path / "tpla.json")
        a = decode_logits(m, ids, mask)
    plan = Plan.load(tmp_path / "tpla.json")
    assert [lp.mode for lp in plan.layers] == ["tpla", "mla_exact", "tpla"] and plan.params["shards"] == 2
    with accel.patch(m, "tpla", plan=tmp_path / "tpla.json") as h:
        b = decode_logits(m, ids, mask)
        assert [mod.mode for mod in h.modules] == ["tpla", "mla_exact", "tpla"]
    assert torch.equal(a, b)
    bad = plan.to_dict()
    bad["layers"][0]["mode"] = "reuse_everything"
    with pytest.raises(AccelError, match=r"layers\[0\]\.mode"):
        accel.patch(m, "tpla", plan=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_latent_kernel_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    for B, H, dl, dr, T in ((2, 5, 24, 8, 37), (1, 16, 64, 16, 300), (3, 1, 16, 0, 5)):
        q = torch.randn(B, H, dl + dr, generator=g)
        kv = torch.randn(B, T, dl + dr, generator=g).to(dtype)
        ln = torch.randint(0, T + 1, (B,), generator=g, dtype=torch.int32)
        ln[0] = T
        valid = torch.rand(B, T, generator=g) > 0.2
        idx = torch.stack([torch.randperm(T, generator=g)[: T // 2] for _ in range(B)]).int()
        for kw, lens in (({}, ln), ({"valid": valid}, ln), ({"indices": idx}, ln.clamp(max=T // 2))):
            o, lse = latent_decode(q, kv, lens, dl, scale=0.1, backend="cpp", **kw)
            ro, rl = latent_decode_ref(q, kv, lens, dl, scale=0.1, **kw)
            fin = torch.isfinite(rl)
            assert torch.equal(fin, torch.isfinite(lse))
            assert (o - ro).abs().max() < 1e-5 and (lse[fin] - rl[fin]).abs().max() < 1e-5
    # a strided view of a cache buffer (one shard of [B, g, cap, dk]) is read in place
    buf = torch.randn(2, 3, 50, 40, generator=g)
    q = torch.randn(2, 4, 40, generator=g)
    o, _ = latent_decode(q, buf[:, 1, :30], torch.tensor([30, 17], dtype=torch.int32), 32, backend="cpp")
    ro, _ = latent_decode_ref(q, buf[:, 1, :30], torch.tensor([30, 17]), 32, scale=40 ** -0.5)
    assert (o - ro).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="lengths"):
        latent_decode(q, buf[:, 1, :30], torch.tensor([31, 1], dtype=torch.int32), 32, backend="cpp")


@pytest.mark.exactness
def test_distributed_ranks_equal_simulated_shards():
    """Two gloo ranks under torchrun (tests/tpla_dist_worker.py): same logits and tokens as simulated shards,
    per-rank cache bytes = one shard's, MLP weights split 1/g, remove() restores the weights exactly."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(root / "tests" / "tpla_dist_worker.py")], capture_output=True, text=True, env=env,
                       timeout=600, cwd=root)
    assert "TPLA_DIST_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def test_cli_bench_and_generate_on_a_random_mla_model(tmp_path, capsys):
    import csv

    from accel.cli.main import main

    out = tmp_path / "mla.csv"
    assert main(["bench", "--model", "random-mla-tiny", "--policies", "hf,tpla@shards=1,tpla@shards=2",
                 "--contexts", "48", "--new-tokens", "2", "--synthetic-kv", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["policy"] for r in rows] == ["hf", "tpla@shards=1", "tpla@shards=2"]
    kv = {r["policy"]: int(r["kv_bytes_per_rank"]) for r in rows}
    # layers x tokens (48 + warm-up + 2 timed steps) x channels x fp32: MLA holds dc + dr per token, each of
    # 2 shards dc/2 + dr
    assert kv["tpla@shards=1"] == 3 * 51 * (32 + 8) * 4 and kv["tpla@shards=2"] == 3 * 51 * 2 * (16 + 8) * 4
    assert main(["generate", "--model", "random-mla-tiny", "--policy", "tpla", "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", "random-mla-tiny", "--policy", "tpla", "--tp", "2", "--prompt", "hi"]) == 2
    assert "torchrun --standalone --nproc-per-node 2 -m accel" in capsys.readouterr().err
    assert main(["generate", "--model", "random-mla-tiny", "--policy", "dense", "--tp", "2", "--prompt", "hi"]) == 2
    assert "use --policy/--policies tpla" in capsys.readouterr().err


def test_plan_tpla_marks_the_most_sensitive_layers_exact():
    from accel.tpla import plan_tpla

    m = tiny_mla(3)
    with torch.no_grad():  # sharper attention, more so in later layers, so TPLA's error is far above fp noise
        for i, layer in enumerate(m.model.layers):
            layer.self_attn.q_b_proj.weight.mul_(3.0 * (i + 1))
            layer.self_attn.kv_b_proj.weight.mul_(3.0)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(4))
    plan = plan_tpla(m, ids, shards=4, transform="identity", n_exact=1, steps=6)
    kl = [lp.params["kl"] for lp in plan.layers]
    assert min(kl) > 1e-6 and kl[2] > kl[0]
    worst = max(range(3), key=lambda i: kl[i])
    assert [lp.mode for lp in plan.layers] == ["mla_exact" if i == worst else "tpla" for i in range(3)]
    # the plan runs as is and reports what it was made from
    with accel.patch(m, "tpla", plan=plan) as h:
        assert [mod.mode for mod in h.modules] == [lp.mode for lp in plan.layers]
    assert plan.provenance["n_exact"] == 1
