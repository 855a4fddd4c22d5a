"""Creating a run directory (refusing or replacing an old one) and locking it for its one writer.

Guarantees:

* **One writer.**  A run (new or resumed) holds an exclusive OS lock on ``run.lock`` for its whole
  life; the OS drops it when the process ends, however it ends.  A second run or resume of a
  locked directory is refused at once, naming the holder's process id.
* **Atomic creation.**  A new directory is made with one ``mkdir``; of two runs started together
  on one path exactly one gets it (the other finds it locked or already holding a run).
* **Guarded overwrite.**  ``overwrite`` replaces only a directory holding nothing but what samedge
  writes (:data:`~samedge.experiment.store.layout.RUN_FILES`) with a ``config.json`` samedge wrote;
  anything else is refused with a list of the foreign entries.  The new run is set up in a fresh
  sibling directory first; only then is the old one moved aside and the new one moved in, and the
  old one is removed last.  A failure before that (a read-only parent, a full disk) leaves the old
  run as it was.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from samedge.errors import RunDirError
from samedge.experiment.store.layout import RunDir
from samedge.experiment.store.lock import RunLock, check_unlocked

__all__ = ["create_run_dir", "lock_run_dir"]


def lock_run_dir(path: str | Path) -> RunLock:
    """Lock an existing run directory (for ``--resume``); refused if another process holds it."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"run directory {path} does not exist")
    return RunLock(path)


def _remove_leftovers(path: Path) -> None:
    """Remove what an ``overwrite`` killed midway left beside ``path``: the old run moved aside
    (``.NAME.old-PID``) and a staged new run (``.NAME.new-*``) that no live process holds."""
    if not path.parent.is_dir():
        return
    for entry in path.parent.glob(f".{glob.escape(path.name)}.old-*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
    for entry in path.parent.glob(f".{glob.escape(path.name)}.new-*"):
        if entry.is_dir() and not entry.is_symlink():
            try:
                check_unlocked(entry)
            except RunDirError:
                continue  # another process is setting up a run there right now
            shutil.rmtree(entry, ignore_errors=True)


def _check_replaceable(path: Path) -> None:
    """Refuse unless ``path`` holds a samedge run and nothing else."""
    if path.is_symlink():
        raise RunDirError(f"{path} is a symbolic link; give the directory itself to --overwrite")
    foreign = RunDir(path).foreign_entries()
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise RunDirError(
            f"{path} is not a samedge run directory: it holds {shown}, which samedge does not write; refusing to overwrite it"
        )
    if not RunDir(path).config.is_file():
        raise RunDirError(f"{path} is not a samedge run directory (no config.json); refusing to overwrite it")
    try:
        RunDir(path).read_record()
    except RunDirError as err:
        raise RunDirError(f"{err}; refusing to overwrite {path}") from None


def _is_empty(path: Path) -> bool:
    return all(name == RunDir.LOCK for name in os.listdir(path))


def create_run_dir(path: str | Path, overwrite: bool = False, setup: Callable[[Path], None] | None = None) -> RunLock:
    """Create the run directory ``path`` and return its lock (hold it for the run's life).

    ``setup(directory)`` writes the new run's first files (``config.json``); with ``overwrite`` it
    runs in a fresh sibling directory before the old run is touched.  A missing ``path`` is made
    with one ``mkdir``; an existing empty one is used.  An existing run is replaced only with
    ``overwrite``, only if it holds nothing but a samedge run, and never while another process
    holds it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} exists and is not a directory")
    _remove_leftovers(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it first: the lock decides
            path.mkdir()
    if _is_empty(path):
        lock = RunLock(path)
        try:
            if not _is_empty(path):  # another process got here first and has finished or set up
                raise RunDirError(f"run directory {path} already exists; pass --overwrite to replace it")
            if setup is not None:
                setup(path)
        except BaseException:
            lock.release()
            raise
        return lock
    if not overwrite:
        raise RunDirError(f"run directory {path} already exists; pass --overwrite to replace it")
    _check_replaceable(path)
    # Refuses while a run is writing it; the old run's files stay untouched until the new run is set up.
    old_lock = RunLock(path, record_pid=False)
    try:
        return _replace(path, setup)
    finally:
        old_lock.release()


def _replace(path: Path, setup: Callable[[Path], None] | None) -> RunLock:
    """Set up the new run beside ``path``, swap it in, then remove the old run."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    lock: RunLock | None = None
    aside: Path | None = None
    try:
        lock = RunLock(staging)
        if setup is not None:
            setup(staging)
        # the old run moves aside in one rename (no folder made first, so a kill at any moment
        # leaves the old run, the new one, or a '.old-' sibling that the next call removes)
        aside = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, aside)
        try:
            os.rename(staging, path)
        except OSError:
            os.rename(aside, path)  # put the old run back
            raise
    except BaseException:
        if lock is not None:
            lock.release()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    lock.directory = path
    shutil.rmtree(aside, ignore_errors=True)  # the new run exists: only now is the old one removed
    return lock
