"""Running a sweep's points: in this process one after another (``serial``, the default) or as
Ray tasks on a local or remote cluster (``ray``, the optional extra ``samedge[ray]``).

Both executors run a point with :func:`execute_point`, which decides from the run directory alone
whether to skip, resume or start it, and set the same number of torch threads per run
(``threads``, default 1): the float sums of a matrix product depend on how many threads share
them, so the same threads give the same ``metrics.csv`` whichever executor ran the run.

Faults: a point whose settings or data are refused (:class:`~samedge.errors.BadInput`) is
recorded ``failed`` with the reason; a diverged run is recorded ``diverged``; neither is retried,
and the other points go on.  Ray retries a task only when its worker process died (Ray's
``max_retries`` counts system failures, never exceptions raised by the task); the retried task
resumes from the run's last checkpoint.  Any other exception is a samedge bug: it is recorded
``error`` with its message, the other points go on, and the sweep exits 1.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samedge.errors import BadInput, ConfigError
from samedge.experiment.sweeps.spec import SweepPoint, record_status, run_state, write_sweep_csv

__all__ = ["execute_point", "run_sweep", "SweepOutcome", "EXECUTORS", "RAY_INSTALL_HINT"]

EXECUTORS = ("serial", "ray")
RAY_INSTALL_HINT = (
    "--executor ray needs Ray: pip install -c constraints.txt -e \".[ray]\" (or pip install 'samedge[ray]')"
)
#: Ray retries a task whose worker died this many times (never for an exception of the run)
RAY_MAX_RETRIES = 3


def execute_point(settings: dict[str, Any], run_dir: str, threads: int | None = 1, progress: bool = False) -> dict:
    """Run one point into ``run_dir``: skipped when finished or diverged, resumed from its
    checkpoint when interrupted, started otherwise.  Returns ``{"status", "reason"}``; a
    ``KeyboardInterrupt`` (Ctrl-C; the run checkpoints first) propagates."""
    import torch

    from samedge.experiment.config import from_mapping
    from samedge.experiment.run.runner import run

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        path = Path(run_dir)
        state = run_state(path)
        if state in ("done", "diverged"):
            return {"status": state, "reason": "", "skipped": True}
        try:
            cfg = from_mapping(settings)
            result = run(
                cfg,
                path,
                overwrite=state == "start" and path.exists() and (path / "config.json").exists(),
                progress=progress,
                resume=state == "resume",
            )
        except BadInput as err:
            return {"status": "failed", "reason": str(err)}
        s = result.summary
        if s.get("interrupted"):
            raise KeyboardInterrupt
        if s.get("diverged"):
            return {"status": "diverged", "reason": f"step {s.get('diverged_step')}: {s.get('reason', '')}"}
        return {"status": "done", "reason": "", "resumed": state == "resume"}
    finally:
        torch.set_num_threads(previous)


@dataclass
class SweepOutcome:
    """What a call of :func:`run_sweep` did: the status of every point and the wall time."""

    statuses: dict[str, str]
    skipped: int
    wall_s: float

    def count(self, status: str) -> int:
        return sum(1 for s in self.statuses.values() if s == status)


class _Progress:
    """The sweep's progress: a bar on a terminal (runs done, running, failed; tqdm's time left),
    otherwise one line per finished run."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.finished, self.failed, self.running = total, initial, 0, 0
        self.started = time.perf_counter()
        self.ran = 0
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="run", desc="sweep", file=sys.stderr, position=0)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix(running=self.running, failed=self.failed, refresh=True)

    def start(self, n: int = 1) -> None:
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
            elapsed = time.perf_counter() - self.started
            left = (self.total - self.finished) * elapsed / self.ran
            print(
                f"sweep: {name} {status}; {self.finished}/{self.total} finished, {self.running} running, "
                f"{self.failed} failed or diverged, about {left:.0f} s left",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_sweep(
    out: Path,
    points: Sequence[SweepPoint],
    *,
    executor: str = "serial",
    threads: int = 1,
    address: str | None = None,
    cpus: int | None = None,
    progress: bool = True,
    on_done: Callable[[str, dict], None] | None = None,
) -> SweepOutcome:
    """Run every point of ``points`` that is not finished into ``out/<name>``; keeps
    ``status.json`` and ``sweep.csv`` up to date after each run."""
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if threads < 1:
        raise ConfigError(f"--threads-per-run must be >= 1, got {threads}")
    started = time.perf_counter()
    out = out.resolve()  # Ray workers may not share the driver's working directory
    statuses: dict[str, str] = {}
    todo: list[SweepPoint] = []
    for p in points:
        if p.config is None:
            record_status(out, p.name, {"status": "failed", "reason": p.error})
            statuses[p.name] = "failed"
            continue
        state = run_state(out / p.name)
        if state in ("done", "diverged"):
            statuses[p.name] = state
        else:
            todo.append(p)
    skipped = len(statuses)
    write_sweep_csv(out, points)
    bar = _Progress(len(points), skipped, progress)

    def finished(p: SweepPoint, outcome: dict) -> None:
        status = outcome["status"]
        statuses[p.name] = status
        record_status(out, p.name, outcome if status in ("failed", "error") else None)
        write_sweep_csv(out, points)
        bar.done(p.name, status)
        if on_done is not None:
            on_done(p.name, outcome)

    try:
        if executor == "serial":
            for p in todo:
                assert p.config is not None
                bar.start()
                try:
                    outcome = execute_point(p.config.to_dict(), str(out / p.name), threads, progress)
                except KeyboardInterrupt:
                    raise
                except Exception as err:  # a samedge bug in one run: recorded, the others go on
                    outcome = {"status": "error", "reason": _bug(err)}
                    traceback.print_exc()
                finished(p, outcome)
        else:
            _run_ray(out, todo, threads, address, cpus, progress, bar, finished)
    finally:
        bar.close()
        write_sweep_csv(out, points)
    return SweepOutcome(statuses, skipped, time.perf_counter() - started)


def _bug(err: BaseException) -> str:
    return f"internal error {type(err).__name__}: {err}".splitlines()[0]


def _run_ray(out, todo, threads, address, cpus, progress, bar, finished) -> None:
    try:
        import ray
        from ray.exceptions import RayError, RayTaskError
    except ImportError:
        raise ConfigError(RAY_INSTALL_HINT) from None
    address = address or os.environ.get("RAY_ADDRESS") or None
    started_here = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=progress)
        else:
            ray.init(num_cpus=cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=progress)
        started_here = True
    try:
        task = ray.remote(execute_point).options(
            num_cpus=threads,
            max_retries=RAY_MAX_RETRIES,
            retry_exceptions=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}},
        )
        pending = {task.remote(p.config.to_dict(), str(out / p.name), threads, progress): p for p in todo}
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
        bar.start(min(slots, len(pending)))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                p = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except RayTaskError as err:  # the run raised: a samedge bug (BadInput is returned, not raised)
                    outcome = {"status": "error", "reason": _bug(err.cause if err.cause else err)}
                except RayError as err:  # the worker died more than RAY_MAX_RETRIES times, or the node went away
                    outcome = {"status": "error", "reason": f"infrastructure: {type(err).__name__}"}
                finished(p, outcome)
                if len(pending) >= slots:
                    bar.start()
    finally:
        if started_here:
            ray.shutdown()
