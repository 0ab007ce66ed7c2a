"""The transformers releases accel supports, and the few places where they differ.

accel is tested on every transformers release from ``TRANSFORMERS_MIN`` through ``TRANSFORMERS_MAX`` (CI runs the
exactness tests at both ends). What changed inside that window and is handled here:

* 5.24 renamed the cache argument of every model ``forward`` (and of ``generate``) from ``past_key_values`` to
  ``cache`` (the old name is deprecated; a call that passes both raises), and model outputs carry ``.cache``
  (``.past_key_values`` stays as an alias). Decoder layers hand the cache to their attention modules as ``cache=``.
* ``Cache.update`` receives an extra ``kwargs=`` keyword.

A release outside the window is refused by ``accel.patch`` (``check_transformers_version``); setting
``ACCEL_ALLOW_UNTESTED_TRANSFORMERS=1`` lets it run, and the take-over check of every patched forward
(``accel.patching.lm``) then still refuses a forward in which transformers did not use accel's cache or attention.
"""
from __future__ import annotations

import inspect
import logging
import os

logger = logging.getLogger("accel")

#: the oldest and newest transformers releases accel is tested on (setup.py's bounds)
TRANSFORMERS_MIN = "5.23.0"
TRANSFORMERS_MAX = "5.25.0"
CACHE_NAMES = ("cache", "past_key_values")


def _vtuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out + [0] * (3 - len(out)))


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def window_text() -> str:
    return f"{TRANSFORMERS_MIN} to {TRANSFORMERS_MAX}"


def install_hint() -> str:
    return f"pip install 'transformers>={TRANSFORMERS_MIN},<={TRANSFORMERS_MAX}'"


def check_transformers_version() -> None:
    """Refuse a transformers release outside the tested window (``ACCEL_ALLOW_UNTESTED_TRANSFORMERS=1`` overrides)."""
    from .errors import AccelError

    v = transformers_version()
    inside = _vtuple(TRANSFORMERS_MIN) <= _vtuple(v) <= _vtuple(TRANSFORMERS_MAX)
    if inside:
        return
    if os.environ.get("ACCEL_ALLOW_UNTESTED_TRANSFORMERS", "0") == "1":
        logger.warning("transformers %s is outside accel's tested window (%s); running anyway because "
                       "ACCEL_ALLOW_UNTESTED_TRANSFORMERS=1", v, window_text())
        return
    raise AccelError(f"transformers {v} is outside the releases accel is tested on ({window_text()}); "
                     f"{install_hint()} (or set ACCEL_ALLOW_UNTESTED_TRANSFORMERS=1 to try it)")


def cache_arg_name(fn) -> str:
    """The keyword a model's ``forward`` (or ``generate``) takes its cache by: ``"cache"`` (5.24+) or
    ``"past_key_values"``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def take_cache(kwargs: dict, where: str = "forward"):
    """Remove and return the cache from ``kwargs``, whichever name it was passed by (None if absent)."""
    from .errors import InputError

    given = [n for n in CACHE_NAMES if kwargs.get(n) is not None]
    if len(given) > 1:
        raise InputError(f"{where} got both cache= and past_key_values=; pass the cache once (cache= on "
                         "transformers 5.24+, past_key_values= before)")
    val = kwargs.pop(given[0]) if given else None
    for n in CACHE_NAMES:
        kwargs.pop(n, None)
    return val


def peek_cache(kwargs: dict):
    for n in CACHE_NAMES:
        if kwargs.get(n) is not None:
            return kwargs[n]
    return None


def output_cache(out):
    """The cache a model output or ``generate`` output carries (``.cache`` on 5.24+, ``.past_key_values`` before)."""
    for n in CACHE_NAMES:
        c = getattr(out, n, None)
        if c is not None:
            return c
    return None


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for calling ``model(...)`` or ``model.generate(...)`` with a cache on this release."""
    return {cache_arg_name(type(model).forward): cache}
