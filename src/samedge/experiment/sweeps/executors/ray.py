"""The ``ray`` executor: the points as Ray tasks on a local or remote cluster (extra ``samedge[ray]``).

Ray retries a task only when its worker process died (Ray's ``max_retries`` counts system
failures, never exceptions raised by the task); the retried task resumes from the run's last
checkpoint.  Each task asks Ray for its point's ``threads`` CPUs and runs with that many torch
threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

from samedge.errors import ConfigError
from samedge.experiment.sweeps.executors.base import Executor, Reporter, point_threads
from samedge.experiment.sweeps.point import describe_bug, execute_point
from samedge.experiment.sweeps.spec import SweepPoint

__all__ = ["RayExecutor", "RAY_INSTALL_HINT", "RAY_MAX_RETRIES"]

RAY_INSTALL_HINT = (
    "--executor ray needs Ray: pip install -c constraints.txt -e \".[ray]\" (or pip install 'samedge[ray]')"
)
#: Ray retries a task whose worker died this many times (never for an exception of the run)
RAY_MAX_RETRIES = 3


class RayExecutor(Executor):
    name = "ray"
    summary = "Ray tasks on a local or remote cluster (pip install 'samedge[ray]')"

    def __init__(self, address: str | None = None, cpus: int | None = None):
        self.address = address
        self.cpus = cpus

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--address", help="ray: cluster address (default: RAY_ADDRESS, else a local cluster)")
        parser.add_argument("--cpus", type=int, help="ray: CPUs of the local cluster (default: all)")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> RayExecutor:
        return cls(address=getattr(args, "address", None), cpus=getattr(args, "cpus", None))

    def check(self) -> None:
        if importlib.util.find_spec("ray") is None:
            raise ConfigError(RAY_INSTALL_HINT)
        if self.cpus is not None and self.cpus < 1:
            raise ConfigError(f"--cpus must be >= 1, got {self.cpus}")

    def run(self, out: Path, points: Sequence[SweepPoint], threads: int, progress: bool, reporter: Reporter) -> None:
        try:
            import ray
            from ray.exceptions import RayError, RayTaskError
        except ImportError:
            raise ConfigError(RAY_INSTALL_HINT) from None
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        started_here = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=progress)
            else:
                ray.init(num_cpus=self.cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=progress)
            started_here = True
        try:
            task = ray.remote(execute_point)

            def submit(p: SweepPoint):
                n = point_threads(p, threads)
                return task.options(
                    num_cpus=n,
                    max_retries=RAY_MAX_RETRIES,
                    retry_exceptions=False,
                    runtime_env={"env_vars": {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}},
                ).remote(p.settings(), str(out / p.name), n, progress)

            pending = {submit(p): p for p in points}
            most = max(point_threads(p, threads) for p in points)
            slots = max(1, int(ray.cluster_resources().get("CPU", 1) // most))
            reporter.started(min(slots, len(pending)))
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    p = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except RayTaskError as err:  # the run raised: a samedge bug (BadInput is returned, not raised)
                        outcome = {"status": "error", "reason": describe_bug(err.cause if err.cause else err)}
                    except RayError as err:  # the worker died more than RAY_MAX_RETRIES times, or the node went away
                        outcome = {"status": "error", "reason": f"infrastructure: {type(err).__name__}"}
                    reporter.finished(p, outcome)
                    if len(pending) >= slots:
                        reporter.started()
        finally:
            if started_here:
                ray.shutdown()
