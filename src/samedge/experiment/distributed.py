"""Runs over many processes: the launcher of ``samedge run --nproc N`` and the worker side.

**Launch.** ``samedge run ... --nproc N`` (:func:`launch`) starts N local worker processes, each
``python -m samedge`` with the same arguments and the environment ``torchrun`` would give
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) plus a file store for the rendezvous (no port to pick).
``torchrun --nproc-per-node N -m samedge run ...`` (multi-node included) starts the same workers
itself.  A worker (:func:`session`) joins the process group: gloo on CPU, NCCL with one GPU per
process (``LOCAL_RANK``) when the device is cuda.

**Sharding.** The tasks build each objective over this rank's slice of the data
(:func:`sharded_objective`) and wrap it in :class:`~samedge.core.distributed.ShardedObjective`;
everything else runs replicated, so all ranks hold the same parameters.  Only rank 0 writes the
run directory (:func:`is_writer`).

**Faults.** The launcher watches its workers.  When one dies (killed, or crashed), it stops the
others (SIGTERM, then SIGKILL) and exits with :data:`EXIT_WORKER_LOST` and a one-line message;
a worker whose peer vanished in the middle of a collective gets an error from gloo at once (or
after ``SAMEDGE_DIST_TIMEOUT`` seconds, default 600, if the peer hangs).  Checkpoints are written
atomically by rank 0, so the last one stays intact and ``--resume`` continues.  A worker of the
launcher exits by itself if the launcher disappears.  Ctrl-C stops the workers at once (the run
continues from its last periodic checkpoint).
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from samedge.core.distributed import ShardedObjective, shard_bounds
from samedge.core.objective import Objective
from samedge.errors import BadInput, ConfigError

__all__ = [
    "DistContext",
    "current",
    "is_writer",
    "session",
    "sharded_objective",
    "on_rank0",
    "launch",
    "EXIT_WORKER_LOST",
]

#: exit status when a worker process died or lost its peers (resume from the last checkpoint)
EXIT_WORKER_LOST = 5  # 4 is an environment error (a file system refusal)
_STORE_ENV, _LAUNCHER_ENV, _TIMEOUT_ENV = "SAMEDGE_DIST_STORE", "SAMEDGE_LAUNCHER_PID", "SAMEDGE_DIST_TIMEOUT"
_GRACE_S = 5.0  # after a worker failed: how long the others get to end by themselves


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    backend: str


def current() -> DistContext | None:
    """This process's place in an initialized process group of more than one process, or None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DistContext(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by the launcher or ``torchrun`` (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def is_writer() -> bool:
    """Whether this process writes files and prints reports: rank 0, or a single process."""
    ctx = current()
    if ctx is not None:
        return ctx.rank == 0
    return os.environ.get("RANK", "0") == "0"


def provenance() -> dict[str, Any]:
    ctx = current()
    return {"world_size": 1 if ctx is None else ctx.world_size, "backend": None if ctx is None else ctx.backend}


@contextmanager
def session(device: str) -> Iterator[DistContext | None]:
    """Join the process group that ``WORLD_SIZE``/``RANK`` describe (nothing for one process);
    leave it at the end."""
    world = env_world_size()
    if world < 2 or dist.is_initialized():
        yield current()
        return
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError("config field 'device' is 'cuda' but no CUDA device is available; use cpu or auto")
        torch.cuda.set_device(local_rank)  # one GPU per process
    if os.environ.get(_LAUNCHER_ENV):
        _watch_launcher(int(os.environ[_LAUNCHER_ENV]))
    store = os.environ.get(_STORE_ENV)
    timeout = datetime.timedelta(seconds=float(os.environ.get(_TIMEOUT_ENV, "600")))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{store}" if store else "env://",
        rank=rank,
        world_size=world,
        timeout=timeout,
    )
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def _watch_launcher(pid: int) -> None:
    """Launcher's workers: ignore Ctrl-C (the launcher stops them) and end when it is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(1.0)
        os._exit(EXIT_WORKER_LOST)

    threading.Thread(target=watch, name="samedge-launcher-watch", daemon=True).start()


def sharded_objective(
    model: nn.Module, loss_fn: Any, x: Tensor, y: Tensor, chunk_size: int | None, **kw: Any
) -> Objective:
    """The full objective over ``(x, y)``: in a run over many processes, this rank's contiguous
    slice (sizes differ by at most one) summed over the ranks; else simply the objective."""
    ctx = current()
    if ctx is None:
        return Objective.from_tensors(model, loss_fn, x, y, chunk_size, **kw)
    n = x.shape[0]
    if n < ctx.world_size:  # the same on every rank, so every rank stops here
        raise ConfigError(f"{n} examples cannot be shared among {ctx.world_size} processes; use fewer processes")
    start, stop = shard_bounds(n, ctx.world_size, ctx.rank)
    local = Objective.from_tensors(model, loss_fn, x[start:stop], y[start:stop], chunk_size, **kw)
    return ShardedObjective(local)


def on_rank0(action: Any) -> None:
    """Run ``action()`` on rank 0 only; a :class:`BadInput` it raises is raised on every rank (the
    other ranks stay silent about it), so no rank waits for a peer that gave up."""
    ctx = current()
    if ctx is None:
        action()
        return
    error: list[Any] = [None]
    if ctx.rank == 0:
        try:
            action()
        except BadInput as err:
            error = [(type(err).__name__, str(err))]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise _rebuild(error[0])


def _rebuild(err: tuple[str, str]) -> BadInput:
    import samedge.errors as errors

    kind = getattr(errors, err[0], BadInput)
    return kind(err[1]) if isinstance(kind, type) and issubclass(kind, BadInput) else BadInput(err[1])


# ---------------------------------------------------------------------------------- launcher


def launch(nproc: int, argv: Sequence[str], run_dir: Path) -> int:
    """Run ``python -m samedge ARGV`` as ``nproc`` worker processes and watch them; the exit status
    is theirs, or :data:`EXIT_WORKER_LOST` when one died."""
    store_dir = tempfile.mkdtemp(prefix="samedge-dist-")
    env = dict(os.environ)
    env.update(
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        **{_STORE_ENV: str(Path(store_dir) / "store"), _LAUNCHER_ENV: str(os.getpid())},
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
        print(
            f"samedge: error: worker rank {rank} of {nproc} (pid {procs[rank].pid}) {what}; "
            f"stopped {stopped} other worker(s). The last checkpoint in {run_dir} is intact: continue with `{resume}`",
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
