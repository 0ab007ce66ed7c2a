"""The one adapter-table helper of accel's three model families (language models, VLMs, MLA models): a map from
``config.model_type`` to an adapter class named ``"module:Class"``, imported on first use (one file per
architecture), with the family's own one-line refusal for a model it does not serve."""
from __future__ import annotations

import importlib
from typing import Callable

from .errors import UnsupportedModelError


def config_model_type(model) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


class AdapterTable:
    def __init__(self, entries: dict[str, str], refusal: Callable[[object, str | None, str], str],
                 model_type: Callable[[object], str | None] = config_model_type):
        self.entries = dict(entries)
        self._refusal = refusal
        self._model_type = model_type

    def types(self) -> list[str]:
        return sorted(self.entries)

    def get(self, model):
        """An adapter instance for ``model``, or ``UnsupportedModelError`` naming the supported types."""
        mt = self._model_type(model)
        if mt not in self.entries:
            raise UnsupportedModelError(self._refusal(model, mt, ", ".join(self.types())))
        mod, cls = self.entries[mt].split(":")
        return getattr(importlib.import_module(mod), cls)(model)
