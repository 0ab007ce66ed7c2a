"""Calibrators: the profilers that make plans for the policies that need one (``hylra``: layer sensitivity and
inter-layer similarity + the HyLRA dynamic program; ``duo``: per-head retrieval scores; ``moa``: per-head spans by
MILP). A policy names its calibrator (``Policy.calibrator``); ``accel.calibrate`` and ``accel plan`` find it there."""
