"""The ``local`` executor: the points in worker processes on this machine, ``--jobs`` at a time.

Why worker processes: a run's numbers depend on its torch threads (a point's ``threads``
setting, 1 by default), so a run on 1 thread leaves the machine's other cores idle; ``--jobs``
runs (default: the CPUs this process may use over the threads per run) share the machine, each
in its own process with its own torch thread pool, and give the same ``metrics.csv`` as the
``serial`` executor.  Why the standard library's process pool and not Ray: no extra package and
no cluster to start (``--executor ray`` is for many machines).

Workers start by *spawn* (a fork after torch started its threads can hang) and run one point at a
time through :func:`~samedge.experiment.sweeps.point.execute_point`.  Stopping: Ctrl-C (SIGINT to
the sweep) is passed to every worker as SIGTERM, on which the run checkpoints at the step it is
at, as on Ctrl-C; the sweep then ends with ``KeyboardInterrupt`` and the same command resumes it.
When the sweep's process is killed (SIGTERM, SIGKILL), each worker is told by the kernel (Linux
``PR_SET_PDEATHSIG``) and checkpoints the same way instead of running on alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import ctypes
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samedge.errors import ConfigError
from samedge.experiment.sweeps.executors.base import Executor, Reporter, point_threads
from samedge.experiment.sweeps.point import describe_bug, execute_point
from samedge.experiment.sweeps.spec import SweepPoint

__all__ = ["LocalExecutor", "usable_cpus"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_state = "idle"  # in a worker: "idle", "running" a point, or "stopping" it (checkpointing)
_stopped = False  # in a worker: a stop signal came; points already queued to it are not started
_sweep_pid = 0  # in a worker: the sweep's process (a worker whose parent changed is an orphan)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system says, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _on_stop(signum: int, frame: Any) -> None:
    """In a worker: SIGTERM (from the sweep, or the kernel when the sweep died) stops the running
    point once, as Ctrl-C does (the run checkpoints); a second one must not cut that checkpoint
    short.  An idle worker ends at once (it holds both ends of the pool's queues, so it would
    never see a dead sweep's pipe close)."""
    global _state, _stopped
    _stopped = True
    if _state == "running":
        _state = "stopping"
        raise KeyboardInterrupt
    if _state == "idle":
        os._exit(128 + signum)


def _start_worker() -> None:
    global _sweep_pid
    _sweep_pid = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the sweep, which passes it on
    signal.signal(signal.SIGTERM, _on_stop)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: a worker then outlives a killed sweep to its run's end
            pass
        if os.getppid() != _sweep_pid:  # the sweep died before the request took effect
            os._exit(128 + signal.SIGTERM)


def _run_point(settings: dict[str, Any], run_dir: str, threads: int, progress: bool) -> dict[str, Any]:
    """A worker's task: one point; ``{"status": "interrupted"}`` when stopped by a signal (and,
    without starting it, for a point the pool had queued to a worker that was stopped)."""
    global _state
    if _stopped:
        return {"status": "interrupted", "reason": "not started: the sweep was stopped"}
    _state = "running"
    try:
        return execute_point(settings, run_dir, threads, progress)
    except KeyboardInterrupt:
        if os.getppid() != _sweep_pid:  # the sweep was killed: its run has checkpointed, nobody waits
            os._exit(128 + signal.SIGTERM)
        return {"status": "interrupted", "reason": "stopped by a signal; the run checkpointed"}
    finally:
        _state = "idle"


class LocalExecutor(Executor):
    name = "local"
    summary = "(default) --jobs runs at a time, each in a worker process on this machine"

    def __init__(self, jobs: int | None = None):
        self.jobs = jobs

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--jobs",
            type=int,
            help="local: runs at a time (default: the usable CPUs over --threads-per-run, at least 1)",
        )

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> LocalExecutor:
        return cls(jobs=getattr(args, "jobs", None))

    def check(self) -> None:
        if self.jobs is not None and self.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {self.jobs}")

    def workers(self, points: Sequence[SweepPoint], threads: int) -> int:
        """How many runs at a time: ``--jobs``, else as many as the CPUs hold at the points' threads."""
        most = max(point_threads(p, threads) for p in points)
        jobs = self.jobs or max(1, usable_cpus() // most)
        return min(jobs, len(points))

    def run(self, out: Path, points: Sequence[SweepPoint], threads: int, progress: bool, reporter: Reporter) -> None:
        if not points:
            return
        jobs = self.workers(points, threads)
        context = multiprocessing.get_context("spawn")
        pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker)
        # one run's progress lines at a time are readable; several interleaved are not
        show = progress and jobs == 1
        pending = {pool.submit(_run_point, p.settings(), str(out / p.name), threads, show): p for p in points}
        reporter.started(jobs)
        interrupted = False
        try:
            while pending:
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    p = pending.pop(future)
                    try:
                        outcome = future.result()
                    except cf.process.BrokenProcessPool as err:  # a worker died (killed, out of memory)
                        outcome = {"status": "error", "reason": f"infrastructure: a worker process died ({err})"}
                    except Exception as err:  # the run raised: a samedge bug (BadInput is returned)
                        outcome = {"status": "error", "reason": describe_bug(err)}
                        traceback.print_exception(err)  # with the worker's traceback as its cause
                    if outcome["status"] == "interrupted":  # a worker was stopped from outside: stop all
                        interrupted = True
                        continue
                    reporter.finished(p, outcome)
                    if len(pending) >= jobs:
                        reporter.started()
                if interrupted:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            self._stop(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _stop(pool: cf.ProcessPoolExecutor) -> None:
        """Stop every worker: the running points checkpoint; the pool's queue is dropped."""
        # The pool's worker processes: concurrent.futures keeps them in ``_processes`` (pid ->
        # process) and has no public way to signal them.
        for proc in list(getattr(pool, "_processes", {}).values()):
            if proc.is_alive() and proc.pid is not None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
