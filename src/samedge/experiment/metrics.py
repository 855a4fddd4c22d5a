"""``metrics.csv`` (one row per measurement, written row by row) and ``summary.json``.

Rows are appended and flushed to disk one at a time, so a run killed at any moment leaves a
parseable file that lacks at most the row being written.  :func:`read_metrics` drops such a
partial last line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samedge.errors import RunDirError

__all__ = [
    "base_columns",
    "MetricsWriter",
    "truncate_metrics",
    "read_metrics",
    "summarize",
    "edge_reached_index",
    "write_json",
    "EDGE_REACHED_FRACTION",
]

EDGE_REACHED_FRACTION = 0.9


EVAL_COLUMNS = [
    "eval_sharpness",
    "eval_grad_norm",
    "eval_edge",
    "eval_sharpness_over_edge",
    "eval_eig_residual",
    "eval_eig_converged",
    "eval_hvps",
]


def base_columns(
    eig_k: int = 1,
    measure_perturbed: bool = False,
    test_each_measurement: bool = False,
    eval_batch: bool = False,
    trace: bool = False,
) -> list[str]:
    cols = ["step", "train_loss", "train_accuracy", "grad_norm", "sharpness"]
    cols += [f"lambda_{i}" for i in range(2, eig_k + 1)]
    cols += ["gd_edge", "sam_edge", "sharpness_over_edge", "grad_alignment", "sam_grad_alignment"]
    if measure_perturbed:
        cols.append("sharpness_perturbed")
    if test_each_measurement:
        cols += ["test_loss", "test_accuracy"]
    if eval_batch:
        cols += EVAL_COLUMNS
    if trace:
        cols += ["trace", "trace_stderr", "trace_hvps"]
    cols += ["eig_residual", "eig_converged", "hvps", "elapsed_s"]
    return cols


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping text: byte-identical for identical floats
    return str(value)


#: ``steps.csv``: one row per training step (the per-step secant sharpness, :mod:`samedge.core.secant`)
STEP_COLUMNS = ["step", "train_loss", "grad_norm", "edge", "sharpness_secant", "secant_residual"]


class MetricsWriter:
    """Appends rows to ``path``; the header is written when the file is new or empty.

    Each row is flushed to the operating system at once; with ``fsync_each_row`` (metrics.csv)
    it is also forced to disk, otherwise (steps.csv, a row per step) only at :meth:`sync`, which
    the runner calls before each checkpoint."""

    def __init__(self, path: str | Path, columns: Sequence[str], *, fsync_each_row: bool = True):
        self.path = Path(path)
        self.columns = list(columns)
        self.fsync_each_row = fsync_each_row
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", encoding="utf-8", newline="")
        if new:
            self._write_line(self.columns)

    def _write_line(self, values: Iterable[str]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        self._file.write(buf.getvalue())
        self._file.flush()
        if self.fsync_each_row:
            os.fsync(self._file.fileno())

    def sync(self) -> None:
        """Force the rows written so far to disk."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, row: dict[str, Any]) -> None:
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise KeyError(f"metrics row lacks column {missing[0]!r}")
        self._write_line(_format(row[c]) for c in self.columns)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse(value: str) -> float | None:
    if value == "":
        return None
    return float(value)


def read_metrics(path: str | Path) -> list[dict[str, float | None]]:
    """Rows of ``metrics.csv`` as dicts of floats (empty cells are None).  A last line cut off
    mid-write (no newline, or too few fields) is dropped."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    if not lines or not lines[0]:
        raise RunDirError(f"{path}: empty metrics file")
    complete = lines[:-1]  # the piece after the last newline is partial (or empty)
    reader = csv.reader(complete)
    header = next(reader)
    rows: list[dict[str, float | None]] = []
    for fields in reader:
        if len(fields) != len(header):
            raise RunDirError(f"{path}: row {len(rows) + 2} has {len(fields)} fields, header has {len(header)}")
        rows.append({name: _parse(v) for name, v in zip(header, fields)})
    return rows


def edge_reached_index(ratios: Sequence[float | None], fraction: float = EDGE_REACHED_FRACTION) -> int | None:
    """Index of the first measurement from which sharpness/edge is counted as tracking the edge.

    That is the first ratio ``>= fraction``.  A run that *starts* above ``1 / fraction`` (the
    Transformer's sharpness at initialization is tens of times its SAM-edge and collapses within
    a few steps) has not reached the edge from below: there the search starts at the first ratio
    back at or under ``1 / fraction``, so the initial transient is not counted as tracking.
    """
    finite = {i: q for i, q in enumerate(ratios) if q is not None and math.isfinite(q)}
    if not finite:
        return None
    first = next(iter(finite))
    start = 0
    if finite[first] > 1.0 / fraction:
        back = next((i for i, q in finite.items() if q <= 1.0 / fraction), None)
        if back is None:
            return None
        start = back
    return next((i for i, q in finite.items() if i >= start and q >= fraction), None)


def _ratio_stats(rows, column: str, fraction: float, prefix: str = "") -> dict[str, Any]:
    ratios = [r.get(column) for r in rows]
    reached = edge_reached_index(ratios, fraction)
    out: dict[str, Any] = {f"{prefix}edge_reached_step": None if reached is None else int(rows[reached]["step"])}
    if reached is None:
        out.update({f"{prefix}ratio_{k}": None for k in ("median", "q25", "q75", "iqr")})
        out[f"{prefix}ratio_rows"] = 0
        return out
    tail = np.array([q for q in ratios[reached:] if q is not None and math.isfinite(q)])
    q25, q50, q75 = np.percentile(tail, [25, 50, 75])
    out.update(
        {
            f"{prefix}ratio_median": float(q50),
            f"{prefix}ratio_q25": float(q25),
            f"{prefix}ratio_q75": float(q75),
            f"{prefix}ratio_iqr": float(q75 - q25),
            f"{prefix}ratio_rows": int(len(tail)),
        }
    )
    return out


def summarize(rows: list[dict[str, float | None]], *, fraction: float = EDGE_REACHED_FRACTION) -> dict[str, Any]:
    """Median and IQR of sharpness/edge from the measurement where the edge is reached
    (:func:`edge_reached_index`); the same for the evaluation batch's sharpness when recorded."""
    summary: dict[str, Any] = {"measurements": len(rows), "edge_reached_fraction": fraction}
    summary.update(_ratio_stats(rows, "sharpness_over_edge", fraction))
    ratios = [r["sharpness_over_edge"] for r in rows]
    first = next((q for q in ratios if q is not None and math.isfinite(q)), None)
    summary["started_above_edge"] = first is not None and first > 1.0 / fraction
    if rows and "eval_sharpness_over_edge" in rows[0]:
        summary.update(_ratio_stats(rows, "eval_sharpness_over_edge", fraction, prefix="eval_"))
    if rows:
        last = rows[-1]
        summary["final_step"] = int(last["step"] or 0)
        summary["final_train_loss"] = last["train_loss"]
        summary["final_train_accuracy"] = last["train_accuracy"]
        summary["final_sharpness"] = last["sharpness"]
        summary["final_edge"] = last["sam_edge"]
        summary["total_hvps"] = int(
            sum((r["hvps"] or 0) + (r.get("eval_hvps") or 0) + (r.get("trace_hvps") or 0) for r in rows)
        )
        summary["all_eigensolves_converged"] = all(
            r["eig_converged"] == 1 and r.get("eval_eig_converged", 1) == 1 for r in rows
        )
    return summary


def truncate_metrics(path: Path, before_step: int) -> None:
    """Keep the header and the complete rows with ``step < before_step`` (atomically)."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # the piece after the last newline is partial
    kept = lines[:1] + [ln for ln in lines[1:] if ln and float(ln.split(",", 1)[0]) < before_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(ln + "\n" for ln in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
