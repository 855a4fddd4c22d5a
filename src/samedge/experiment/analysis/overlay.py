"""Figures that overlay runs (``samedge compare RUN_DIR... | SWEEP_DIR``), drawn from each run's
``metrics.csv``, ``config.json`` and ``summary.json`` alone:

* ``compare_sharpness.png``: each run's sharpness (solid) with its SAM-edge (dashed, same
  colour; SAM and USAM runs) and each distinct GD edge ``2/eta`` (dotted, grey);
* ``compare_ratio.png``: each run's sharpness/edge over steps, with 1 and the 0.9-1.1 band;
* ``compare_vs_<setting>.png``: final sharpness, test error and median sharpness/edge (after the
  edge is reached) against the first varied setting other than ``seed``: the median over seeds
  with the spread (min to max) as error bars, one series per value of the other varied settings.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from samedge.core.method import Method  # noqa: E402
from samedge.errors import ConfigError, RunDirError  # noqa: E402
from samedge.experiment.config import RunConfig  # noqa: E402
from samedge.experiment.store.files import read_json_object  # noqa: E402
from samedge.experiment.store.layout import RunDir  # noqa: E402
from samedge.experiment.store.metrics import read_metrics  # noqa: E402
from samedge.experiment.sweeps.spec import is_sweep_dir, load_sweep_points  # noqa: E402

__all__ = ["overlay_runs", "load_runs", "ComparedRun", "varied_settings"]

#: settings that never count as varied (where a run's files are, how it is placed)
_NOT_VARIED = {"data", "device", "checkpoint_every"}


@dataclass
class ComparedRun:
    """One run as the overlay figures and the report read it: its settings, rows and summary."""

    name: str
    path: Path
    settings: RunConfig
    rows: list[dict[str, float | None]]
    summary: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.settings.to_dict()

    @property
    def method(self) -> Method:
        return self.settings.method()


def _load_run(path: Path, name: str) -> ComparedRun | None:
    files = RunDir(path)
    if not files.metrics.exists():
        return None
    rows = read_metrics(files.metrics, required=("step", "sharpness"))
    if not rows:
        return None
    settings = files.read_config()
    summary = read_json_object(files.summary, "summary") if files.summary.exists() else {}
    return ComparedRun(name, path, settings, rows, summary)


def load_runs(dirs: Sequence[str | Path]) -> tuple[list[ComparedRun], list[str], Path | None]:
    """The runs named by ``dirs`` (run directories, or one sweep directory), the settings they
    vary and the sweep directory (or None).  Runs without measurements yet are left out."""
    paths = [Path(d) for d in dirs]
    for p in paths:
        if not p.is_dir():
            raise RunDirError(f"{p} is not a directory")
    if len(paths) == 1 and is_sweep_dir(paths[0]):
        sweep = paths[0]
        points = load_sweep_points(sweep)
        runs = [r for p in points if (r := _load_run(sweep / p.name, p.name)) is not None]
        varied: list[str] = []
        for point in points:
            varied += [k for k in point.varied if k not in varied]
        if not runs:
            raise RunDirError(f"sweep {sweep} has no run with measurements yet")
        return runs, varied, sweep
    if any(is_sweep_dir(p) for p in paths):
        raise ConfigError("give either one sweep directory or run directories, not both")
    runs = []
    for p in paths:
        r = _load_run(p, p.name)
        if r is None:
            raise RunDirError(f"{p} has no metrics.csv with measurements; is it a samedge run directory?")
        runs.append(r)
    tasks = sorted({r.settings.task for r in runs})
    if len(tasks) > 1:  # one axis of sharpness or of rho cannot hold an MLP on MNIST and a CNN on CIFAR-10
        raise ConfigError(f"the runs are of different tasks ({', '.join(tasks)}); compare each task's runs apart")
    return runs, varied_settings([r.config for r in runs]), None


def varied_settings(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Settings whose values differ between the configurations, in the configurations' order."""
    keys: list[str] = []
    for c in configs:
        keys += [k for k in c if k not in keys]
    return [k for k in keys if k not in _NOT_VARIED and len({json.dumps(c.get(k)) for c in configs}) > 1]


def _series(rows, column: str) -> list[float]:
    return [math.nan if r.get(column) is None else float(r[column]) for r in rows]


def overlay_runs(dirs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Draw the comparison figures; returns the files written."""
    runs, varied, sweep = load_runs(dirs)
    folder = Path(out) if out is not None else (sweep / "compare" if sweep is not None else Path("compare"))
    folder.mkdir(parents=True, exist_ok=True)
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    gd_edges: dict[float, str] = {}
    for i, r in enumerate(runs):
        steps = _series(r.rows, "step")
        c = colors(i % colors.N)
        ax.plot(steps, _series(r.rows, "sharpness"), color=c, lw=1.2, label=r.name)
        if r.method.perturbs:
            ax.plot(steps, _series(r.rows, "sam_edge"), color=c, lw=1.0, ls="--")
        gd = r.method.gd_edge
        gd_edges.setdefault(round(gd, 12), f"$2/\\eta$ = {gd:.3g}" if not r.method.momentum else f"GD edge {gd:.3g}")
    for value, label in gd_edges.items():
        ax.axhline(value, color="gray", ls=":", lw=1.0, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness (solid), SAM-edge (dashed)")
    ax.set_title("sharpness and edges")
    ax.legend(fontsize=7, ncol=2)
    written.append(_save(fig, folder / "compare_sharpness.png"))

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, r in enumerate(runs):
        ax.plot(
            _series(r.rows, "step"), _series(r.rows, "sharpness_over_edge"), color=colors(i % colors.N), label=r.name
        )
    ax.axhline(1.0, color="black", ls=":", lw=1.0)
    ax.axhspan(0.9, 1.1, color="gray", alpha=0.15)
    finite = [q for r in runs for q in _series(r.rows, "sharpness_over_edge") if math.isfinite(q)]
    if finite and max(finite) > 3:
        ax.set_ylim(0, 3)  # an initial transient far above the edge would squash the rest
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness / edge")
    ax.set_title("sharpness over each run's own edge (SAM-edge, or 2/eta for GD)")
    ax.legend(fontsize=7, ncol=2)
    written.append(_save(fig, folder / "compare_ratio.png"))

    x_name = next((k for k in varied if k != "seed" and all(_number(r.config.get(k)) for r in runs)), None)
    if x_name is not None:
        written.append(_against(runs, varied, x_name, folder))
    return written


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _against(runs: list[ComparedRun], varied: list[str], x_name: str, folder: Path) -> Path:
    """Summary figures against ``x_name``: median over seeds, min-max spread."""
    others = [k for k in varied if k not in (x_name, "seed")]
    groups: dict[tuple, dict[float, list[ComparedRun]]] = {}
    for r in runs:
        key = tuple((k, r.config.get(k)) for k in others)
        groups.setdefault(key, {}).setdefault(float(r.config[x_name]), []).append(r)
    panels = [
        ("final_sharpness", "final sharpness"),
        ("test_error", "test error"),
        ("ratio_median", "median sharpness/edge"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for g, (key, by_x) in enumerate(groups.items()):
        label = ", ".join(f"{k}={v}" for k, v in key) or None
        for ax, (col, _) in zip(axes, panels):
            xs, mid, lo, hi = [], [], [], []
            for x in sorted(by_x):
                vals = [float(r.summary[col]) for r in by_x[x] if isinstance(r.summary.get(col), (int, float))]
                vals = [v for v in vals if math.isfinite(v)]
                if not vals:
                    continue
                m = statistics.median(vals)
                xs.append(x)
                mid.append(m)
                lo.append(m - min(vals))
                hi.append(max(vals) - m)
            ax.errorbar(xs, mid, yerr=[lo, hi], marker="o", capsize=3, color=plt.get_cmap("tab10")(g % 10), label=label)
    for ax, (_, title) in zip(axes, panels):
        ax.set_xlabel(x_name)
        ax.set_title(title)
    axes[2].axhline(1.0, color="gray", ls=":")
    if len(groups) > 1:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"against {x_name} (median over seeds; bars: min to max)")
    return _save(fig, folder / f"compare_vs_{x_name}.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
