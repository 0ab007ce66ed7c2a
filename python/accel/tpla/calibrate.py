"""Calibration statistics for TPLA's PCA transform: the per-layer covariance ``E[n n^T]`` of the gain-free,
RMS-normalised MLA latent ``n`` (what accel stores before rotating), from a dense run over calibration tokens."""
from __future__ import annotations
from .. import compat

import torch

from .adapters import get_mla_adapter


def calibrate_pca(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  batch_size: int = 4) -> dict[int, torch.Tensor]:
    """Run the (unpatched) model over ``input_ids`` ``[N, T]`` and return ``{layer: cov [dc, dc] float64}``;
    padding positions (``attention_mask == 0``) are left out."""
    adapter = get_mla_adapter(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        from ..errors import AccelError

        raise AccelError("tpla calibration: input_ids must be a [N, T] tensor of token ids")
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    cur_mask = {}
    hooks = []
    for i in range(len(adapter.layers)):
        norm = adapter.attention(i).kv_a_layernorm
        eps = float(getattr(norm, "variance_epsilon", 1e-6))

        def hook(mod, args, i=i, eps=eps):
            x = args[0].double()
            n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            m = cur_mask.get("m")
            n = n.reshape(-1, n.shape[-1]) if m is None else n[m.bool()]
            sums[i] = sums.get(i, 0) + n.T @ n
            counts[i] = counts.get(i, 0) + n.shape[0]

        hooks.append(norm.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for s in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[s:s + batch_size]
                m = attention_mask[s:s + batch_size] if attention_mask is not None else None
                cur_mask["m"] = m
                model(input_ids=ids, attention_mask=m, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {i: sums[i] / max(counts[i], 1) for i in sums}


def save_pca(path, covs: dict[int, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({f"layer.{i}": c.contiguous() for i, c in covs.items()}, str(path))


def load_pca(path) -> dict[int, torch.Tensor]:
    from safetensors.torch import load_file

    return {int(k.split(".")[1]): v for k, v in load_file(str(path)).items()}


def _decode_logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Teacher-forced decode: prefill all but the last ``steps`` tokens, then feed them one at a time;
    the log-probabilities of every decode step ``[B, steps, V]``."""
    out = []
    with torch.no_grad():
        n = ids.shape[1] - steps
        o = model(input_ids=ids[:, :n], use_cache=True)
        pkv = compat.output_cache(o)
        for t in range(n, ids.shape[1]):
            o = model(input_ids=ids[:, t:t + 1], use_cache=True, **compat.cache_kwargs(model, pkv))
            out.append(torch.log_softmax(o.logits[:, -1].float(), -1))
    return torch.stack(out, 1)


def plan_tpla(model, input_ids: torch.Tensor, *, shards: int = 2, transform: str = "hadamard", n_exact: int = 0,
              steps: int = 16, pca: dict | None = None, **knobs):
    """The scheduler for TPLA: measures each layer's sensitivity and marks the ``n_exact`` most sensitive layers
    ``mla_exact`` (decoded with the exact reduce) [INFER: the paper applies TPLA to every layer; keeping a few
    layers exact is our extension, methods.md 3.8].

    Sensitivity of layer ``i`` = mean KL(exact || model with only layer ``i`` in TPLA) over the last ``steps``
    teacher-forced decode steps of ``input_ids`` ``[B, T]`` (every other layer uses the exact reduce, which
    equals MLA). Returns a ``Plan`` whose layers carry ``params = {"transform", "kl"}``.
    """
    from ..policies.registry import get_policy_class
    from .patch import patch_tpla

    n_layers = model.config.num_hidden_layers
    if not 0 <= n_exact <= n_layers:
        from ..errors import AccelError

        raise AccelError(f"tpla plan: n_exact must be in [0, {n_layers}], got {n_exact}")
    if transform == "pca" and pca is None:
        pca = calibrate_pca(model, input_ids)
    common = dict(shards=shards, transform=transform, **knobs)
    with patch_tpla(model, reduce="logits", pca=pca, **common):
        ref = _decode_logits(model, input_ids, steps)
    kls = []
    for i in range(n_layers):
        with patch_tpla(model, exact_layers=[j for j in range(n_layers) if j != i], pca=pca, **common):
            got = _decode_logits(model, input_ids, steps)
        kls.append(float((ref.exp() * (ref - got)).sum(-1).mean()))
    exact = sorted(range(n_layers), key=lambda i: -kls[i])[:n_exact]
    pol = get_policy_class("tpla").from_overrides(exact_layers=exact, **common)
    plan = pol.build_plan({"num_layers": n_layers, "model_type": model.config.model_type})
    for lp, kl in zip(plan.layers, kls):
        lp.params["kl"] = kl
    plan.provenance = {"method": "per-layer KL of TPLA vs exact reduce", "steps": steps,
                       "tokens": list(input_ids.shape), "n_exact": n_exact}
    return plan
