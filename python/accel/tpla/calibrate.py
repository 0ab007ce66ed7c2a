"""Calibration statistics for TPLA's PCA transform: the per-layer covariance ``E[n n^T]`` of the gain-free,
RMS-normalised MLA latent ``n`` (what accel stores before rotating), from a dense run over calibration tokens."""
from __future__ import annotations

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
