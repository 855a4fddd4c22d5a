"""Running a sweep: every point not yet finished, by an executor, with ``status.json`` and
``sweep.csv`` kept up to date after each run.

Faults: a point whose settings or data are refused is recorded ``failed`` with the reason; a
diverged run is recorded ``diverged``; neither is retried, and the other points go on.  Any other
exception is a samedge bug: it is recorded ``error`` with its message, the other points go on, and
the sweep exits 1.

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
from samedge.experiment.sweeps.executors import Executor, executor_class
from samedge.experiment.sweeps.spec import SweepPoint, read_status, record_status, run_state, write_sweep_csv

__all__ = ["run_sweep", "make_executor", "SweepOutcome"]


@dataclass
class SweepOutcome:
    """What a call of :func:`run_sweep` did: the status of every point, the reason of those that
    have one (failed, error, submitted), and the wall time."""

    statuses: dict[str, str]
    skipped: int
    wall_s: float
    reasons: dict[str, str] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return sum(1 for s in self.statuses.values() if s == status)


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
    registry (with ``address``/``cpus`` for ``ray``) or an executor built already."""
    if isinstance(executor, str):
        options = {"address": address, "cpus": cpus} if executor == "ray" else {}
        executor = make_executor(executor, **options)
    if threads < 1:
        raise ConfigError(f"--threads-per-run must be >= 1, got {threads}")
    started = time.perf_counter()
    out = out.resolve()  # workers elsewhere may not share the driver's working directory
    statuses: dict[str, str] = {}
    reasons: dict[str, str] = {}
    todo: list[SweepPoint] = []
    submitted_before = {k for k, v in read_status(out).items() if v.get("status") == "submitted"}
    for p in points:
        if p.config is None:
            record_status(out, p.name, {"status": "failed", "reason": p.error})
            statuses[p.name], reasons[p.name] = "failed", p.error or ""
            continue
        state = run_state(out / p.name)
        if state in ("done", "diverged"):
            statuses[p.name] = state
            if p.name in submitted_before:  # its job finished after the call that submitted it
                record_status(out, p.name, None)
        else:
            todo.append(p)
    skipped = len(statuses)
    write_sweep_csv(out, points)
    bar = _Progress(len(points), skipped, progress)

    class _Reporter:
        def started(self, n: int = 1) -> None:
            bar.started(n)

        def finished(self, p: SweepPoint, outcome: dict[str, Any]) -> None:
            status = outcome["status"]
            statuses[p.name] = status
            if outcome.get("reason"):
                reasons[p.name] = outcome["reason"]
            record_status(out, p.name, outcome if status in ("failed", "error") else None)
            write_sweep_csv(out, points)
            bar.done(p.name, status)
            if on_done is not None:
                on_done(p.name, outcome)

        def submitted(self, p: SweepPoint, where: str) -> None:
            statuses[p.name], reasons[p.name] = "submitted", where
            record_status(out, p.name, {"status": "submitted", "reason": where})

    try:
        executor.run(out, todo, threads, progress, _Reporter())
    finally:
        bar.close()
        write_sweep_csv(out, points)
    return SweepOutcome(statuses, skipped, time.perf_counter() - started, reasons)
