"""SGL: a small VLM guides a large one (Zhao et al., "A Stitch in Time Saves Nine: Small VLM is a Precise Guidance
for Accelerating Large VLMs", CVPR 2025).

* **SGP** (small-VLM-guided pruning): the small VLM of the same family (the ``guide``) answers the prompt first. The
  attention its text tokens and its generated tokens pay to every visual token, summed over all its layers, heads
  and generated tokens, ranks the visual tokens; the large VLM keeps the top ``keep`` (or ``keep_ratio``) of each
  image from decoder layer ``layer`` on (its first ``layer`` layers see every token, as the paper prunes after a few
  early layers; ``layer=0`` prunes before the language model, as accel's other visual policies do).
* **SEE** (small-VLM early exiting): under ``generate()``, a row whose guide answer scores at least
  ``exit_threshold`` (the lowest, or mean, probability the guide gave its own answer tokens, ``exit_score``) takes
  the guide's answer and the large model never runs for it. ``exit_threshold=None`` (default) never exits.

The guide and the large model must read the same prompt: the same image placeholder token and count (the same image
processor) and the same tokenizer; accel checks the first two and refuses a mismatch in one line. The guide's run, its
attention recorder and the ``generate()`` wrapper live in ``accel.vlm.guide``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import AccelError
from .registry import register_policy
from .visual import VisualPolicy, keep_top_per_image


@register_policy("sgl")
@dataclass
class SGLPolicy(VisualPolicy):
    """SGL (CVPR 2025): the ``guide`` (a small VLM of the same family) ranks the visual tokens by the attention its
    text and answer tokens pay them; the large model keeps the top ones from decoder layer ``layer`` on (SGP) and,
    under ``generate()``, rows whose guide answer scores at least ``exit_threshold`` take the guide's answer (SEE).

    Options: ``guide`` (the small VLM, required), ``keep`` / ``keep_ratio`` (per image), ``layer`` (0: before the
    language model), ``guide_tokens`` (the guide's answer length; None: generate's ``max_new_tokens``, 1 on a plain
    forward), ``exit_threshold`` (None: never exit), ``exit_score`` (``min`` or ``mean`` of the answer tokens'
    probabilities)."""

    method: ClassVar[str] = "none"
    #: the VLM patcher checks the guide against the model and wraps ``generate()`` for this policy (``accel.vlm.guide``)
    guided: ClassVar[bool] = True
    guide: object = field(default=None, repr=False)
    layer: int = 2
    guide_tokens: int | None = None
    exit_threshold: float | None = None
    exit_score: str = "min"

    def validate(self) -> None:
        super().validate()
        if self.guide is None or not isinstance(self.guide, torch.nn.Module):
            raise AccelError("sgl: pass the small guide VLM as guide=<model> (accel.patch(large, 'sgl', guide=small))")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise AccelError(f"sgl: layer must be an integer >= 0 (the large model's decoder layer pruning starts at), "
                             f"got {self.layer!r}")
        if self.guide_tokens is not None and (not isinstance(self.guide_tokens, int) or isinstance(self.guide_tokens, bool)
                                              or self.guide_tokens < 1):
            raise AccelError(f"sgl: guide_tokens must be an integer >= 1 or None, got {self.guide_tokens!r}")
        if self.exit_score not in ("min", "mean"):
            raise AccelError(f"sgl: exit_score must be 'min' or 'mean', got {self.exit_score!r}")
        t = self.exit_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t != t):
            raise AccelError(f"sgl: exit_threshold must be a number or None, got {t!r}")

    @property
    def prune_layer(self) -> int:
        return int(self.layer)

    def encode(self, runtime, pixel_values, kw) -> dict:
        runtime.check_guide_tokens(pixel_values, kw)
        feats, fixed = runtime.adapter.full_features(pixel_values, kw)
        # the images, per image so that generate's batch expansion repeats them with their rows
        return {"feats": feats, "flags": None, "fixed": fixed, "trace": {}, "images": list(pixel_values)}

    def language_model_stage(self, runtime, module, ids, img, feats, flags, enc, mask, pos):
        """Rank every image's tokens by the guide's attention and keep the top ``keep`` per image."""
        pv = torch.stack(enc["images"]).to(ids.device)
        run = runtime.take_guide_run(ids, mask, pv)
        if run is None:
            run = runtime.run_guide(ids, pv, mask, self.guide_tokens or 1)
        runtime.last_guide = run
        return keep_top_per_image(self, run.received.to(ids.device)[img], feats, enc["fixed"])
