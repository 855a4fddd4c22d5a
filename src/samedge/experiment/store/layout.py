"""The run directory's layout: every file a run writes, by name, and the one reader of its settings.

A run directory holds ``config.json`` (settings, data source, parameter count, versions, command),
``metrics.csv`` (one row per measurement, :mod:`~samedge.experiment.store.metrics`),
``steps.csv`` (per-step secant sharpness), ``density.csv`` (spectral densities,
:mod:`~samedge.experiment.store.density`), ``layers.csv`` (the top eigenvector's mass per block,
:mod:`~samedge.experiment.store.layers`), ``summary.json``, ``checkpoint.pt`` and
``checkpoint.prev.pt`` (:mod:`~samedge.experiment.store.checkpoint`), the figures and
``run.lock`` (:mod:`~samedge.experiment.store.lock`).  Every module that touches one of these files
asks :class:`RunDir` for its path; :meth:`RunDir.read_config` is the one reader of the saved
settings, so nothing rebuilds a :class:`~samedge.experiment.config.RunConfig` or a
:class:`~samedge.core.method.Method` from raw dictionaries.  Creating and replacing a run directory
is :mod:`~samedge.experiment.store.create`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samedge import __version__
from samedge.errors import CheckpointError, RunDirError
from samedge.experiment.store.files import write_json

if TYPE_CHECKING:
    from samedge.core.method import Method
    from samedge.experiment.config import RunConfig

# The configuration (and with it torch) is imported where a configuration is read, so that the
# command line can refuse a locked run directory (its lock file is named here) before torch loads.

__all__ = ["RunDir", "RUN_FILES", "FIGURE_NAMES", "versions"]

#: the figures of a run (each as .png and .pdf)
FIGURE_NAMES = ("sharpness", "sharpness_vs_edge", "alignment", "loss", "grad_norm", "trace", "density", "layers")


@dataclass(frozen=True)
class RunDir:
    """One run's directory: the paths of its files and the reader of its saved settings."""

    path: Path

    CONFIG = "config.json"
    METRICS = "metrics.csv"
    STEPS = "steps.csv"
    DENSITY = "density.csv"
    LAYERS = "layers.csv"
    SUMMARY = "summary.json"
    CHECKPOINT = "checkpoint.pt"
    PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
    LOCK = "run.lock"

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def default_for(cls, cfg: RunConfig) -> RunDir:
        """``runs/<task>-<optimizer>[-<base>]-eta<eta>[-rho<rho>]-seed<seed>`` (the base unless sgd): where a run goes without ``--out``."""
        tag = f"{cfg.task}-{cfg.optimizer}-eta{cfg.eta:g}"
        if cfg.base != "sgd":  # runs of earlier samedge (sgd) keep their names
            tag = f"{cfg.task}-{cfg.optimizer}-{cfg.base}-eta{cfg.eta:g}"
        if cfg.method().perturbs:
            tag += f"-rho{cfg.rho:g}"
        return cls(Path("runs") / f"{tag}-seed{cfg.seed}")

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def steps(self) -> Path:
        return self.path / self.STEPS

    @property
    def density(self) -> Path:
        return self.path / self.DENSITY

    @property
    def layers(self) -> Path:
        return self.path / self.LAYERS

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def checkpoint(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def previous_checkpoint(self) -> Path:
        return self.path / self.PREVIOUS_CHECKPOINT

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    def figure(self, name: str, ext: str = "png") -> Path:
        return self.path / f"{name}.{ext}"

    def foreign_entries(self) -> list[str]:
        """Entries that samedge does not write (directories are always foreign)."""
        out = []
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            ours = any(fnmatch.fnmatchcase(entry.name, pat) for pat in RUN_FILES)
            if not ours or entry.is_dir(follow_symlinks=False) or entry.is_symlink():
                out.append(entry.name + ("/" if entry.is_dir() else ""))
        return out

    def read_record(self) -> dict[str, Any]:
        """``config.json`` whole, as samedge wrote it: a JSON object whose ``config`` is an object
        (settings, data source, parameter count, versions, command)."""
        try:
            data = json.loads(self.config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise RunDirError(f"{self.config} was not written by samedge (no 'config' object)")
        return data

    def read_config(self) -> RunConfig:
        """The run's settings as a validated :class:`RunConfig` (settings added to samedge since
        the run was made take their defaults)."""
        from samedge.experiment.config import from_mapping

        if not self.config.exists():
            raise RunDirError(f"{self.path} has no {self.CONFIG}; is it a samedge run directory?")
        try:
            saved = self.read_record()["config"]
        except RunDirError:
            raise CheckpointError(f"{self.config} is corrupted (no readable 'config')") from None
        return from_mapping(saved, where=f"{self.config} config")

    def method(self) -> Method:
        """The optimizer the run trained with."""
        return self.read_config().method()

    def write_config(
        self, cfg: RunConfig, *, data_source: str, n_parameters: int, extra: dict[str, Any] | None = None
    ) -> None:
        """``config.json``: the settings and where the run came from (and ``extra``, such as the
        ``world_size`` and ``backend`` of a run over many processes)."""
        write_json(
            self.config,
            {
                "config": cfg.to_dict(),
                "data_source": data_source,
                "n_parameters": n_parameters,
                "versions": versions(),
                "command": sys.argv,
                **(extra or {}),
            },
        )


#: What samedge writes into a run directory (shell patterns); ``overwrite`` deletes nothing else.
RUN_FILES: list[str] = [
    RunDir.CONFIG,
    RunDir.LOCK,
    RunDir.METRICS,
    RunDir.STEPS,
    RunDir.DENSITY,
    RunDir.LAYERS,
    RunDir.SUMMARY,
    RunDir.CHECKPOINT,
    RunDir.PREVIOUS_CHECKPOINT,
    RunDir.CHECKPOINT + ".corrupt*",
    "*.tmp",  # an atomic write cut short by a crash
    *(f"{name}.{ext}" for name in FIGURE_NAMES for ext in ("png", "pdf")),
]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, Any]:
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
