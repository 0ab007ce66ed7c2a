from .accel_cache import AccelCache, AccelLayer

__all__ = ["AccelCache", "AccelLayer"]
