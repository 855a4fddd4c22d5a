"""``density.csv``: the SLQ spectral density's quadrature nodes and weights, one line per node with
positive weight (columns ``step, probe, node, weight``), appended and fsynced per reading."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from samedge.core.spectrum import SpectralDensity
from samedge.errors import RunDirError
from samedge.experiment.store.layout import RunDir
from samedge.experiment.store.metrics import truncate_metrics

__all__ = ["DensityWriter", "read_density", "DENSITY_FILE", "DENSITY_COLUMNS"]

DENSITY_FILE = RunDir.DENSITY
DENSITY_COLUMNS = ["step", "probe", "node", "weight"]


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
