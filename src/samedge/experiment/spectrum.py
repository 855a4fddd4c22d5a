"""Optional run measurements beyond the top eigenvalue: the Hessian trace and spectral density.

With ``trace_every`` the runner adds a Hutchinson trace (``trace_probes`` Rademacher probes) to
the measurement rows at every ``trace_every`` steps and at the last step: columns ``trace``,
``trace_stderr`` and ``trace_hvps``.  With ``density_every`` it runs stochastic Lanczos quadrature
(``density_probes`` probes of ``density_steps`` Lanczos steps) at those steps and appends the
quadrature nodes and weights to ``density.csv`` (columns ``step, probe, node, weight``), written
and fsynced as ``metrics.csv`` is; :func:`samedge.experiment.plotting.plot_run` draws it as
``density.png``.  Each has its own probe generator (seeds ``seed + 3`` and ``seed + 4``) whose
state is part of the checkpoint, so a resumed run draws the same probes as one that never stopped.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samedge.core.objective import Objective
from samedge.core.params import Params
from samedge.core.spectrum import SpectralDensity, hessian_density, hessian_trace
from samedge.errors import CheckpointError, RunDirError
from samedge.experiment.config import RunConfig
from samedge.experiment.metrics import truncate_metrics

__all__ = ["RunSpectrum", "DensityWriter", "read_density", "TRACE_COLUMNS", "DENSITY_FILE", "DENSITY_COLUMNS"]

TRACE_COLUMNS = ["trace", "trace_stderr", "trace_hvps"]
DENSITY_FILE = "density.csv"
DENSITY_COLUMNS = ["step", "probe", "node", "weight"]


def _due(step: int, every: int, last: int) -> bool:
    return every > 0 and (step % every == 0 or step == last)


class RunSpectrum:
    """The trace and density measurements of a run and their probe generators."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.trace_generator = torch.Generator().manual_seed(cfg.seed + 3)
        self.density_generator = torch.Generator().manual_seed(cfg.seed + 4)

    @property
    def enabled(self) -> bool:
        return self.cfg.trace_every > 0 or self.cfg.density_every > 0

    def trace_columns(self, objective: Objective, params: Params, step: int) -> dict[str, Any]:
        """The trace columns of the row at ``step`` (empty cells when no trace is due)."""
        if not _due(step, self.cfg.trace_every, self.cfg.steps):
            return dict.fromkeys(TRACE_COLUMNS)
        est = hessian_trace(objective, params, probes=self.cfg.trace_probes, generator=self.trace_generator)
        return {"trace": est.trace, "trace_stderr": est.stderr, "trace_hvps": est.matvecs}

    def density(self, objective: Objective, params: Params, step: int) -> SpectralDensity | None:
        if not _due(step, self.cfg.density_every, self.cfg.steps):
            return None
        return hessian_density(
            objective,
            params,
            probes=self.cfg.density_probes,
            steps=self.cfg.density_steps,
            generator=self.density_generator,
        )

    def state_dict(self) -> dict:
        return {"trace": self.trace_generator.get_state(), "density": self.density_generator.get_state()}

    def load_state_dict(self, state: dict | None, run_dir: Path) -> None:
        if not self.enabled:
            return
        if state is None:
            raise CheckpointError(f"{run_dir}: the checkpoint has no trace/density probe state")
        self.trace_generator.set_state(state["trace"])
        self.density_generator.set_state(state["density"])


class DensityWriter:
    """Appends SLQ nodes and weights to ``density.csv``: one line per node with positive weight,
    one write and fsync per reading (a reading cut off by a kill is dropped on resume or read)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / DENSITY_FILE
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", encoding="utf-8", newline="")
        if new:
            self._append([DENSITY_COLUMNS])

    def _append(self, rows: list[list[Any]]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        self._file.write(buf.getvalue())
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, step: int, density: SpectralDensity) -> None:
        self._append(
            [
                [step, p, repr(float(node)), repr(float(weight))]
                for p in range(density.probes)
                for node, weight in zip(density.nodes[p], density.weights[p])
                if weight > 0
            ]
        )

    def close(self) -> None:
        self._file.close()


def read_density(path: str | Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``density.csv`` as step -> (nodes, probability weights summing to 1 over the probes);
    a last line cut off mid-write is ignored."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]
    if not lines or lines[0].split(",") != DENSITY_COLUMNS:
        raise RunDirError(f"{path}: not a density file (expected columns {', '.join(DENSITY_COLUMNS)})")
    by_step: dict[int, list[tuple[int, float, float]]] = {}
    for fields in csv.reader(lines[1:]):
        if len(fields) != len(DENSITY_COLUMNS):
            raise RunDirError(f"{path}: a row has {len(fields)} fields, expected {len(DENSITY_COLUMNS)}")
        by_step.setdefault(int(fields[0]), []).append((int(fields[1]), float(fields[2]), float(fields[3])))
    out = {}
    for step, rows in by_step.items():
        probes = len({p for p, _, _ in rows})
        out[step] = (np.array([n for _, n, _ in rows]), np.array([w for _, _, w in rows]) / probes)
    return out
