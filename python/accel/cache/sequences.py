"""The policies' per-sequence state, kept beside accel's cache and never in it.

A generation carries state between forward passes that belongs to its policies, not to the cache: a KV policy's
eviction budgets and protected tokens for each compressed layer, an attention policy's selections, page bounds or
refresh schedule, cross-layer data within a step, the decode-step counter. It lives in a ``SequenceState`` found from
the cache object through a weak side table: it follows the cache wherever the cache goes (a new patch of the same
model, another thread, the evaluation harness compressing a copy before ``generate()``), is deep-copied with it
(``AccelCache.__deepcopy__``: branching a conversation), and disappears with it. Neither the cache nor the attention
primitives read it; only the policies do, through ``LayerContext.state``.
"""
from __future__ import annotations

import copy
import weakref


class SequenceState:
    """``layer_state``: per layer, the policies' dict (``ctx.state``); ``shared``: cross-layer data within a step;
    ``step``: decode steps taken on this cache."""

    def __init__(self):
        self.layer_state: dict[int, dict] = {}
        self.shared: dict = {}
        self.step = 0


_STATES: "weakref.WeakKeyDictionary[object, SequenceState]" = weakref.WeakKeyDictionary()


def state_of(cache) -> SequenceState:
    """The sequence state of ``cache`` (created empty on first use)."""
    st = _STATES.get(cache)
    if st is None:
        st = _STATES[cache] = SequenceState()
    return st


def restart(cache) -> SequenceState:
    """A fresh, empty state for ``cache`` (an empty cache starts a new sequence)."""
    st = _STATES[cache] = SequenceState()
    return st


def copy_state(src, dst, memo: dict) -> None:
    """Give ``dst`` (a deep copy of ``src``) a deep copy of ``src``'s state."""
    st = _STATES.get(src)
    if st is not None:
        _STATES[dst] = copy.deepcopy(st, memo)
