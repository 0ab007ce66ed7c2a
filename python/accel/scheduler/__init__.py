"""The scheduler's parts: the decode cost model measured on the machine it runs on (``cost``, ``measure``)."""
from .cost import COST_SCHEMA_VERSION, KINDS, CostModel, LayerWork, StepWork, cost_model_for

__all__ = ["COST_SCHEMA_VERSION", "KINDS", "CostModel", "LayerWork", "StepWork", "cost_model_for"]
