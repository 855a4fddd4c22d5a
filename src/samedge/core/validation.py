"""Argument checks shared by the data loaders and models (one-line ``ValueError`` messages)."""

from __future__ import annotations

import operator
from typing import Any, Literal, overload

__all__ = ["positive_int"]


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
