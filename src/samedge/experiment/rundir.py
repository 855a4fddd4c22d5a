"""A run directory's life: its default name, creation (refusing or replacing an old one), the
lock that makes its run its only writer, provenance, and the saved configuration that
``--resume`` reads.

Files in a run directory: ``config.json`` (settings, data source, parameter count, versions,
command), ``metrics.csv`` (:mod:`~samedge.experiment.metrics`), ``summary.json``,
``checkpoint.pt`` and ``checkpoint.prev.pt`` (:mod:`~samedge.experiment.checkpoint`), the figures
and ``run.lock``.

Guarantees:

* **One writer.**  A run (new or resumed) holds an exclusive OS lock on ``run.lock`` for its whole
  life; the OS drops it when the process ends, however it ends.  A second run or resume of a
  locked directory is refused at once, naming the holder's process id.
* **Atomic creation.**  A new directory is made with one ``mkdir``; of two runs started together
  on one path exactly one gets it (the other finds it locked or already holding a run).
* **Guarded overwrite.**  ``overwrite`` replaces only a directory holding nothing but what samedge
  writes (:data:`RUN_FILES`) with a ``config.json`` samedge wrote; anything else is refused with a
  list of the foreign entries.  The new run is set up in a fresh sibling directory first; only then
  is the old one moved aside and the new one moved in, and the old one is removed last.  A failure
  before that (a read-only parent, a full disk) leaves the old run as it was.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from samedge import __version__
from samedge.errors import CheckpointError, RunDirError
from samedge.experiment.config import RunConfig, from_mapping
from samedge.experiment.lock import LOCK_NAME, RunLock, check_unlocked
from samedge.experiment.metrics import write_json

__all__ = [
    "default_run_dir",
    "prepare_run_dir",
    "create_run_dir",
    "lock_run_dir",
    "check_unlocked",
    "RunLock",
    "foreign_entries",
    "write_run_config",
    "load_run_config",
    "read_config_json",
    "provenance",
    "CONFIG_NAME",
    "LOCK_NAME",
    "RUN_FILES",
]

CONFIG_NAME = "config.json"
#: What samedge writes into a run directory (shell patterns); ``overwrite`` deletes nothing else.
RUN_FILES: list[str] = [
    CONFIG_NAME,
    LOCK_NAME,
    "metrics.csv",
    "steps.csv",  # the per-step secant sharpness
    "density.csv",  # spectral densities (density_every)
    "summary.json",
    "checkpoint.pt",
    "checkpoint.prev.pt",
    "checkpoint.pt.corrupt*",
    "*.tmp",  # an atomic write cut short by a crash
    *(
        f"{name}.{ext}"
        for name in ("sharpness", "sharpness_vs_edge", "alignment", "loss", "grad_norm", "trace", "density")
        for ext in ("png", "pdf")
    ),
]


def default_run_dir(cfg: RunConfig) -> Path:
    """``runs/<task>-<optimizer>-eta<eta>[-rho<rho>]-seed<seed>``."""
    tag = f"{cfg.task}-{cfg.optimizer}-eta{cfg.eta:g}"
    if cfg.method().perturbs:
        tag += f"-rho{cfg.rho:g}"
    return Path("runs") / f"{tag}-seed{cfg.seed}"


def lock_run_dir(path: str | Path) -> RunLock:
    """Lock an existing run directory (for ``--resume``); refused if another process holds it."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"run directory {path} does not exist")
    return RunLock(path)


def foreign_entries(path: Path) -> list[str]:
    """Entries of ``path`` that samedge does not write (directories are always foreign)."""
    out = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        ours = any(fnmatch.fnmatchcase(entry.name, pat) for pat in RUN_FILES)
        if not ours or entry.is_dir(follow_symlinks=False) or entry.is_symlink():
            out.append(entry.name + ("/" if entry.is_dir() else ""))
    return out


def read_config_json(path: Path) -> dict[str, Any]:
    """A run's ``config.json`` as samedge wrote it: a JSON object whose ``config`` is an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        data = None
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise RunDirError(f"{path} was not written by samedge (no 'config' object)")
    return data


def _check_replaceable(path: Path) -> None:
    """Refuse unless ``path`` holds a samedge run and nothing else."""
    if path.is_symlink():
        raise RunDirError(f"{path} is a symbolic link; give the directory itself to --overwrite")
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise RunDirError(
            f"{path} is not a samedge run directory: it holds {shown}, which samedge does not write; refusing to overwrite it"
        )
    if not (path / CONFIG_NAME).is_file():
        raise RunDirError(f"{path} is not a samedge run directory (no config.json); refusing to overwrite it")
    try:
        read_config_json(path / CONFIG_NAME)
    except RunDirError as err:
        raise RunDirError(f"{err}; refusing to overwrite {path}") from None


def _is_empty(path: Path) -> bool:
    return all(name == LOCK_NAME for name in os.listdir(path))


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
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rename(path, aside / "run")
        try:
            os.rename(staging, path)
        except OSError:
            os.rename(aside / "run", path)  # put the old run back
            raise
    except BaseException:
        if lock is not None:
            lock.release()
        shutil.rmtree(staging, ignore_errors=True)
        if aside is not None and not (aside / "run").exists():
            with contextlib.suppress(OSError):
                aside.rmdir()
        raise
    lock.directory = path
    shutil.rmtree(aside, ignore_errors=True)  # the new run exists: only now is the old one removed
    return lock


def prepare_run_dir(path: str | Path, overwrite: bool) -> RunLock:
    """:func:`create_run_dir` without setup: the directory exists, empty but for ``run.lock``."""
    return create_run_dir(path, overwrite)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """Versions of samedge and of what it computes with, the platform and the git commit."""
    import matplotlib
    import numpy
    import scipy
    import torch

    return {
        "samedge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }


def write_run_config(
    run_dir: Path, cfg: RunConfig, *, data_source: str, n_parameters: int, extra: dict[str, Any] | None = None
) -> None:
    """``config.json``: the settings and where the run came from (and ``extra``, such as the
    ``world_size`` and ``backend`` of a run over many processes)."""
    write_json(
        run_dir / CONFIG_NAME,
        {
            "config": cfg.to_dict(),
            "data_source": data_source,
            "n_parameters": n_parameters,
            "versions": provenance(),
            "command": sys.argv,
            **(extra or {}),
        },
    )


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The configuration saved in ``run_dir/config.json`` (for ``--resume``)."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.exists():
        raise RunDirError(f"{run_dir} has no config.json; is it a samedge run directory?")
    try:
        saved = read_config_json(path)["config"]
    except RunDirError:
        raise CheckpointError(f"{path} is corrupted (no readable 'config')") from None
    return from_mapping(saved, where=f"{path} config")
