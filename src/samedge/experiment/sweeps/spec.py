"""Sweeps: a grid (cartesian product) or list of runs, each in its own run directory inside one
sweep directory, run by an executor (:mod:`~samedge.experiment.sweeps.executors`) and summarized in
``sweep.csv``.

A sweep's *definition* is the task, the base settings (task preset < ``preset`` < ``config`` <
``base``), a ``grid`` of settings to vary (every combination) and explicit ``runs`` (each a small
table of settings).  Every point gets a name made of the settings it varies
(``rho0.05-seed1``) and a full :class:`RunConfig`, whose ``threads`` is 1 unless the settings say
otherwise (``--threads-per-run``): the thread count is part of what makes a run reproducible.  A
point whose settings are refused (``optimizer=gd`` with an explicit ``rho``) keeps its error and
is reported failed without stopping the others; a definition none of whose points can run (a
missing config file, a bad base setting) is refused whole.

The sweep directory (:class:`~samedge.experiment.sweeps.sweepdir.SweepDir`) holds ``sweep.json``
(the definitions and every runnable point's settings), ``status.json`` (the outcome of points
that failed while running, and the job of points submitted to a scheduler), ``sweep.csv`` and one run directory per point.  What a point still
needs is read from its run directory alone (:func:`point_state`): finished, diverged, being run
by another process, resumable from a checkpoint, damaged, or to be started.  So calling a sweep
again skips the finished runs, resumes the interrupted ones and starts the rest, whatever killed
it; and a point's status in ``sweep.csv`` comes from its run directory first, a record of
``status.json`` only while the run directory is as the failure left it.

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
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from samedge.errors import BadInput, ConfigError
from samedge.experiment.config import TASKS, RunConfig, build_config, from_mapping, load_preset, load_toml
from samedge.experiment.store.layout import RunDir
from samedge.experiment.store.lock import lock_holder
from samedge.experiment.sweeps.sweepdir import SweepDir

__all__ = [
    "SweepSpec",
    "SweepPoint",
    "parse_grid_arg",
    "load_sweep_file",
    "point_name",
    "run_state",
    "point_state",
    "PointState",
    "prepare_sweep_dir",
    "sweep_rows",
    "write_sweep_csv",
    "is_sweep_dir",
    "SWEEP_FILE",
    "SWEEP_CSV",
    "STATUS_FILE",
    "SUMMARY_COLUMNS",
]

SWEEP_FILE = SweepDir.DEFINITION
SWEEP_CSV = SweepDir.CSV
STATUS_FILE = SweepDir.STATUS
_FORMAT = 1
#: torch threads of a sweep's runs unless their settings say (``--threads-per-run``)
DEFAULT_THREADS = 1

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
        clash = [name for name in self.grid if name in self.base]
        if clash:
            raise ConfigError(
                f"setting '{clash[0]}' is both fixed (base: {self.base[clash[0]]!r}) and varied (grid); give it in one"
            )

    def points(self) -> list[SweepPoint]:
        """Every point: the grid's combinations (first setting slowest), then the explicit runs.
        Refused (:class:`ConfigError`) when no point can run: the definition itself is wrong."""
        if self.preset is not None:  # what every point reads: its errors are the definition's
            load_preset(self.preset)
        if self.config_file is not None:
            load_toml(self.config_file)
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
                if cfg.threads is None:
                    cfg = cfg.replace(threads=DEFAULT_THREADS)
                points.append(SweepPoint(name, varied, cfg))
        if points and all(p.config is None for p in points):
            first = points[0]
            raise ConfigError(first.error if len(points) == 1 else f"no run of the sweep can run: {first.error}")
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
    clash = [name for name in grid if name in base]
    if clash:
        raise ConfigError(f"sweep file {path}: setting '{clash[0]}' is in both [base] and [grid]; give it in one")
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
    return SweepDir(path).is_sweep()


def prepare_sweep_dir(out: Path, spec: SweepSpec, points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """Create or check ``out``; record the definition.  Returns every point of the sweep: those
    recorded there (the earlier calls' and this call's runnable ones) and this call's refused
    ones (reported, never recorded: a later call that does not give them does not carry them).
    A point already recorded under the same name with other settings is refused before anything
    is written; the check is made again under the sweep's lock before ``sweep.json`` is written,
    so two calls at once cannot record two definitions of one run."""
    sweep = SweepDir(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"sweep directory {out} exists and is not a directory")
    _check_definition(sweep, spec, points)  # reads only: a refused call writes nothing
    out.mkdir(parents=True, exist_ok=True)
    with sweep.locked():
        saved = _check_definition(sweep, spec, points) or {}
        recorded = {r["name"]: r for r in saved.get("points", []) if not _refused_record(r)}
        order: dict[str, SweepPoint | dict[str, Any]] = dict(recorded)
        for p in points:
            if p.config is not None:
                order[p.name] = {"name": p.name, "varied": p.varied, "settings": _jsonable(p.settings())}
            elif p.name not in order:
                order[p.name] = p
        definitions = list(saved.get("definitions", []))
        if _jsonable(spec.to_dict()) not in definitions:
            definitions.append(_jsonable(spec.to_dict()))
        sweep.write_definition(
            {
                "format": _FORMAT,
                "task": spec.task,
                "definitions": definitions,
                "points": [r for r in order.values() if isinstance(r, dict)],
            }
        )
    return [r if isinstance(r, SweepPoint) else _point_from_record(spec.task, r) for r in order.values()]


def _check_definition(sweep: SweepDir, spec: SweepSpec, points: Sequence[SweepPoint]) -> dict[str, Any] | None:
    """The saved definition, after checking that this call agrees with it (``None``: none yet)."""
    out = sweep.path
    if not out.is_dir():
        return None
    saved = sweep.read_definition()
    if saved is None:
        if not sweep.is_empty():
            raise ConfigError(f"{out} exists and is not a sweep directory (no {SWEEP_FILE}); use another --out")
        return None
    if saved.get("task") != spec.task:
        raise ConfigError(f"{out} holds a {saved.get('task')} sweep, not {spec.task}; use another --out")
    recorded = {r["name"]: r for r in saved["points"]}
    for p in points:
        old = recorded.get(p.name)
        if old is None or _refused_record(old):
            continue
        if p.config is None:
            raise ConfigError(
                f"{out} already holds run {p.name!r}, but this sweep's settings for it are refused: {p.error}"
            )
        new = _jsonable(p.settings())
        # a setting the record lacks was added to samedge since; its default keeps the old behaviour
        changed = [k for k in old["settings"] if old["settings"][k] != new.get(k)]
        if changed:
            key, was, now = changed[0], old["settings"][changed[0]], new.get(changed[0])
            hint = "use another --out"
            if key == "threads":
                hint = (
                    f"its runs use {was} torch thread(s) per run, and a run resumed on another count would equal "
                    f"neither: give --threads-per-run {was} or use another --out"
                )
            raise ConfigError(
                f"{out} already holds run {p.name!r} with {key} = {was!r}, but this sweep gives {now!r}; a sweep "
                f"directory keeps one definition per run name ({hint})"
            )
    return saved


def _refused_record(rec: dict[str, Any]) -> bool:
    """A point recorded by an earlier samedge with refused settings (no longer recorded)."""
    settings = rec.get("settings")
    return isinstance(settings, dict) and "error" in settings and "varied" in settings


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d))


def _point_from_record(task: str, rec: dict[str, Any]) -> SweepPoint:
    return SweepPoint(rec["name"], rec["varied"], from_mapping(rec["settings"], where=f"{SWEEP_FILE} settings"))


def load_sweep_points(out: Path) -> list[SweepPoint]:
    saved = SweepDir(out).read_definition()
    if saved is None:
        raise ConfigError(f"{out} is not a sweep directory (no {SWEEP_FILE})")
    return [_point_from_record(saved["task"], r) for r in saved["points"] if not _refused_record(r)]


@dataclass(frozen=True)
class PointState:
    """What a point's run directory says: ``state`` is ``done`` (finished and intact),
    ``diverged`` (ended by a divergence; not resumed), ``running`` (another process holds its
    lock), ``resume`` (a checkpoint of an unfinished or damaged run), ``damaged`` (its
    ``config.json`` is unreadable or holds other settings: ``reason`` says which), or ``start``."""

    state: str
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)


def point_state(run_dir: str | Path, settings: Mapping[str, Any] | None = None) -> PointState:
    """Read ``run_dir`` (never write it) for what its point needs; with ``settings``, its
    ``config.json`` must hold them (a setting it lacks was added since and is not compared)."""
    files = RunDir(run_dir)
    holder = lock_holder(files.path)
    if holder is not None:
        return PointState("running", f"being run by another process (pid {holder})")
    if not files.path.is_dir():
        return PointState("start")
    summary = _read_json(files.summary)
    problem = _config_problem(files, settings)
    if problem is not None:
        return PointState("damaged", problem, summary or {})
    if summary is not None and summary.get("diverged"):
        return PointState("diverged", "", summary)
    if files.checkpoint.exists():
        if summary is not None and not summary.get("interrupted") and _checkpoint_finished(files.checkpoint):
            return PointState("done", "", summary)
        return PointState("resume", "", summary or {})
    if files.previous_checkpoint.exists():  # killed between a checkpoint's two renames
        return PointState("resume", "", summary or {})
    return PointState("start", "", summary or {})


def run_state(run_dir: str | Path, settings: Mapping[str, Any] | None = None) -> str:
    """:func:`point_state`'s ``state`` alone."""
    return point_state(run_dir, settings).state


def _config_problem(files: RunDir, settings: Mapping[str, Any] | None) -> str | None:
    """Why ``config.json`` cannot vouch for the run (``None``: it can, or nothing was written)."""
    if not files.config.exists():
        if files.checkpoint.exists() or files.previous_checkpoint.exists() or files.summary.exists():
            return f"{files.config} is missing; remove {files.path} to run the point again"
        return None
    try:
        saved = files.read_record()["config"]
    except BadInput as err:
        return f"{err}; remove {files.path} to run the point again"
    except OSError as err:
        return f"{files.config} cannot be read ({err.strerror or err})"
    if settings is not None:
        wanted = _jsonable(dict(settings))
        changed = [k for k in saved if k in wanted and saved[k] != wanted[k]]
        if changed:
            k = changed[0]
            return f"{files.config} holds {k} = {saved[k]!r}, not this point's {wanted[k]!r}"
    return None


# checkpoint path -> (its stat signature, whether it is a verified, finished checkpoint)
_FINISHED: dict[str, tuple[tuple[int, int, int], bool]] = {}


def _checkpoint_finished(path: Path) -> bool:
    """Whether ``path`` is an intact checkpoint (its digest checked) of a finished run; cached by
    the file's identity, size and time so that a sweep reads each checkpoint once."""
    from samedge.experiment.store.checkpoint import read_checkpoint

    try:
        st = path.stat()
    except OSError:
        return False
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _FINISHED.get(str(path))
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        finished = bool(read_checkpoint(path).get("finished"))
    except (BadInput, OSError):  # damaged: a resume falls back to the previous one, or says why not
        finished = False
    _FINISHED[str(path)] = (key, finished)
    return finished


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_status(out: Path) -> dict[str, dict[str, Any]]:
    return SweepDir(out).read_status()


def record_status(out: Path, name: str, outcome: dict[str, Any] | None) -> None:
    """Record (or, with ``None``, clear) the outcome of a point that failed while running, with
    the state its run directory was left in (the record holds only while it stays so)."""
    if outcome is not None and "state" not in outcome:
        outcome = {**outcome, "state": run_state(Path(out) / name)}
    SweepDir(out).record_status(name, outcome)


def point_status(point: SweepPoint, state: PointState, record: Mapping[str, Any] | None) -> tuple[str, str]:
    """A point's ``(status, reason)`` in ``sweep.csv``: what its run directory says first; a
    record of ``status.json`` only while the run directory is in the state the failure left."""
    summary = state.summary
    if point.error is not None:
        return "failed", point.error
    if state.state in ("done", "running"):
        return state.state, state.reason
    if state.state == "diverged":
        return "diverged", f"step {summary.get('diverged_step')}: {summary.get('reason', '')}"
    if state.state == "damaged":
        return "failed", state.reason
    if record and record.get("status") in ("failed", "error") and record.get("state", state.state) == state.state:
        return record["status"], str(record.get("reason", ""))
    if record and record.get("status") == "submitted":  # left to a scheduler's job (submitit --no-wait)
        return "submitted", str(record.get("reason", ""))
    if state.state == "resume":
        return "interrupted", f"checkpoint at step {summary.get('final_step', '?')}" if summary else ""
    return "pending", ""


def sweep_rows(out: Path, points: Iterable[SweepPoint] | None = None) -> list[dict[str, Any]]:
    """One row per point: its varied settings, status and the run's summary figures."""
    points = list(points) if points is not None else load_sweep_points(out)
    status = read_status(out)
    varied: list[str] = []
    for p in points:
        varied += [k for k in p.varied if k not in varied]
    rows = []
    for p in points:
        row: dict[str, Any] = {k: p.varied.get(k) for k in varied}
        state = point_state(out / p.name, p.settings()) if p.config is not None else PointState("start")
        summary = state.summary
        st, reason = point_status(p, state, status.get(p.name))
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
    """``sweep.csv`` (atomically, read and written under the sweep's lock so that the last writer
    wrote the latest state): one row per point."""
    sweep = SweepDir(out)
    with sweep.locked():
        rows = sweep_rows(out, points)
        # the varied settings first (one named like a summary column, eta or rho, only there)
        columns = list(rows[0]) if rows else SUMMARY_COLUMNS
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(v) for k, v in r.items()})
        return sweep.write_csv(buf.getvalue())


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
