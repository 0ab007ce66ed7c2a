"""accel's exception types. Every error names the problem and the fix."""
from __future__ import annotations


class AccelError(ValueError):
    """Base class for user-facing accel errors (bad arguments, bad plans, bad inputs)."""


class UnknownPolicyError(AccelError):
    pass


class UnsupportedModelError(NotImplementedError):
    """The model's architecture has no accel adapter."""


class AlreadyPatchedError(AccelError):
    pass


class PlanValidationError(AccelError):
    pass


class InputError(AccelError):
    """A prompt or batch accel cannot process correctly (too long, empty, right-padded)."""
