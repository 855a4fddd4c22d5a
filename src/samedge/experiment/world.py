"""This process's place among the processes of a run: the worker side of ``--nproc`` and ``torchrun``.

A worker (:func:`session`) joins the process group that ``WORLD_SIZE``/``RANK`` describe: gloo on
CPU, NCCL with one GPU per process (``LOCAL_RANK``) when the device is cuda.  The tasks build each
objective over this rank's slice of the data (:func:`sharded_objective`) and wrap it in
:class:`~samedge.core.distributed.ShardedObjective`; everything else runs replicated, so all ranks
hold the same parameters.  Only rank 0 writes the run directory (:func:`is_writer`).  A worker
whose peer vanished in the middle of a collective gets an error from gloo at once (or after
``SAMEDGE_DIST_TIMEOUT`` seconds, default 600, if the peer hangs); a worker of the launcher
(:mod:`samedge.experiment.run.launcher`) exits by itself if the launcher disappears.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    "use_threads",
    "EXIT_WORKER_LOST",
]

#: exit status when a worker process died or lost its peers (resume from the last checkpoint)
EXIT_WORKER_LOST = 5  # 4 is an environment error (a file system refusal)
STORE_ENV, LAUNCHER_ENV, _TIMEOUT_ENV = "SAMEDGE_DIST_STORE", "SAMEDGE_LAUNCHER_PID", "SAMEDGE_DIST_TIMEOUT"


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
    if os.environ.get(LAUNCHER_ENV):
        _watch_launcher(int(os.environ[LAUNCHER_ENV]))
    store = os.environ.get(STORE_ENV)
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


def use_threads(threads: int | None) -> None:
    """Set this process's torch threads (``None``: leave torch's default).  The float sums of a
    matrix product depend on how many threads share them, so a run is byte-reproducible only on
    the same count; a run records it as its ``threads`` setting."""
    if threads is not None:
        torch.set_num_threads(threads)
