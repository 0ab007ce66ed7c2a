"""Output error of TPLA against exact MLA on latents with the structure of real activations (the error table
of ``bench/bench_tpla.py error``). No MLA weights install here, so the data is synthetic: latents of
low rank plus noise with a few outlier channels (the shape of real MLA latents), random up-projections, and
queries either random or *aligned* (the absorbed query of a latent drawn from the same sequence, so heads
attend to similar tokens as trained models' heads do)."""
from __future__ import annotations

import torch

from ..tpla.mla import fold_weights, mla_reference, shard_rows, tpla_decode
from ..tpla.transforms import build_transform

TRANSFORM_VARIANTS = (("identity", "contiguous"), ("hadamard", "contiguous"), ("pca", "interleaved"),
                      ("pca", "contiguous"))


def structured_latents(n: int, dc: int, rank: int = 8, outliers: int = 4, noise: float = 0.1, seed: int = 0):
    """``[n, dc]`` raw latents: rank-``rank`` signal + ``noise`` + ``outliers`` channels scaled 8x (fixed)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dc, generator=g)
    x = torch.randn(n, rank, generator=g) @ basis + noise * torch.randn(n, dc, generator=g)
    x[:, torch.randperm(dc, generator=torch.Generator().manual_seed(77))[:outliers]] *= 8.0
    return x


def _normalise(x):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


def error_grid(*, shards=(2, 4), query_modes=("random", "aligned"), query_scales=(1.0, 3.0), logit_scales=("1", "g"),
               seeds: int = 4, B: int = 2, H: int = 8, dn: int = 32, dr: int = 16, dc: int = 128, T: int = 256):
    """Mean relative output error ``||o_TPLA - o_MLA|| / ||o_MLA||`` (per-head outputs before ``o_proj``) for
    every transform variant. ``logit_scales``: "1" (the paper's independent softmax) and/or "g"
    (``shard_logit_scale = g``). Returns a list of dict rows."""
    rows = []
    cov = None
    calib = _normalise(structured_latents(4000, dc, seed=99))
    cov = (calib.T @ calib / calib.shape[0]).double()
    for g in shards:
        for qmode in query_modes:
            for qs in query_scales:
                for ls in logit_scales:
                    sls = 1.0 if ls == "1" else float(g)
                    for kind, asg in TRANSFORM_VARIANTS:
                        u = build_transform(kind, dc, g, cov, asg)
                        errs = []
                        for s in range(seeds):
                            gw = torch.Generator().manual_seed(s)
                            w_uk = torch.randn(H, dn, dc, generator=gw) / dc ** 0.5
                            w_uv = torch.randn(H, 16, dc, generator=gw) / dc ** 0.5
                            n = _normalise(structured_latents(B * T, dc, seed=s + 1)).view(B, T, dc)
                            lat = n if u is None else n @ u.float().T
                            uk, uv = fold_weights(w_uk, w_uv, torch.ones(dc), u)
                            gq = torch.Generator().manual_seed(100 + s)
                            if qmode == "random":
                                qn = qs * torch.randn(B, H, dn, generator=gq)
                            else:
                                tgt = n[:, torch.randint(0, T, (H,), generator=gq)]
                                qn = qs * torch.einsum("bhc,hnc->bhn", tgt, w_uk) * dc ** 0.5 / dn ** 0.5
                            qr, kr = torch.randn(B, H, dr, generator=gq), torch.randn(B, T, dr, generator=gq)
                            sc = (dn + dr) ** -0.5
                            ref = mla_reference(qn[:, :, None], qr[:, :, None], lat, kr, uk, uv, scale=sc,
                                                mask=torch.ones(1, 1, 1, T, dtype=torch.bool))[:, :, 0]
                            got = tpla_decode(qn, qr, shard_rows(lat, kr, g, "replicate"), uk, uv, scale=sc,
                                              shard_logit_scale=sls)
                            errs.append(float((got - ref).norm() / ref.norm()))
                        name = kind if kind != "pca" else f"pca-{asg}"
                        rows.append({"shards": g, "queries": qmode, "query_scale": qs, "shard_logit_scale": ls,
                                     "transform": name, "rel_error": sum(errs) / len(errs)})
    return rows
