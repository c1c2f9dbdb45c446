"""Argument checks shared by every layer: one wording for one kind of mistake.

Each check returns the value converted (``int`` / ``float``) or raises ``ValueError`` saying what
was given and what was expected, e.g. ``"k must be a positive integer; got 0"``. ``bool`` is never
accepted as a number (``True`` is an ``int`` in Python, but never what a user meant).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_integer(value: Any) -> bool:
    """True for Python / NumPy integers (not ``bool``)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value: Any) -> bool:
    """True for a finite Python / NumPy int or float (not ``bool``)."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(float(value)))


def _int_phrase(minimum: int | None) -> str:
    if minimum is None:
        return "an integer"
    return {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")


def check_int(value: Any, name: str, *, minimum: int | None = 1, allow_none: bool = False) -> int | None:
    """``int(value)`` if it is an integer ≥ ``minimum`` (None: any; or None when ``allow_none``); else ValueError."""
    if value is None and allow_none:
        return None
    if not is_integer(value) or (minimum is not None and value < minimum):
        expected = _int_phrase(minimum) + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return int(value)


def check_number(value: Any, name: str, *, minimum: float | None = None, strict: bool = False,
                 unit: str | None = None, allow_none: bool = False) -> float | None:
    """``float(value)`` if it is a finite number (> or ≥ ``minimum``; None when ``allow_none``); else ValueError.

    ``unit`` (e.g. ``"eV/Å"``) is named in the message.
    """
    if value is None and allow_none:
        return None
    ok = is_finite_number(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        expected = ("None or " if allow_none else "") + f"a finite number{bound}" + (f" ({unit})" if unit else "")
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return float(value)


__all__ = ["check_int", "check_number", "is_finite_number", "is_integer"]
