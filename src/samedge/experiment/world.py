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
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from samedge.errors import BadInput, ConfigError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from samedge.core.objective import Objective

# torch is imported inside the functions that need it: the command line asks :func:`env_place`
# (is this process rank 0? is the environment consistent?) before torch is loaded.

__all__ = [
    "lost_peer",
    "DistContext",
    "EnvPlace",
    "env_place",
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


@dataclass(frozen=True)
class EnvPlace:
    """This process's place as the environment describes it (``torchrun`` or ``--nproc``)."""

    rank: int
    world_size: int
    local_rank: int
    timeout_s: float

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def _env_int(env: dict[str, str] | os._Environ, name: str) -> int | None:
    text = env.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer") from None


def env_place(env: dict[str, str] | os._Environ | None = None) -> EnvPlace:
    """The one place that reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and
    ``SAMEDGE_DIST_TIMEOUT``, and refuses an inconsistent set (:class:`ConfigError`).

    Without ``WORLD_SIZE`` (or with 1) this is the only process: rank 0 whatever ``RANK`` says (a
    shell inside a cluster job can carry a stray ``RANK``).  With ``WORLD_SIZE`` > 1, ``RANK``
    must be given and lie in ``[0, WORLD_SIZE)``."""
    env = os.environ if env is None else env
    world_size = _env_int(env, "WORLD_SIZE")
    world_size = 1 if world_size is None else world_size
    if world_size < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={world_size} must be >= 1")
    text = env.get(_TIMEOUT_ENV, "600")
    try:
        timeout = float(text)
    except ValueError:
        timeout = math.nan
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"environment variable {_TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    if world_size == 1:
        return EnvPlace(0, 1, 0, timeout)
    rank = _env_int(env, "RANK")
    if rank is None:
        raise ConfigError(f"WORLD_SIZE={world_size} is set but RANK is not; start workers with torchrun or --nproc")
    if not 0 <= rank < world_size:
        raise ConfigError(f"environment variable RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    local_rank = _env_int(env, "LOCAL_RANK")
    return EnvPlace(rank, world_size, 0 if local_rank is None else local_rank, timeout)


def current() -> DistContext | None:
    """This process's place in an initialized process group of more than one process, or None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DistContext(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by the launcher or ``torchrun`` (1 when unset), checked."""
    return env_place().world_size


def is_writer() -> bool:
    """Whether this process writes files and prints reports: rank 0, or a single process."""
    ctx = current()
    if ctx is not None:
        return ctx.rank == 0
    return env_place().is_writer


def process_group_info() -> dict[str, Any]:
    """``world_size`` and ``backend`` of this run's process group (1 and None for one process), as
    ``config.json`` and ``summary.json`` record them."""
    ctx = current()
    return {"world_size": 1 if ctx is None else ctx.world_size, "backend": None if ctx is None else ctx.backend}


@contextmanager
def session(device: str) -> Iterator[DistContext | None]:
    """Join the process group that ``WORLD_SIZE``/``RANK`` describe (nothing for one process);
    leave it at the end."""
    import torch
    import torch.distributed as dist

    place = env_place()
    if place.world_size < 2 or dist.is_initialized():
        yield current()
        return
    rank, world, local_rank = place.rank, place.world_size, place.local_rank
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError("config field 'device' is 'cuda' but no CUDA device is available; use cpu or auto")
        torch.cuda.set_device(local_rank)  # one GPU per process
    if os.environ.get(LAUNCHER_ENV):
        _watch_launcher(int(os.environ[LAUNCHER_ENV]))
    store = os.environ.get(STORE_ENV)
    timeout = datetime.timedelta(seconds=place.timeout_s)
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


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank of this run vanished (gloo
    reports the closed connection; NCCL and the store a broken or timed-out peer)."""
    import torch.distributed as dist

    if current() is None and env_place().world_size < 2:
        return False
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "timed out")
    )


def _watch_launcher(pid: int) -> None:
    """Launcher's workers: ignore Ctrl-C (the launcher stops them) and end when it is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    store = os.environ.get(STORE_ENV)

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(1.0)
        if store:  # the launcher was killed before it could remove its rendezvous folder
            shutil.rmtree(os.path.dirname(store), ignore_errors=True)
        os._exit(EXIT_WORKER_LOST)

    threading.Thread(target=watch, name="samedge-launcher-watch", daemon=True).start()


def sharded_objective(
    model: nn.Module, loss_fn: Any, x: Tensor, y: Tensor, chunk_size: int | None, **kw: Any
) -> Objective:
    """The full objective over ``(x, y)``: in a run over many processes, this rank's contiguous
    slice (sizes differ by at most one) summed over the ranks; else simply the objective."""
    from samedge.core.distributed import ShardedObjective, shard_bounds
    from samedge.core.objective import Objective

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
    import torch.distributed as dist

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
        import torch

        torch.set_num_threads(threads)
