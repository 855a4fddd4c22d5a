"""The lock that makes a run the only writer of its run directory.

Standard library only, so that the command line can refuse a locked directory at once, before
it imports torch (seconds).
"""

from __future__ import annotations

import os
from pathlib import Path

from samedge.errors import RunDirError
from samedge.experiment.store.layout import RunDir

__all__ = ["RunLock", "check_unlocked", "LOCK_NAME"]

LOCK_NAME = RunDir.LOCK


class RunLock:
    """An exclusive lock on a run directory's ``run.lock`` (``fcntl.flock``), held until
    :meth:`release` or the end of the process.  The file holds the holder's process id
    (``record_pid=False``: left as it is, for a lock that must not change an old run's files).

    ``fcntl`` directly rather than the ``filelock`` package: ``filelock`` opens the lock file with
    ``O_TRUNC``, so a refused contender would erase the holder's pid that the refusal names."""

    def __init__(self, directory: Path, *, record_pid: bool = True):
        import fcntl

        self._fd: int | None = None
        self.directory = directory
        path = directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
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
    write permission: a shared lock taken and dropped on a read-only descriptor (a reader, such as
    ``samedge measure``, may look at a run no process is writing, read-only directories included)."""
    import fcntl

    lock = Path(path) / LOCK_NAME
    if not lock.is_file():
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        raise RunDirError(
            f"{path} is in use by another samedge process (pid {holder}); one run writes a run directory at a time"
        ) from None
    finally:
        os.close(fd)  # drops the shared lock
