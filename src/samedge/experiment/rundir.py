"""A run directory's life: its default name, creation (refusing or replacing an old one),
provenance, and the saved configuration that ``--resume`` reads.

Files in a run directory: ``config.json`` (settings, data source, parameter count, versions,
command), ``metrics.csv`` (:mod:`~samedge.experiment.metrics`), ``summary.json``,
``checkpoint.pt`` (:mod:`~samedge.experiment.checkpoint`) and the figures.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from samedge import __version__
from samedge.errors import CheckpointError, RunDirError
from samedge.experiment.config import RunConfig, from_mapping
from samedge.experiment.metrics import write_json

__all__ = ["default_run_dir", "prepare_run_dir", "write_run_config", "load_run_config", "provenance", "CONFIG_NAME"]

CONFIG_NAME = "config.json"


def default_run_dir(cfg: RunConfig) -> Path:
    """``runs/<task>-<optimizer>-eta<eta>[-rho<rho>]-seed<seed>``."""
    tag = f"{cfg.task}-{cfg.optimizer}-eta{cfg.eta:g}"
    if cfg.method().perturbs:
        tag += f"-rho{cfg.rho:g}"
    return Path("runs") / f"{tag}-seed{cfg.seed}"


def prepare_run_dir(path: Path, overwrite: bool) -> None:
    """Create ``path``; an existing non-empty one is replaced only with ``overwrite`` and only if it
    looks like a samedge run directory (has ``config.json``), so nothing else is ever deleted."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise RunDirError(f"run directory {path} already exists; pass --overwrite to replace it")
        if not (path / CONFIG_NAME).exists():
            raise RunDirError(f"{path} is not a samedge run directory (no config.json); refusing to overwrite it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


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
        saved = json.loads(path.read_text(encoding="utf-8"))["config"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is corrupted (no readable 'config')") from None
    return from_mapping(saved, where=f"{path} config")
