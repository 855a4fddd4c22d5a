"""What an executor is: a way to run a sweep's points, named on the command line by ``--executor``.

An executor subclasses :class:`Executor`: its :attr:`~Executor.name`, a one-line
:attr:`~Executor.summary`, its own command-line flags (:meth:`~Executor.add_arguments`, read back
by :meth:`~Executor.from_arguments`), :meth:`~Executor.check`, which refuses what cannot work
(a missing package, a bad option) before the sweep directory is written, and
:meth:`~Executor.run`, which runs points with
:func:`~samedge.experiment.sweeps.point.execute_point` and reports each outcome to a
:class:`Reporter`.  An executor that hands points to a scheduler and returns before they end (a
batch system's queue) reports each of those as :meth:`~Reporter.submitted` instead; calling the
sweep again collects them.  The registry in :mod:`samedge.experiment.sweeps.executors` names them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from samedge.experiment.sweeps.spec import SweepPoint

__all__ = ["Executor", "Reporter", "point_threads"]


class Reporter(Protocol):
    """What an executor tells the sweep: runs started, each point's outcome
    (``{"status", "reason", ...}`` as :func:`~samedge.experiment.sweeps.point.execute_point` returns it),
    and the points left to a scheduler when :meth:`Executor.run` returns before they end."""

    def started(self, n: int = 1) -> None: ...

    def finished(self, point: SweepPoint, outcome: dict[str, Any]) -> None: ...

    def submitted(self, point: SweepPoint, where: str) -> None:
        """``point`` runs on after this call returns (``where``: its job, say ``slurm job 812_3``)."""
        ...


class Executor:
    """Runs a sweep's points; subclasses name themselves and add their flags."""

    name: ClassVar[str]
    summary: ClassVar[str]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this executor's own flags to ``samedge sweep`` and ``samedge reproduce``."""

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> Executor:
        """The executor with the options its flags gave."""
        return cls()

    def check(self) -> None:
        """Refuse (:class:`~samedge.errors.ConfigError`) what cannot work, before anything is written."""

    def run(self, out: Path, points: Sequence[SweepPoint], threads: int, progress: bool, reporter: Reporter) -> None:
        """Run ``points`` into ``out/<name>``, each on its ``threads`` setting (``threads`` torch threads
        for a point recorded without one); report each outcome (or, for a point left running in a
        scheduler, that it was submitted)."""
        raise NotImplementedError


def point_threads(point: SweepPoint, threads: int) -> int:
    """The torch threads ``point`` runs on: its own ``threads`` setting, else the executor's."""
    return (point.config.threads if point.config is not None else None) or threads
