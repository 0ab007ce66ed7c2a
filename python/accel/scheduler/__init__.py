from .plan import SCHEMA_VERSION, HeadPlan, LayerPlan, Plan

__all__ = ["Plan", "LayerPlan", "HeadPlan", "SCHEMA_VERSION"]
