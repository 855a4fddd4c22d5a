"""``samedge reproduce TASK``: the paper's comparisons for a task as one sweep (a preset in
``samedge/experiment/sweeps/``), the comparison figures, and a report (``report.md`` and a
self-contained ``report.html`` with the figures embedded) that checks each claim of the paper
against the measured numbers."""

from __future__ import annotations

import sys
from importlib import resources

from samedge.errors import ConfigError
from samedge.experiment.sweep import SweepSpec, load_sweep_file

__all__ = ["reproduce_names", "load_reproduce_spec", "write_report"]


def _folder():
    return resources.files("samedge.experiment") / "sweeps"


def reproduce_names() -> list[str]:
    """Tasks with a reproduce grid (``TASK.toml``; ``TASK-paper.toml`` is its paper-scale variant)."""
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".toml") and "-paper" not in p.name)


def load_reproduce_spec(task: str, paper: bool = False) -> SweepSpec:
    if task not in reproduce_names():
        raise ConfigError(f"no reproduce grid for {task!r}; choose one of {', '.join(reproduce_names())}")
    name = f"{task}-paper.toml" if paper else f"{task}.toml"
    with resources.as_file(_folder() / name) as path:
        if not path.exists():
            raise ConfigError(f"no paper-scale reproduce grid for {task!r}")
        return load_sweep_file(path)
