"""Sweeps: a grid (cartesian product) or list of runs, each in its own run directory inside one
sweep directory, run by an executor (:mod:`~samedge.experiment.sweeps.executors`) and summarized in
``sweep.csv``.

A sweep's *definition* is the task, the base settings (task preset < ``preset`` < ``config`` <
``base``), a ``grid`` of settings to vary (every combination) and explicit ``runs`` (each a small
table of settings).  Every point gets a name made of the settings it varies
(``rho0.05-seed1``) and a full :class:`RunConfig`; a point whose settings are refused
(``optimizer=gd`` with an explicit ``rho``) keeps its error and is recorded as failed without
stopping the others.

The sweep directory holds ``sweep.json`` (the definition and every point's settings),
``status.json`` (the outcome of failed points, and the job of points submitted to a scheduler),
``sweep.csv`` and one run directory per point.
What a point still needs is read from its run directory alone (:func:`run_state`): finished,
diverged, resumable from a checkpoint, or to be started.  So calling a sweep again skips the
finished runs, resumes the interrupted ones and starts the rest, whatever killed it.

A call over an existing sweep directory may *add* points: every point whose name is already
recorded must have identical settings, or the call is refused (``ConfigError``) naming the point
and the setting, before anything is run or written.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from samedge.errors import BadInput, ConfigError
from samedge.experiment.config import TASKS, RunConfig, build_config
from samedge.experiment.store.files import write_json
from samedge.experiment.store.layout import RunDir

__all__ = [
    "SweepSpec",
    "SweepPoint",
    "parse_grid_arg",
    "load_sweep_file",
    "point_name",
    "run_state",
    "prepare_sweep_dir",
    "sweep_rows",
    "write_sweep_csv",
    "is_sweep_dir",
    "SWEEP_FILE",
    "SWEEP_CSV",
    "STATUS_FILE",
    "SUMMARY_COLUMNS",
]

SWEEP_FILE = "sweep.json"
SWEEP_CSV = "sweep.csv"
STATUS_FILE = "status.json"
_FORMAT = 1

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
_FIELDS = {f.name: str(f.type).replace(" | None", "") for f in fields(RunConfig)}

#: columns of ``sweep.csv`` after the varied settings: the run's outcome and summary figures
SUMMARY_COLUMNS = [
    "name",
    "status",
    "reason",
    "optimizer",
    "eta",
    "rho",
    "steps_done",
    "edge_reached_step",
    "ratio_median",
    "ratio_q25",
    "ratio_q75",
    "ratio_iqr",
    "final_sharpness",
    "final_edge",
    "final_train_loss",
    "test_error",
    "total_hvps",
    "wall_s",
    "run_dir",
]


def parse_value(name: str, text: str) -> Any:
    """A setting's value typed on the command line, converted as the setting's type says."""
    if name == "task":
        raise ConfigError("'task' cannot be varied within a sweep; run one sweep per task")
    if name not in _FIELDS:
        raise ConfigError(f"unknown setting '{name}' in --grid; allowed: {', '.join(sorted(_FIELDS))}")
    kind = _FIELDS[name]
    text = text.strip()
    if text.lower() in ("none", "null") and "None" in str(next(f.type for f in fields(RunConfig) if f.name == name)):
        return None
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
    except ValueError:
        raise ConfigError(f"--grid {name}: {text!r} is not a valid {kind}") from None
    return text


def parse_grid_arg(arg: str) -> tuple[str, list[Any]]:
    """``"rho=0,0.05,0.1"`` -> ``("rho", [0.0, 0.05, 0.1])`` (``--grid`` accepts dashes too)."""
    name, sep, values = arg.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name or not values.strip():
        raise ConfigError(f"--grid {arg!r}: expected NAME=V1,V2,... (for example rho=0,0.05,0.1)")
    parsed = [parse_value(name, v) for v in values.split(",")]
    if len(set(map(repr, parsed))) != len(parsed):
        raise ConfigError(f"--grid {arg!r} repeats a value")
    return name, parsed


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def point_name(varied: Mapping[str, Any]) -> str:
    """``{"rho": 0.05, "seed": 1}`` -> ``"rho0.05-seed1"``; strings get a dash (``optimizer-gd``).
    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``."""
    if not varied:
        return "run"
    parts = []
    for k, v in varied.items():
        text = _fmt(v)
        parts.append(f"{k}-{text}" if isinstance(v, str) else f"{k}{text}")
    name = "-".join(parts)
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: its name, the settings it varies, and its configuration (or the
    reason its settings were refused)."""

    name: str
    varied: dict[str, Any]
    config: RunConfig | None
    error: str | None = None

    def settings(self) -> dict[str, Any]:
        """What the definition records for this point (compared on a later call)."""
        if self.config is not None:
            return self.config.to_dict()
        return {"varied": self.varied, "error": self.error}


@dataclass
class SweepSpec:
    """A sweep's definition: ``task``, base ``preset``/``config`` file/``base`` settings, a
    ``grid`` (name -> values, every combination) and explicit ``runs``."""

    task: str
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    preset: str | None = None
    config_file: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        for name in [*self.base, *self.grid, *(k for r in self.runs for k in r)]:
            if name == "task":
                raise ConfigError("'task' is the sweep's, not a setting to vary or override")
            if name not in _FIELDS:
                raise ConfigError(f"unknown setting '{name}' in the sweep; allowed: {', '.join(sorted(_FIELDS))}")
        for name, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid setting '{name}' needs a non-empty list of values")

    def points(self) -> list[SweepPoint]:
        """Every point: the grid's combinations (first setting slowest), then the explicit runs."""
        combos: list[dict[str, Any]] = []
        if self.grid or not self.runs:
            names = list(self.grid)
            combos += [dict(zip(names, values)) for values in itertools.product(*self.grid.values())]
        combos += [dict(r) for r in self.runs]
        points: list[SweepPoint] = []
        seen: dict[str, dict[str, Any]] = {}
        for varied in combos:
            name = point_name(varied)
            if name in seen:
                raise ConfigError(f"two points of the sweep are both named {name!r} ({seen[name]} and {varied})")
            seen[name] = varied
            try:
                cfg = build_config(
                    self.task,
                    preset=self.preset,
                    config_file=self.config_file,
                    overrides={**self.base, **varied},
                )
            except BadInput as err:
                points.append(SweepPoint(name, varied, None, str(err)))
            else:
                points.append(SweepPoint(name, varied, cfg))
        return points

    def varied_names(self) -> list[str]:
        out: list[str] = list(self.grid)
        for r in self.runs:
            out += [k for k in r if k not in out]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "preset": self.preset,
            "config_file": self.config_file,
            "base": self.base,
            "grid": self.grid,
            "runs": self.runs,
        }


def load_sweep_file(path: str | Path) -> SweepSpec:
    """A TOML sweep file::

    task = "mnist"
    preset = "mnist"          # optional, as ``--preset``
    [base]                    # settings of every run
    steps = 500
    [grid]                    # every combination of these
    rho = [0.05, 0.1, 0.2]
    seed = [0, 1]
    [[runs]]                  # optional explicit points, added to the grid's
    optimizer = "gd"
    eta = 0.8
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"sweep file {path} cannot be read: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"sweep file {path} is not valid TOML: {err}") from None
    allowed = {"task", "preset", "config", "base", "grid", "runs"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key '{unknown[0]}'; allowed: {', '.join(sorted(allowed))}")
    if not isinstance(data.get("task"), str):
        raise ConfigError(f'sweep file {path}: needs task = "{"|".join(TASKS)}"')
    base, grid, runs = data.get("base", {}), data.get("grid", {}), data.get("runs", [])
    if not isinstance(base, dict) or not isinstance(grid, dict) or not isinstance(runs, list):
        raise ConfigError(f"sweep file {path}: [base] and [grid] are tables, [[runs]] an array of tables")
    if not all(isinstance(r, dict) for r in runs):
        raise ConfigError(f"sweep file {path}: each [[runs]] entry is a table of settings")
    config = data.get("config")
    if config is not None:
        config = str((Path(path).parent / config).resolve())
    return SweepSpec(
        data["task"],
        dict(base),
        {k: v if not isinstance(v, list) else list(v) for k, v in grid.items()},
        list(runs),
        data.get("preset"),
        config,
    )


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def prepare_sweep_dir(out: Path, spec: SweepSpec, points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """Create or check ``out``; record the definition.  Returns every point recorded there (the
    earlier calls' and this call's).  A point already recorded under the same name with other
    settings is refused before anything is written."""
    recorded: dict[str, Any] = {}
    path = out / SWEEP_FILE
    if out.exists() and not out.is_dir():
        raise ConfigError(f"sweep directory {out} exists and is not a directory")
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            recorded = {p["name"]: p for p in saved["points"]}
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is not a readable sweep definition") from None
        if saved.get("task") != spec.task:
            raise ConfigError(f"{out} holds a {saved.get('task')} sweep, not {spec.task}; use another --out")
        for p in points:
            old = recorded.get(p.name)
            if old is not None and old["settings"] != _jsonable(p.settings()):
                key = next(
                    (
                        k
                        for k in sorted(set(old["settings"]) | set(p.settings()))
                        if old["settings"].get(k) != _jsonable(p.settings()).get(k)
                    ),
                    "settings",
                )
                raise ConfigError(
                    f"{out} already holds run {p.name!r} with {key} = {old['settings'].get(key)!r}, but this sweep "
                    f"gives {_jsonable(p.settings()).get(key)!r}; a sweep directory keeps one definition per run "
                    "name (use another --out)"
                )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not a sweep directory (no {SWEEP_FILE}); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    merged = dict(recorded)
    for p in points:
        merged[p.name] = {"name": p.name, "varied": p.varied, "settings": _jsonable(p.settings())}
    definitions = []
    if path.exists():
        definitions = json.loads(path.read_text(encoding="utf-8")).get("definitions", [])
    if spec.to_dict() not in definitions:
        definitions.append(_jsonable(spec.to_dict()))
    write_json(
        path, {"format": _FORMAT, "task": spec.task, "definitions": definitions, "points": list(merged.values())}
    )
    return [_point_from_record(spec.task, r) for r in merged.values()]


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d))


def _point_from_record(task: str, rec: dict[str, Any]) -> SweepPoint:
    settings = rec["settings"]
    if "error" in settings and "varied" in settings:
        return SweepPoint(rec["name"], rec["varied"], None, settings["error"])
    from samedge.experiment.config import from_mapping

    return SweepPoint(rec["name"], rec["varied"], from_mapping(settings))


def load_sweep_points(out: Path) -> list[SweepPoint]:
    saved = json.loads((out / SWEEP_FILE).read_text(encoding="utf-8"))
    return [_point_from_record(saved["task"], r) for r in saved["points"]]


def run_state(run_dir: Path) -> str:
    """What a point's run directory needs: ``done`` (finished), ``diverged`` (ended by a
    divergence; not resumed), ``resume`` (a checkpoint of an unfinished run), or ``start``."""
    summary = _read_json(RunDir(run_dir).summary)
    if summary is not None and summary.get("diverged"):
        return "diverged"
    if RunDir(run_dir).checkpoint.exists():
        if summary is not None and not summary.get("interrupted") and _checkpoint_finished(run_dir):
            return "done"
        return "resume"
    return "start"


def _checkpoint_finished(run_dir: Path) -> bool:
    import torch

    try:
        payload = torch.load(RunDir(run_dir).checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # a damaged checkpoint: the run's resume reports it
        return False
    return isinstance(payload, dict) and bool(payload.get("finished"))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_status(out: Path) -> dict[str, dict[str, Any]]:
    return _read_json(out / STATUS_FILE) or {}


def record_status(out: Path, name: str, outcome: dict[str, Any] | None) -> None:
    """Record (or, with ``None``, clear) the outcome of a point that has no summary of its own."""
    status = read_status(out)
    if outcome is None:
        status.pop(name, None)
    else:
        status[name] = outcome
    write_json(out / STATUS_FILE, status)


def sweep_rows(out: Path, points: Iterable[SweepPoint] | None = None) -> list[dict[str, Any]]:
    """One row per point: its varied settings, status and the run's summary figures."""
    points = list(points) if points is not None else load_sweep_points(out)
    status = read_status(out)
    varied: list[str] = []
    for p in points:
        varied += [k for k in p.varied if k not in varied]
    rows = []
    for p in points:
        run_dir = out / p.name
        row: dict[str, Any] = {k: p.varied.get(k) for k in varied}
        summary = _read_json(RunDir(run_dir).summary) or {}
        state = run_state(run_dir) if p.config is not None else "failed"
        recorded = status.get(p.name, {})
        if p.error is not None:
            st, reason = "failed", p.error
        elif recorded.get("status") in ("failed", "error"):
            st, reason = recorded["status"], recorded.get("reason", "")
        elif state == "done":
            st, reason = "done", ""
        elif state == "diverged":
            st, reason = "diverged", f"step {summary.get('diverged_step')}: {summary.get('reason', '')}"
        elif recorded.get("status") == "submitted":  # left to a scheduler's job (submitit --no-wait)
            st, reason = "submitted", recorded.get("reason", "")
        elif state == "resume":
            st, reason = "interrupted", f"checkpoint at step {summary.get('final_step', '?')}" if summary else ""
        else:
            st, reason = "pending", ""
        cfg = p.config
        row.update(
            name=p.name,
            status=st,
            reason=reason,
            optimizer=cfg.optimizer if cfg else p.varied.get("optimizer"),
            eta=cfg.eta if cfg else p.varied.get("eta"),
            rho=cfg.rho if cfg else p.varied.get("rho"),
            steps_done=summary.get("final_step"),
            edge_reached_step=summary.get("edge_reached_step"),
            ratio_median=summary.get("ratio_median"),
            ratio_q25=summary.get("ratio_q25"),
            ratio_q75=summary.get("ratio_q75"),
            ratio_iqr=summary.get("ratio_iqr"),
            final_sharpness=summary.get("final_sharpness"),
            final_edge=summary.get("final_edge"),
            final_train_loss=summary.get("final_train_loss"),
            test_error=summary.get("test_error"),
            total_hvps=summary.get("total_hvps"),
            wall_s=summary.get("elapsed_s"),
            run_dir=p.name,
        )
        rows.append(row)
    return rows


def write_sweep_csv(out: Path, points: Iterable[SweepPoint] | None = None) -> Path:
    """``sweep.csv`` (atomically): one row per point."""
    rows = sweep_rows(out, points)
    # the varied settings first (one named like a summary column, eta or rho, only there)
    columns = list(rows[0]) if rows else SUMMARY_COLUMNS
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(v) for k, v in r.items()})
    path = out / SWEEP_CSV
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
