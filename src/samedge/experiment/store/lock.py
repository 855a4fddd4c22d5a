"""The lock that makes a run the only writer of its run directory.

Standard library only, so that the command line can refuse a locked directory at once, before
it imports torch (seconds).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from samedge.errors import RunDirError
from samedge.experiment.store.layout import RunDir

__all__ = ["RunLock", "RunLocked", "check_unlocked", "lock_holder", "wait_unlocked", "LOCK_NAME"]

LOCK_NAME = RunDir.LOCK
# A reader that asks whether a run is running (lock_holder) holds the lock for microseconds: a
# contender tries again this long before it is refused.
_RETRY_S = (0.005, 0.02, 0.05)


class RunLocked(RunDirError):
    """The run directory is locked by another process (its writer)."""


class RunLock:
    """An exclusive lock on a run directory's ``run.lock`` (``fcntl.flock``), held until
    :meth:`release` or the end of the process.  The file holds the holder's process id
    (``record_pid=False``: left as it is, for a lock that must not change an old run's files).

    ``fcntl`` directly rather than the ``filelock`` package: ``filelock`` opens the lock file with
    ``O_TRUNC``, so a refused contender would erase the holder's pid that the refusal names."""

    def __init__(self, directory: Path, *, record_pid: bool = True):
        self._fd: int | None = None
        self.directory = directory
        path = directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock_soon(fd)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(
                f"{directory} is in use by another samedge process (pid {holder}); one run writes a run directory at a time"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if record_pid:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def check_unlocked(path: str | Path) -> None:
    """Refuse at once if another process holds ``path``'s lock.  Changes nothing and needs no
    write permission (a reader, such as ``samedge measure``, may look at a run no process is
    writing, read-only directories included): see :func:`lock_holder`."""
    holder = lock_holder(path)
    if holder is not None:
        raise RunLocked(
            f"{path} is in use by another samedge process (pid {holder}); one run writes a run directory at a time"
        )


def _flock_soon(fd: int) -> None:
    import fcntl

    for wait in (*_RETRY_S, None):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if wait is None:
                raise
            time.sleep(wait)


def lock_holder(path: str | Path) -> str | None:
    """Who holds ``path``'s run lock: the process id it recorded (``"unknown"`` without one), or
    ``None`` when no process holds it.  Reads only (a missing lock file is not created)."""
    import fcntl

    try:
        fd = os.open(Path(path) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
    finally:
        os.close(fd)  # drops a shared lock taken here at once
    return None


def wait_unlocked(path: str | Path) -> None:
    """Wait until no process holds ``path``'s run lock (at once if none does)."""
    import fcntl

    try:
        fd = os.open(Path(path) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)
