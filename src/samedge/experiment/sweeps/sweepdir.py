"""The sweep directory's layout and its lock: every file a sweep writes besides its runs' own.

A sweep directory holds ``sweep.json`` (the definitions given and every point's settings),
``status.json`` (the outcome of points whose run directory cannot tell it: refused or failed
while running), ``sweep.csv`` (one row per point), ``sweep.lock`` and one run directory per point
(:class:`~samedge.experiment.store.layout.RunDir`).

Many processes may work on one sweep directory at once (two ``samedge sweep`` calls, Ray's
driver and a user's ``samedge run --resume``): each run is single-writer through its own
``run.lock``, and every read-modify-write of the sweep's own files happens under ``sweep.lock``
(:meth:`SweepDir.locked`, an exclusive ``fcntl.flock`` held for milliseconds), so no write is lost
or torn and no two writers share a temporary file.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samedge.errors import ConfigError
from samedge.experiment.store.files import atomic_write, write_json
from samedge.experiment.store.layout import RunDir

__all__ = ["SweepDir"]

# Sweep locks held by this process (path -> depth): flock conflicts between two opens of one file
# even within a process, so a nested ``locked()`` counts on the outer one.
_HELD: dict[str, int] = {}


@dataclass(frozen=True)
class SweepDir:
    """One sweep's directory: the paths of its files, its lock, and the readers and writers of
    ``sweep.json``, ``status.json`` and ``sweep.csv``."""

    path: Path

    DEFINITION = "sweep.json"
    STATUS = "status.json"
    CSV = "sweep.csv"
    LOCK = "sweep.lock"

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    def __str__(self) -> str:
        return str(self.path)

    @property
    def definition(self) -> Path:
        return self.path / self.DEFINITION

    @property
    def status(self) -> Path:
        return self.path / self.STATUS

    @property
    def csv(self) -> Path:
        return self.path / self.CSV

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    def run_dir(self, name: str) -> RunDir:
        return RunDir(self.path / name)

    def is_sweep(self) -> bool:
        return self.definition.is_file()

    def is_empty(self) -> bool:
        """No entries but what a sweep writes before its definition (its lock, a temporary file)."""
        return all(
            any(fnmatch.fnmatchcase(name, pat) for pat in (self.LOCK, "*.tmp")) for name in os.listdir(self.path)
        )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``sweep.lock`` (waiting for another process's short hold); the directory must exist.
        Reentrant within a process."""
        import fcntl

        key = str(self.lock.resolve())
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _HELD[key] = 1
            yield
        finally:
            _HELD.pop(key, None)
            os.close(fd)  # drops the flock

    def read_definition(self) -> dict[str, Any] | None:
        """``sweep.json`` (``None`` if there is none); a damaged one is refused, naming it."""
        try:
            data = json.loads(self.definition.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (UnicodeDecodeError, ValueError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("points"), list):
            raise ConfigError(f"{self.definition} is not a readable sweep definition")
        for p in data["points"]:
            if not (isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("settings"), dict)):
                raise ConfigError(f"{self.definition} is not a readable sweep definition")
            if not isinstance(p.setdefault("varied", {}), dict):
                raise ConfigError(f"{self.definition} is not a readable sweep definition")
        return data

    def write_definition(self, data: dict[str, Any]) -> None:
        with self.locked():
            write_json(self.definition, data)

    def read_status(self) -> dict[str, dict[str, Any]]:
        """``status.json``: point name -> its recorded outcome (damage reads as no records: each
        point's run directory still says what it can)."""
        try:
            data = json.loads(self.status.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)}

    def record_status(self, name: str, outcome: dict[str, Any] | None) -> None:
        """Record (or, with ``None``, clear) one point's outcome, under the lock."""
        with self.locked():
            status = self.read_status()
            if outcome is None:
                if name not in status:
                    return
                status.pop(name)
            else:
                status[name] = outcome
            write_json(self.status, status)

    def write_csv(self, text: str) -> Path:
        """``sweep.csv`` atomically, under the lock."""
        with self.locked():
            atomic_write(self.csv, text.encode("utf-8"))
        return self.csv
