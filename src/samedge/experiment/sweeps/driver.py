"""Running a sweep: every point not yet finished, by an executor, with ``status.json`` and
``sweep.csv`` kept up to date after each run.

Each call looks at every point afresh (its run directory says what it needs; a record of an
earlier failure is cleared once the point has finished).  Many calls may work on one sweep
directory at once: a point another process is running is left to it and waited for at the end
(then taken over if that process did not finish it), and the sweep's own files are written under
its lock (:class:`~samedge.experiment.sweeps.sweepdir.SweepDir`).

Faults, as ``samedge run`` maps them: a point whose settings or data are refused is recorded
``failed`` with the reason (exit 2); one the machine refused (no permission, a full disk) is
``failed`` with one line naming the path (exit 4); a diverged run is recorded ``diverged``; the
other points go on.  Any other exception is a samedge bug: it is recorded ``error`` with its
message, the other points go on, and the sweep exits 1.

An executor that leaves points running in a scheduler (``--executor submitit --no-wait``) reports
them ``submitted``: they are recorded so in ``status.json`` and ``sweep.csv`` until a later call
finds them finished.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samedge.errors import ConfigError
from samedge.experiment.store.lock import lock_holder, wait_unlocked
from samedge.experiment.sweeps.executors import Executor, executor_class
from samedge.experiment.sweeps.point import EXIT_BAD_INPUT, EXIT_BUG, EXIT_ENVIRONMENT, failed
from samedge.experiment.sweeps.spec import SweepPoint, point_state, record_status, write_sweep_csv

__all__ = ["run_sweep", "make_executor", "SweepOutcome"]


@dataclass
class SweepOutcome:
    """What a call of :func:`run_sweep` did: the status of every point, the reason of those that
    have one (failed, error, submitted), and the wall time."""

    statuses: dict[str, str]
    skipped: int
    wall_s: float
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(1 for s in self.statuses.values() if s == status)

    def exit_code(self) -> int:
        """As ``samedge run`` would exit for the worst point: 1 a samedge bug, 4 the environment
        refused, 2 bad input, else 0 (every run finished or diverged)."""
        if self.count("error"):
            return EXIT_BUG
        codes = {o.get("exit", EXIT_BAD_INPUT) for o in self.outcomes.values() if o.get("status") == "failed"}
        if EXIT_ENVIRONMENT in codes:
            return EXIT_ENVIRONMENT
        return EXIT_BAD_INPUT if self.count("failed") else 0


class _Progress:
    """The sweep's progress: a bar on a terminal (runs done, running, queued, failed; tqdm's time
    left), otherwise one line per finished run."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.finished, self.failed, self.running = total, initial, 0, 0
        self.t0 = time.perf_counter()
        self.ran = 0
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="run", desc="sweep", file=sys.stderr, position=0)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix(running=self.running, queued=self.queued, failed=self.failed, refresh=True)

    @property
    def queued(self) -> int:
        return max(0, self.total - self.finished - self.running)

    def started(self, n: int = 1) -> None:
        self.running += n
        self._postfix()

    def left(self) -> None:
        """A started run turned out to be another process's."""
        self.running = max(0, self.running - 1)
        self._postfix()

    def done(self, name: str, status: str) -> None:
        self.running = max(0, self.running - 1)
        self.finished += 1
        self.ran += 1
        if status in ("failed", "error", "diverged"):
            self.failed += 1
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()
        elif self.enabled:
            elapsed = time.perf_counter() - self.t0
            left = (self.total - self.finished) * elapsed / self.ran
            print(
                f"sweep: {name} {status}; {self.finished}/{self.total} finished, {self.running} running, "
                f"{self.queued} queued, {self.failed} failed or diverged, about {left:.0f} s left",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_executor(name: str, **options: Any) -> Executor:
    """The executor called ``name`` with its options (``address``, ``cpus`` for ``ray``), checked."""
    cls = executor_class(name)
    executor = cls(**{k: v for k, v in options.items() if v is not None})
    executor.check()
    return executor


def run_sweep(
    out: Path,
    points: Sequence[SweepPoint],
    *,
    executor: str | Executor = "serial",
    threads: int = 1,
    address: str | None = None,
    cpus: int | None = None,
    progress: bool = True,
    on_done: Callable[[str, dict], None] | None = None,
) -> SweepOutcome:
    """Run every point of ``points`` that is not finished into ``out/<name>``; keeps
    ``status.json`` and ``sweep.csv`` up to date after each run.  ``executor`` is a name of the
    registry (with ``address``/``cpus`` for ``ray``) or an executor built already; ``threads``
    are the torch threads of points whose settings do not say (recorded by an earlier samedge).
    Points another process is running are waited for at the end, then finished here if needed."""
    if threads < 1:
        raise ConfigError(f"--threads-per-run must be >= 1, got {threads}")
    if isinstance(executor, str):
        options = {"address": address, "cpus": cpus} if executor == "ray" else {}
        executor = make_executor(executor, **options)
    started = time.perf_counter()
    out = out.resolve()  # workers elsewhere may not share the driver's working directory
    statuses: dict[str, str] = {}
    outcomes: dict[str, dict[str, Any]] = {}
    todo: list[SweepPoint] = []
    elsewhere: list[SweepPoint] = []  # being run by another process: waited for at the end
    for p in points:
        if p.config is None:
            statuses[p.name], outcomes[p.name] = "failed", failed(str(p.error))
            continue
        state = point_state(out / p.name, p.settings())
        if state.state in ("done", "diverged"):
            statuses[p.name] = state.state
            record_status(out, p.name, None)  # an earlier failure's record ends with the run
        elif state.state == "damaged":
            statuses[p.name], outcomes[p.name] = "failed", failed(state.reason)
            record_status(out, p.name, None)  # the run directory itself says why
        elif state.state == "running":
            elsewhere.append(p)
        else:
            todo.append(p)
    skipped = sum(1 for s in statuses.values() if s in ("done", "diverged"))
    write_sweep_csv(out, points)
    bar = _Progress(len(points), len(statuses), progress)

    def settle(p: SweepPoint, outcome: dict[str, Any]) -> None:
        nonlocal skipped
        skipped += bool(outcome.get("skipped"))  # finished meanwhile by another process
        status = outcome["status"]
        statuses[p.name], outcomes[p.name] = status, outcome
        record_status(out, p.name, outcome if status in ("failed", "error") else None)
        write_sweep_csv(out, points)
        bar.done(p.name, status)
        if on_done is not None:
            on_done(p.name, outcome)

    class _Reporter:
        def started(self, n: int = 1) -> None:
            bar.started(n)

        def finished(self, p: SweepPoint, outcome: dict[str, Any]) -> None:
            if outcome["status"] == "running":  # another process took it first
                elsewhere.append(p)
                bar.left()
            else:
                settle(p, outcome)

        def submitted(self, p: SweepPoint, where: str) -> None:
            outcome = {"status": "submitted", "reason": where}
            statuses[p.name], outcomes[p.name] = "submitted", outcome
            record_status(out, p.name, outcome)
            write_sweep_csv(out, points)

    try:
        pending = todo
        while pending or elsewhere:
            if pending:
                executor.run(out, pending, threads, progress, _Reporter())
            pending = []
            waiting, elsewhere[:] = list(elsewhere), []
            for p in waiting:
                holder = lock_holder(out / p.name)
                if holder is not None:
                    print(
                        f"sweep: {p.name} is being run by another process (pid {holder}); waiting for it",
                        file=sys.stderr,
                        flush=True,
                    )
                    wait_unlocked(out / p.name)
                state = point_state(out / p.name, p.settings())
                if state.state in ("done", "diverged"):
                    settle(p, {"status": state.state, "reason": "", "skipped": True})
                elif state.state == "damaged":
                    settle(p, failed(state.reason))
                elif state.state == "running":  # taken again at once: wait once more
                    elsewhere.append(p)
                else:  # that process stopped before the end: finish the point here
                    pending.append(p)
    finally:
        bar.close()
        write_sweep_csv(out, points)
    return SweepOutcome(statuses, skipped, time.perf_counter() - started, outcomes)
