"""Architecture adapters: where a model's decoder layers and attention modules are, and what is
special about it. One file per architecture; ``registry.py`` maps ``config.model_type`` to them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UnsupportedModelError


@dataclass
class ModelInfo:
    """What a policy may need to know about the model (filled by the architecture adapter)."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int | None
    sliding_windows: list[int | None]
    #: identifies the checkpoint's architecture and size (shipped plans are matched on it)
    fingerprint: str = ""


def last_logits_only(model: torch.nn.Module) -> dict:
    """Forward kwargs for a prefill whose logits are not used past the last position (the evaluation harness's
    shared prefill, the calibration profilers): ``logits_to_keep=1`` where the model's forward takes it. The LM
    head over every position is ~10% of SmolLM2's prefill FLOPs at 8K (0.46 of ~4.5 TFLOP, counted, not timed) and a
    [T, vocab] fp32 tensor (1.6 GB at 8K)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@dataclass(frozen=True)
class FusedLayout:
    """How an architecture's decoder layer maps onto accel's fused decode layer (``accel.patching.fused``):
    RMSNorm -> q/k/v projections -> [per-head q/k RMSNorm] -> rotary -> attention -> o projection + residual ->
    RMSNorm -> SiLU-gated MLP + residual."""

    #: "separate" (q_proj, k_proj, v_proj) or "packed" (one qkv_proj, rows q | k | v)
    qkv: str = "separate"
    #: "separate" (gate_proj, up_proj) or "packed" (one gate_up_proj, rows gate | up)
    mlp: str = "separate"
    #: per-head RMSNorm of q and k before the rotary embedding (q_norm / k_norm, Qwen3)
    qk_norm: bool = False


class ModelAdapter:
    model_types: ClassVar[tuple[str, ...]] = ()
    #: the decoder layer's shape for accel's fused decode layer; None: decode runs transformers' modules
    fused_layout: ClassVar[FusedLayout | None] = None
    #: attribute of the attention module that must exist (checks we are looking at the expected code)
    required_attention_attrs: ClassVar[tuple[str, ...]] = ("layer_idx",)
    notes: ClassVar[str] = ""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self.check()

    # -- structure --------------------------------------------------------------------------------
    def decoder(self) -> torch.nn.Module:
        """The module that owns ``layers`` (``model.model`` for *ForCausalLM)."""
        m = self.model
        for path in ("model", "model.language_model", "language_model"):
            cur = m
            ok = True
            for part in path.split("."):
                cur = getattr(cur, part, None)
                if cur is None:
                    ok = False
                    break
            if ok and hasattr(cur, "layers"):
                return cur
        if hasattr(m, "layers"):
            return m
        raise UnsupportedModelError(f"{type(m).__name__}: could not find the decoder layers")

    def layers(self) -> list[torch.nn.Module]:
        return list(self.decoder().layers)

    def attention_modules(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self.layers()]

    def output_projection(self, layer_idx: int) -> torch.Tensor | None:
        """The attention output projection weight [hidden, H * head_dim] of a layer (Task-KV maps each
        head's output into the hidden space with its slice), or None if the architecture has none."""
        o = getattr(self.attention_modules()[layer_idx], "o_proj", None)
        return getattr(o, "weight", None)

    def check(self) -> None:
        attns = self.attention_modules()
        if not attns:
            raise UnsupportedModelError(f"{type(self.model).__name__} has no decoder layers")
        for a in attns:
            for attr in self.required_attention_attrs:
                if not hasattr(a, attr):
                    raise UnsupportedModelError(
                        f"{type(a).__name__} lacks `{attr}`: this transformers version's {self.model_types[0]} "
                        "code differs from what accel's adapter expects"
                    )

    # -- facts ------------------------------------------------------------------------------------
    def sliding_windows(self) -> list[int | None]:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(self.config)
        return [kw.get("sliding_window") if t != "full_attention" else None for t, kw in zip(types, kwargs)]

    def info(self) -> ModelInfo:
        c = self.config
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return ModelInfo(
            model_type=c.model_type,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            max_context=getattr(c, "max_position_embeddings", None),
            sliding_windows=self.sliding_windows(),
            fingerprint=(f"{c.model_type}-L{c.num_hidden_layers}-H{heads}-KV{kv}-D{head_dim}-d{c.hidden_size}"
                         f"-V{c.vocab_size}"),
        )
