"""The registry of update rules: a name and where its class lives, one line per rule.

A new base optimizer is one new module in this package (a subclass of
:class:`~samedge.core.update_rules.base.UpdateRule` whose ``name`` is its key here) and one line
in ``_ENTRIES``.  A rule's module is imported the first time its class is looked up.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from samedge.core.update_rules.base import UpdateRule

__all__ = ["UPDATE_RULES"]

# name -> "module:Class", the module in this package
_ENTRIES: dict[str, str] = {
    "sgd": "sgd:HeavyBallSGD",
    "adam": "adam:Adam",
    "adamw": "adamw:AdamW",
    "rmsprop": "rmsprop:RMSprop",
}


class _Registry(Mapping[str, type[UpdateRule]]):
    """Name -> :class:`UpdateRule` subclass, read as a ``dict`` is; classes are imported on lookup."""

    def __init__(self, entries: Mapping[str, str]):
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> type[UpdateRule]:
        try:
            module, _, class_name = self._entries[name].partition(":")
        except (KeyError, TypeError):
            raise KeyError(f"unknown update rule {name!r}; known: {', '.join(self._entries)}") from None
        cls = getattr(importlib.import_module(f"{__package__}.{module}"), class_name)
        if not (isinstance(cls, type) and issubclass(cls, UpdateRule)) or getattr(cls, "name", None) != name:
            raise TypeError(f"update rule {name!r} is registered as {cls!r}, not an UpdateRule named {name!r}")
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"UPDATE_RULES({self._entries!r})"


#: Every update rule by name: ``UPDATE_RULES["sgd"](eta=0.1, momentum=0.9)``.
UPDATE_RULES: Mapping[str, type[UpdateRule]] = _Registry(_ENTRIES)
