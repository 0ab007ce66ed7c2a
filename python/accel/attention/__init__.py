"""Attention primitives, below the policies: dense, sparse and ragged decode over accel's cache, the masks they
take, token selection, and transformers' own functions for the calls accel hands back. Policies are written with
these; the kernels they call are in ``accel.ops``."""
