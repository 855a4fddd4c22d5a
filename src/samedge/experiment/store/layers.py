"""``layers.csv``: where the top eigenvector lies, one line per block per reading, appended and
fsynced per reading (a reading cut off by a kill is dropped on resume), truncated to the
checkpoint's step on resume.

Columns: ``step, block, params`` (the block's parameter count), ``mass`` (``||v_1[B]||^2``; the
masses of a reading sum to 1), ``rayleigh_share`` (``v_1[B]^T (H v_1)[B] / lambda_1``; they sum to
1), and at readings with a block eigen-solve (``layer_sharpness_every``): ``sharpness``
(``lambda_max(H_BB)``), ``sharpness_over_top`` (its ratio to the reading's ``lambda_1``),
``eig_residual`` (relative), ``eig_converged``, ``hvps`` (the block solve's) and ``interlacing``
(1 where ``lambda_max(H_BB) <= lambda_1 + residual`` holds, 0 where the readings contradict it);
those cells are empty at other readings.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samedge.errors import RunDirError
from samedge.experiment.store.files import with_path
from samedge.experiment.store.layout import RunDir
from samedge.experiment.store.metrics import _format, truncate_metrics

__all__ = ["LayersWriter", "read_layers", "LAYERS_FILE", "LAYERS_COLUMNS"]

LAYERS_FILE = RunDir.LAYERS
LAYERS_COLUMNS = [
    "step",
    "block",
    "params",
    "mass",
    "rayleigh_share",
    "sharpness",
    "sharpness_over_top",
    "eig_residual",
    "eig_converged",
    "hvps",
    "interlacing",
]


class LayersWriter:
    """Appends a reading's block rows to ``layers.csv`` with one write and fsync."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / LAYERS_FILE
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", encoding="utf-8", newline="")
        if new:
            self._append([LAYERS_COLUMNS])

    def _append(self, rows: Sequence[Sequence[Any]]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        try:
            self._file.write(buf.getvalue())
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as err:
            raise with_path(err, self.path) from None

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        self._append([[_format(row.get(c)) for c in LAYERS_COLUMNS] for row in rows])

    def close(self) -> None:
        self._file.close()


def read_layers(path: str | Path) -> list[dict[str, Any]]:
    """``layers.csv`` as rows (``block`` a string, the rest floats or None); a last line cut off
    mid-write is ignored."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]
    if not lines or lines[0].split(",")[:2] != LAYERS_COLUMNS[:2]:
        raise RunDirError(f"{path}: not a layers file (expected columns {', '.join(LAYERS_COLUMNS)})")
    header = next(csv.reader(lines[:1]))
    rows = []
    for fields in csv.reader(lines[1:]):
        if len(fields) != len(header):
            raise RunDirError(f"{path}: a row has {len(fields)} fields, expected {len(header)}")
        row: dict[str, Any] = {}
        for name, value in zip(header, fields):
            row[name] = value if name == "block" else (float(value) if value != "" else None)
        rows.append(row)
    return rows
