"""The plan schema: what a policy does in each layer and head, as versioned JSON (``Plan``), and the plans shipped
inside the package for known checkpoints. Everything that reads or writes plans imports this package; it imports
nothing of accel's but its errors."""
from .schema import SCHEMA_VERSION, HeadPlan, LayerPlan, Plan

__all__ = ["Plan", "LayerPlan", "HeadPlan", "SCHEMA_VERSION"]
