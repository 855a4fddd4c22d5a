"""``metrics.csv`` (one row per measurement, written row by row) and ``summary.json``.

Rows are appended and flushed to disk one at a time, so a run killed at any moment leaves a
parseable file that lacks at most the row being written.  :func:`read_metrics` drops such a
partial last line.  Each checkpoint carries the file's text up to its step, so a resume restores
a missing, cut or damaged ``metrics.csv`` exactly (:func:`restore_metrics`); ``summary.json`` is
never replaced by one computed from fewer rows (:func:`write_summary`).
"""

from __future__ import annotations

import contextlib
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
from samedge.experiment.store.files import atomic_write, with_path, write_json

__all__ = [
    "base_columns",
    "MetricsWriter",
    "truncate_metrics",
    "metrics_prefix",
    "restore_metrics",
    "expected_steps",
    "read_metrics",
    "write_summary",
    "summarize",
    "edge_reached_index",
    "EDGE_REACHED_FRACTION",
    "STARTED_ABOVE_FACTOR",
]

EDGE_REACHED_FRACTION = 0.9
# A run whose first sharpness/edge is above this started far above its edge (the Transformer's is
# tens of times its SAM-edge at initialization) and is counted from when it comes back under it.
# A start up to 20% above is a start at the edge: a GD run on CIFAR-10 starts at 1.11-1.20 x 2/eta
# and hovers from the first reading, within the band in which runs at the edge oscillate.
STARTED_ABOVE_FACTOR = 1.2


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
    *,
    preconditioned: bool = False,
    effective: bool = False,
) -> list[str]:
    """The columns of ``metrics.csv``.  A preconditioned base (adam, adamw, rmsprop) adds
    ``preconditioned_sharpness`` (and, with SAM/USAM, ``effective_sharpness``) after ``sharpness``
    and their HVP counts; ``gd_edge`` and ``sam_edge`` are then the threshold on that quantity."""
    cols = ["step", "train_loss", "train_accuracy", "grad_norm", "sharpness"]
    cols += [f"lambda_{i}" for i in range(2, eig_k + 1)]
    if preconditioned:
        cols.append("preconditioned_sharpness")
    if effective:
        cols.append("effective_sharpness")
    cols += ["gd_edge", "sam_edge", "sharpness_over_edge", "grad_alignment", "sam_grad_alignment"]
    if measure_perturbed:
        cols.append("sharpness_perturbed")
    if test_each_measurement:
        cols += ["test_loss", "test_accuracy"]
    if eval_batch:
        cols += EVAL_COLUMNS
    if trace:
        cols += ["trace", "trace_stderr", "trace_hvps"]
    cols += ["eig_residual", "eig_bound", "eig_converged", "hvps"]
    if preconditioned:
        cols.append("preconditioned_hvps")
    if effective:
        cols.append("effective_hvps")
    cols.append("elapsed_s")
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
        existing = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        self._pieces = [existing] if existing else []  # the file's text so far, in pieces
        self._file = open(self.path, "a", encoding="utf-8", newline="")
        if not existing:
            self._write_line(self.columns)

    @property
    def text(self) -> str:
        """The file's text so far (checkpoints carry its rows before their step)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _write_line(self, values: Iterable[str]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        try:
            self._file.write(buf.getvalue())
            self._file.flush()
            if self.fsync_each_row:
                os.fsync(self._file.fileno())
        except OSError as err:
            raise with_path(err, self.path) from None
        self._pieces.append(buf.getvalue())

    def sync(self) -> None:
        """Force the rows written so far to disk."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as err:
            raise with_path(err, self.path) from None

    def rows_before(self, step: int) -> str:
        """The header and the rows with ``step`` below ``step``, as text."""
        prefix = metrics_prefix(self.text, step)
        assert prefix is not None, "the writer's own text is well formed"
        return prefix

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


def read_metrics(path: str | Path, required: Sequence[str] = ("step",)) -> list[dict[str, float | None]]:
    """Rows of ``metrics.csv`` (or ``steps.csv``) as dicts of floats (empty cells are None).  A last
    line cut off mid-write (no newline, or too few fields) is dropped.  Any other damage (not
    UTF-8 text, a cell that is not a number, a row of the wrong length, a ``required`` column
    missing) is one :class:`RunDirError` naming the file and the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RunDirError(f"{path} is damaged (not UTF-8 text)") from None
    lines = text.split("\n")
    if not lines or not lines[0]:
        raise RunDirError(f"{path}: empty metrics file")
    complete = lines[:-1]  # the piece after the last newline is partial (or empty)
    try:
        reader = csv.reader(complete)
        header = next(reader, None) or []
        missing = [c for c in required if c not in header]
        if missing:
            raise RunDirError(f"{path} is damaged or not samedge's: no {', '.join(missing)} column")
        rows: list[dict[str, float | None]] = []
        for fields in reader:
            if len(fields) != len(header):
                raise RunDirError(f"{path}: row {len(rows) + 2} has {len(fields)} fields, header has {len(header)}")
            try:
                rows.append({name: _parse(v) for name, v in zip(header, fields)})
            except ValueError:
                raise RunDirError(f"{path}: row {len(rows) + 2} holds a value that is not a number") from None
    except csv.Error as err:
        raise RunDirError(f"{path} is damaged ({err})") from None
    return rows


def edge_reached_index(ratios: Sequence[float | None], fraction: float = EDGE_REACHED_FRACTION) -> int | None:
    """Index of the first measurement from which sharpness/edge is counted as tracking the edge.

    That is the first ratio ``>= fraction``.  A run that *starts* above ``STARTED_ABOVE_FACTOR``
    (the Transformer's sharpness at initialization is tens of times its SAM-edge and collapses
    within a few steps) has not reached the edge from below: there the search starts at the first
    ratio back at or under ``STARTED_ABOVE_FACTOR``, so the initial transient is not counted as
    tracking.
    """
    finite = {i: q for i, q in enumerate(ratios) if q is not None and math.isfinite(q)}
    if not finite:
        return None
    first = next(iter(finite))
    start = 0
    if finite[first] > STARTED_ABOVE_FACTOR:
        back = next((i for i, q in finite.items() if q <= STARTED_ABOVE_FACTOR), None)
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
    summary["started_above_edge"] = first is not None and first > STARTED_ABOVE_FACTOR
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


def metrics_prefix(text: str, before_step: float) -> str | None:
    """The header and the complete rows of ``text`` with ``step < before_step``; None if the text
    has no header or a complete row whose step cannot be read or whose field count is wrong."""
    lines = text.split("\n")[:-1]  # the piece after the last newline is partial
    if not lines or not lines[0]:
        return None
    width = len(next(csv.reader(lines[:1])))
    kept = lines[:1]
    for line in lines[1:]:
        fields = next(csv.reader([line]), [])
        try:
            step = float(fields[0])
        except (ValueError, IndexError):
            return None
        if len(fields) != width:
            return None
        if step < before_step:
            kept.append(line)
    return "".join(line + "\n" for line in kept)


def _steps(text: str) -> list[int]:
    return [int(float(line.split(",", 1)[0])) for line in text.split("\n")[1:-1]]


def expected_steps(before_step: int, steps: int, measure_every: int) -> list[int]:
    """The measured steps below ``before_step`` of a run of ``steps`` steps."""
    return [t for t in range(min(before_step, steps + 1)) if t % measure_every == 0 or t == steps]


def restore_metrics(path: Path, before_step: int, saved: str | None, expected: list[int]) -> str | None:
    """Make ``path`` hold exactly the rows a resume from ``before_step`` continues from.

    ``saved`` is the text the checkpoint carries (None for a checkpoint of an earlier samedge).
    Rows at and after ``before_step`` are dropped; if the rows before it are missing, cut or
    differ from ``saved``, the file is rewritten from ``saved``.  Without ``saved``, rows that do
    not cover the ``expected`` steps cannot be restored: :class:`RunDirError` names the missing
    steps and nothing is changed.  Returns a note for the user when the file was rebuilt."""
    text = None
    with contextlib.suppress(FileNotFoundError, UnicodeDecodeError):
        text = path.read_text(encoding="utf-8")
    prefix = None if text is None else metrics_prefix(text, before_step)
    if saved is not None and prefix != saved:
        atomic_write(path, saved.encode("utf-8"))
        what = "is missing" if text is None else "does not match the checkpoint (cut or damaged)"
        return f"{path} {what}: restored its {len(_steps(saved))} rows before step {before_step} from the checkpoint"
    if prefix is None and text is None and not expected:
        return None  # nothing measured yet: the writer starts the file
    if prefix is None:
        what = "is missing" if text is None else "is damaged"
        raise RunDirError(
            f"{path} {what} and the checkpoint (from an earlier samedge) does not carry its rows; "
            f"steps {_ranges(expected)} cannot be restored"
        )
    missing = sorted(set(expected) - set(_steps(prefix)))
    if missing:
        raise RunDirError(
            f"{path} lacks the rows of steps {_ranges(missing)} and the checkpoint (from an earlier samedge) "
            "does not carry them; nothing was changed"
        )
    if prefix != text:
        atomic_write(path, prefix.encode("utf-8"))
    return None


def _ranges(steps: list[int]) -> str:
    if not steps:
        return "(none)"
    return f"{steps[0]}-{steps[-1]}" if len(steps) > 2 else ", ".join(map(str, steps))


def truncate_metrics(path: Path, before_step: int) -> None:
    """Keep the header and the complete rows with ``step < before_step`` (atomically)."""
    if not path.exists():
        return
    prefix = metrics_prefix(path.read_text(encoding="utf-8"), before_step)
    if prefix is None:
        raise RunDirError(f"{path} is damaged (a row without a readable step or with the wrong number of fields)")
    atomic_write(path, prefix.encode("utf-8"))


def write_summary(path: str | Path, summary: dict[str, Any]) -> bool:
    """Write ``summary.json`` unless the one there was computed from more rows (returns False then)."""
    path = Path(path)
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        old = json.loads(path.read_text(encoding="utf-8")).get("measurements")
        if isinstance(old, int) and old > int(summary.get("measurements", 0)):
            return False
    write_json(path, summary)
    return True
