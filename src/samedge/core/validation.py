"""Argument checks shared by the data loaders and models (one-line ``ValueError`` messages)."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Literal, overload

__all__ = ["positive_int", "real_number"]


@overload
def positive_int(name: str, value: Any, *, optional: Literal[False] = False) -> int: ...
@overload
def positive_int(name: str, value: Any, *, optional: bool) -> int | None: ...
def positive_int(name: str, value: Any, *, optional: bool = False) -> int | None:
    """``value`` as an int >= 1 (``None`` passes when ``optional``); bools and floats are refused."""
    if value is None and optional:
        return None
    kind = "a positive integer or None" if optional else "a positive integer"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {kind}, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def real_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within the given bounds; strings, bools, NaN and infinities are
    refused with one line naming ``name`` (``rho="0.05"`` must not fail later as a TypeError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (x < low or (low_open and x == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and (x > high or (high_open and x == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {value!r}")
    return x
