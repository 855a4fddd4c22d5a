"""The ``serial`` executor: the points one after another in this process."""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from pathlib import Path

from samedge.experiment.sweeps.executors.base import Executor, Reporter
from samedge.experiment.sweeps.point import describe_bug, execute_point
from samedge.experiment.sweeps.spec import SweepPoint

__all__ = ["SerialExecutor"]


class SerialExecutor(Executor):
    name = "serial"
    summary = "one run after another in this process"

    def run(self, out: Path, points: Sequence[SweepPoint], threads: int, progress: bool, reporter: Reporter) -> None:
        for p in points:
            assert p.config is not None
            reporter.started()
            try:
                outcome = execute_point(p.settings(), str(out / p.name), threads, progress)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # a samedge bug in one run: recorded, the others go on
                outcome = {"status": "error", "reason": describe_bug(err)}
                traceback.print_exc()
            reporter.finished(p, outcome)
