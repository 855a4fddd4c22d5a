"""The launcher of ``samedge run --nproc N``: starts N worker processes and watches them.

It starts each worker as ``python -m samedge`` with the same arguments and the environment
``torchrun`` would give (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) plus a file store for the
rendezvous (no port to pick).  When one worker dies (killed, or crashed), it stops the others
(SIGTERM, then SIGKILL) and exits with :data:`EXIT_WORKER_LOST` and a one-line message.  Ctrl-C
stops the workers at once (the run continues from its last periodic checkpoint).  The workers'
side (joining the process group, sharding, who writes) is :mod:`samedge.experiment.world`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from samedge.experiment.store.layout import RunDir
from samedge.experiment.world import EXIT_WORKER_LOST, LAUNCHER_ENV, STORE_ENV

__all__ = ["launch", "EXIT_WORKER_LOST"]

_GRACE_S = 5.0  # after a worker failed: how long the others get to end by themselves


def launch(nproc: int, argv: Sequence[str], run_dir: Path) -> int:
    """Run ``python -m samedge ARGV`` as ``nproc`` worker processes and watch them; the exit status
    is theirs, or :data:`EXIT_WORKER_LOST` when one died."""
    store_dir = tempfile.mkdtemp(prefix="samedge-dist-")
    env = dict(os.environ)
    env.update(
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        **{STORE_ENV: str(Path(store_dir) / "store"), LAUNCHER_ENV: str(os.getpid())},
    )
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    procs: list[subprocess.Popen] = []
    resume = f"samedge run --resume {run_dir} --nproc {nproc}"
    try:
        for rank in range(nproc):
            worker_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([sys.executable, "-m", "samedge", *argv], env=worker_env))
        rank, code = _wait_first_failure(procs)
        if code == 0:
            return 0
        if code in (2, 3, 130):  # an orderly end that every rank takes (bad input, divergence)
            _wait_all(procs, 120.0)
        else:
            _wait_all(procs, _GRACE_S)
        stopped = _stop(procs)
        if code > 1:
            return code  # the workers said why (rank 0's one-line error, or the divergence report)
        what = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"failed with exit status {code}"
        if RunDir(run_dir).checkpoint.exists():
            then = f"The last checkpoint in {run_dir} is intact: continue with `{resume}`"
        else:
            then = "No checkpoint was written yet: start again with the same command and --overwrite"
        print(
            f"samedge: error: worker rank {rank} of {nproc} (pid {procs[rank].pid}) {what}; "
            f"stopped {stopped} other worker(s). {then}",
            file=sys.stderr,
        )
        return EXIT_WORKER_LOST if code < 0 else code
    except KeyboardInterrupt:
        _stop(procs)
        print(
            f"samedge: interrupted; the {nproc} workers were stopped. Continue from the last checkpoint with `{resume}`",
            file=sys.stderr,
        )
        return 130
    finally:
        _stop(procs)
        shutil.rmtree(store_dir, ignore_errors=True)


def _wait_first_failure(procs: list[subprocess.Popen]) -> tuple[int, int]:
    """Poll until all exited 0 (returns ``(-1, 0)``) or one failed: ``(rank, status)``; a rank
    killed by a signal is named before ranks that failed because they lost it."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            time.sleep(0.2)  # let a simultaneous death show, so the killed rank is the one named
            codes = [p.poll() for p in procs]
            failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
            return min(failed, key=lambda rc: (rc[1] >= 0, rc[0]))
        if all(c == 0 for c in codes):
            return -1, 0
        time.sleep(0.1)


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)


def _stop(procs: list[subprocess.Popen]) -> int:
    """SIGTERM the running workers, SIGKILL those still there after 5 s; how many were running."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + 5.0
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return len(running)
