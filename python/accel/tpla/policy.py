"""``policy="tpla"``: tensor-parallel latent attention for MLA models (Tang et al., arXiv 2508.15881; methods.md 3)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import AccelError
from ..policies.base import Policy
from ..policies.registry import register_policy
from .transforms import ASSIGNMENTS, TRANSFORMS


@register_policy("tpla")
@dataclass
class TPLAPolicy(Policy):
    """TPLA knobs (methods.md 3.8).

    Args:
        shards: number of latent shards ``g`` (TP degree); 1 = MLA exactly.
        transform: orthogonal transform before slicing: ``hadamard`` (default [INFER]), ``pca`` (needs
            calibration), ``identity``. Per layer in the plan.
        assignment: PCA components to shards, ``contiguous`` (default [INFER], it erred least in the error
            table) or ``interleaved``.
        reduce: ``outputs`` = TPLA (per-shard softmax, outputs summed); ``logits`` = exact reduce (partial
            logits summed before one softmax) = MLA, the oracle.
        rope_mode: ``replicate`` the rotary key on every shard (default [INFER]) or ``split`` its channels.
        norm_mode: ``full`` RMSNorm of the new token's latent (default) or ``per_shard`` (each shard's slice by
            its own RMS: no communication, approximate) [INFER].
        shard_logit_scale: multiplies every shard's logits (1.0 = independent softmax, the paper) [INFER].
        exact_layers: layers decoded in exact MLA (``mla_exact``) instead of TPLA: sensitive layers.
        backend: force a kernel backend (``cpp``/``triton``/``cuda``/``torch``); None = best available.
        execution: ``simulated`` (all shards in this process) or ``distributed`` (this process is one rank of an
            initialised ``torch.distributed`` group of ``shards`` ranks; see ``accel.tpla.distributed``).
        attn_weights: distributed only: ``replicate`` the query projection and ``o_proj`` on every rank (one
            all-reduce per decode layer, default [INFER]) or ``split`` them by heads (two more collectives).
    """

    kind: ClassVar[str] = "model"

    shards: int = 2
    transform: str = "hadamard"
    assignment: str = "contiguous"
    reduce: str = "outputs"
    rope_mode: str = "replicate"
    norm_mode: str = "full"
    shard_logit_scale: float = 1.0
    exact_layers: list = field(default_factory=list)
    backend: str | None = None
    execution: str = "simulated"
    attn_weights: str = "replicate"

    def validate(self) -> None:
        if not isinstance(self.shards, int) or isinstance(self.shards, bool) or self.shards < 1:
            raise AccelError(f"tpla: shards must be an integer >= 1 (the tensor-parallel degree), got {self.shards!r}")
        if self.transform not in TRANSFORMS:
            raise AccelError(f"tpla: transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.assignment not in ASSIGNMENTS:
            raise AccelError(f"tpla: assignment must be one of {ASSIGNMENTS}, got {self.assignment!r}")
        if self.reduce not in ("outputs", "logits"):
            raise AccelError(f"tpla: reduce must be 'outputs' (TPLA) or 'logits' (exact MLA), got {self.reduce!r}")
        if self.rope_mode not in ("replicate", "split"):
            raise AccelError(f"tpla: rope_mode must be 'replicate' or 'split', got {self.rope_mode!r}")
        if self.norm_mode not in ("full", "per_shard"):
            raise AccelError(f"tpla: norm_mode must be 'full' or 'per_shard', got {self.norm_mode!r}")
        if not isinstance(self.shard_logit_scale, (int, float)) or not self.shard_logit_scale > 0:
            raise AccelError(f"tpla: shard_logit_scale must be a positive number, got {self.shard_logit_scale!r}")
        if not isinstance(self.exact_layers, (list, tuple)) or not all(isinstance(i, int) for i in self.exact_layers):
            raise AccelError(f"tpla: exact_layers must be a list of layer indices, got {self.exact_layers!r}")
        if self.execution not in ("simulated", "distributed"):
            raise AccelError(f"tpla: execution must be 'simulated' or 'distributed', got {self.execution!r}")
        if self.attn_weights not in ("replicate", "split"):
            raise AccelError(f"tpla: attn_weights must be 'replicate' or 'split', got {self.attn_weights!r}")
        if self.backend not in (None, "cpp", "triton", "cuda", "torch"):
            raise AccelError(f"tpla: backend must be cpp, triton, cuda or torch, got {self.backend!r}")

    def build_plan(self, info):
        from ..plan import LayerPlan, Plan

        n = info["num_layers"]
        bad = [i for i in self.exact_layers if not 0 <= i < n]
        if bad:
            raise AccelError(f"tpla: exact_layers {bad} are not layers of this {n}-layer model")
        mode = "mla_exact" if self.reduce == "logits" else "tpla"
        layers = [LayerPlan(mode="mla_exact" if i in self.exact_layers else mode, attention="tpla",
                            params={"transform": self.transform}) for i in range(n)]
        return Plan(policy="tpla", num_layers=n, model_type=info["model_type"],
                    params={"shards": self.shards, "execution": self.execution, "attn_weights": self.attn_weights,
                            "assignment": self.assignment, "rope_mode": self.rope_mode,
                            "norm_mode": self.norm_mode, "shard_logit_scale": self.shard_logit_scale},
                    layers=layers)
