"""The flat-region check: GD and SAM at the same step size from the same initialization.

``samedge flatness mnist [settings]`` runs the task twice, as GD (``rho = 0``) and as SAM (the
configuration's ``rho``), with the same seed (so the same data, initialization and probes), the
Hessian trace every ``trace_every`` steps and the test set at every measurement.  It writes
``OUT/gd/`` and ``OUT/sam/`` (ordinary run directories), ``OUT/flatness.json`` and
``OUT/flatness.png`` (top eigenvalue, trace and test error against steps and against training
loss), and says:

* when SAM's sharpness departs from GD's: the first common measurement where they differ by more
  than ``depart`` (10%) relative to GD's, and the training losses of both there;
* by how much: the ratio of SAM's to GD's sharpness there and at the end;
* whether SAM's end point is flatter by trace as well: the difference of the final traces and its
  standard error (the two estimates are independent), flatter when the difference exceeds twice it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samedge.errors import ConfigError, RunDirError
from samedge.experiment.config import RunConfig
from samedge.experiment.store.files import read_json_object, write_json
from samedge.experiment.store.layout import RunDir
from samedge.experiment.store.metrics import read_metrics

__all__ = ["flatness", "FlatnessResult", "gd_vs_sam", "default_dir", "DEPART", "FLATNESS_JSON"]

DEPART = 0.10
FLATNESS_JSON = "flatness.json"


def default_dir(cfg: RunConfig) -> Path:
    """``runs/flatness-<task>-eta<eta>-rho<rho>-seed<seed>``: where the check goes without ``--out``."""
    return Path("runs") / f"flatness-{cfg.task}-eta{cfg.eta:g}-rho{cfg.rho:g}-seed{cfg.seed}"


def _configs(cfg: RunConfig) -> tuple[RunConfig, RunConfig]:
    if cfg.rho <= 0:
        raise ConfigError("config field 'rho' must be > 0 for the flatness check (it is SAM's radius)")
    trace_every = cfg.trace_every or cfg.measure_every * 5
    base = {"trace_every": trace_every, "measure_test": True}
    return cfg.replace(optimizer="gd", rho=0.0, **base), cfg.replace(optimizer="sam", **base)


def gd_vs_sam(gd_rows: list[dict], sam_rows: list[dict], depart: float = DEPART) -> dict[str, Any]:
    """Departure step, sharpness ratios and the final traces of two runs' metrics rows."""
    sam_by_step = {int(r["step"]): r for r in sam_rows}
    common = [(g, sam_by_step[int(g["step"])]) for g in gd_rows if int(g["step"]) in sam_by_step]
    if not common:
        raise ConfigError("the GD and SAM runs have no measurement step in common")
    out: dict[str, Any] = {"depart_threshold": depart, "departed_step": None}
    for g, s in common:
        if abs(s["sharpness"] / g["sharpness"] - 1) > depart:
            out.update(
                departed_step=int(g["step"]),
                departed_sharpness_ratio=s["sharpness"] / g["sharpness"],
                departed_gd_sharpness=g["sharpness"],
                departed_sam_sharpness=s["sharpness"],
                departed_gd_train_loss=g["train_loss"],
                departed_sam_train_loss=s["train_loss"],
            )
            break
    g, s = common[-1]
    out.update(
        final_step=int(g["step"]),
        final_gd_sharpness=g["sharpness"],
        final_sam_sharpness=s["sharpness"],
        final_sharpness_ratio=s["sharpness"] / g["sharpness"],
        final_gd_train_loss=g["train_loss"],
        final_sam_train_loss=s["train_loss"],
        final_gd_test_error=None if g.get("test_accuracy") is None else 1 - g["test_accuracy"],
        final_sam_test_error=None if s.get("test_accuracy") is None else 1 - s["test_accuracy"],
    )
    traced = [(a, b) for a, b in common if a.get("trace") is not None and b.get("trace") is not None]
    if traced:
        a, b = traced[-1]
        diff = a["trace"] - b["trace"]
        se = math.hypot(a["trace_stderr"], b["trace_stderr"])
        out.update(
            trace_step=int(a["step"]),
            final_gd_trace=a["trace"],
            final_gd_trace_stderr=a["trace_stderr"],
            final_sam_trace=b["trace"],
            final_sam_trace_stderr=b["trace_stderr"],
            trace_ratio=b["trace"] / a["trace"],
            trace_difference=diff,
            trace_difference_stderr=se,
            sam_flatter_by_trace=bool(diff > 2 * se),
        )
    return out


def _sentences(c: dict[str, Any]) -> list[str]:
    lines = []
    if c["departed_step"] is None:
        lines.append(f"SAM's sharpness stayed within {c['depart_threshold']:.0%} of GD's up to step {c['final_step']}")
    else:
        lines.append(
            f"SAM's sharpness departs from GD's at step {c['departed_step']} "
            f"({c['departed_sam_sharpness']:.4g} vs {c['departed_gd_sharpness']:.4g}, "
            f"ratio {c['departed_sharpness_ratio']:.3f}) while the training loss is still "
            f"{c['departed_sam_train_loss']:.4g} (GD {c['departed_gd_train_loss']:.4g})"
        )
    lines.append(
        f"at step {c['final_step']}: sharpness SAM {c['final_sam_sharpness']:.4g} vs GD {c['final_gd_sharpness']:.4g} "
        f"(ratio {c['final_sharpness_ratio']:.3f}); train loss SAM {c['final_sam_train_loss']:.4g} vs "
        f"GD {c['final_gd_train_loss']:.4g}; test error SAM {c['final_sam_test_error']:.4g} vs "
        f"GD {c['final_gd_test_error']:.4g}"
    )
    if "final_gd_trace" in c:
        verdict = "flatter" if c["sam_flatter_by_trace"] else "not measurably flatter"
        lines.append(
            f"trace at step {c['trace_step']}: SAM {c['final_sam_trace']:.4g} ± {c['final_sam_trace_stderr']:.2g} vs "
            f"GD {c['final_gd_trace']:.4g} ± {c['final_gd_trace_stderr']:.2g} (ratio {c['trace_ratio']:.3f}; "
            f"difference {c['trace_difference']:.3g} ± {c['trace_difference_stderr']:.2g}): SAM's end point is "
            f"{verdict} by trace"
        )
    return lines


@dataclass(frozen=True)
class FlatnessResult:
    """What the check found (``comparison`` and its sentences), or which run diverged (``diverged``
    names it and its step; no comparison then)."""

    comparison: dict[str, Any] | None
    lines: list[str]
    diverged: str | None = None


#: what the check writes into its output directory (besides the run directories gd/ and sam/)
_OUTPUT_FILES = (FLATNESS_JSON, "flatness.png", "flatness.pdf", FLATNESS_JSON + ".tmp")


def _check_output_dir(out: Path, runs: dict[str, RunConfig], overwrite: bool) -> None:
    """Refuse (before anything runs or is removed) an output directory holding anything the check
    does not write, or, without ``overwrite``, runs with other settings than these."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory")
    foreign = [e.name for e in sorted(out.iterdir()) if e.name not in (*runs, *_OUTPUT_FILES)]
    if foreign:
        raise RunDirError(
            f"{out} holds {', '.join(foreign[:5])}, which the flatness check does not write; choose another --out"
        )
    saved = out / FLATNESS_JSON
    if saved.exists():
        try:
            ours = "report" in read_json_object(saved) and "depart_threshold" in read_json_object(saved)
        except RunDirError:
            ours = False
        if not ours:
            raise RunDirError(f"{saved} was not written by samedge; refusing to replace it (choose another --out)")
    if overwrite:
        return
    for name, cfg in runs.items():
        files = RunDir(out / name)
        if files.config.exists():
            held = files.read_config()
            if held != cfg:
                changed = next(k for k, v in cfg.to_dict().items() if held.to_dict().get(k) != v)
                raise RunDirError(
                    f"{out / name} holds a run with {changed} = {held.to_dict().get(changed)!r}, not "
                    f"{cfg.to_dict()[changed]!r}; pass --overwrite to start the check again, or choose another --out"
                )


def flatness(
    cfg: RunConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True, depart: float = DEPART
) -> FlatnessResult:
    """Run GD and SAM as ``cfg`` says (apart from the optimizer) into ``out``; compare them.

    Like a sweep, the check continues where it stopped: a finished run is kept, an interrupted
    one resumed from its checkpoint.  Ctrl-C checkpoints the running run and propagates."""
    from samedge.experiment.run.runner import run
    from samedge.experiment.sweeps.spec import run_state

    out = Path(out)
    gd_cfg, sam_cfg = _configs(cfg)
    runs = {"gd": gd_cfg, "sam": sam_cfg}
    _check_output_dir(out, runs, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for name, c in runs.items():
        state = "start" if overwrite else run_state(out / name)
        if state == "done":
            continue
        if state == "diverged":
            summary = read_json_object(RunDir(out / name).summary, "summary")
            return FlatnessResult(None, [], f"the {name} run diverged at step {summary.get('diverged_step')}")
        result = run(c, out / name, progress=progress, overwrite=overwrite, resume=state == "resume")
        if result.summary.get("interrupted"):
            raise KeyboardInterrupt
        if result.diverged:
            return FlatnessResult(None, [], f"the {name} run diverged at step {result.summary.get('diverged_step')}")
    gd_rows, sam_rows = read_metrics(RunDir(out / "gd").metrics), read_metrics(RunDir(out / "sam").metrics)
    result_dict = gd_vs_sam(gd_rows, sam_rows, depart)
    result_dict.update(eta=cfg.eta, rho=sam_cfg.rho, steps=cfg.steps, seed=cfg.seed, task=cfg.task)
    lines = _sentences(result_dict)
    result_dict["report"] = lines
    write_json(out / FLATNESS_JSON, result_dict)
    plot_flatness(out, gd_rows, sam_rows, title=f"{cfg.task}  eta={cfg.eta:g}  rho={sam_cfg.rho:g} (SAM)")
    return FlatnessResult(result_dict, lines)


def plot_flatness(out: Path, gd_rows: list[dict], sam_rows: list[dict], title: str = "") -> list[Path]:
    from samedge.experiment.analysis.figures import plt, save_figure

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2))
    series = (("sharpness", r"top eigenvalue $\lambda_1$"), ("trace", r"trace tr$(H)$"), ("test_error", "test error"))
    for rows, name, color in ((gd_rows, "GD", "tab:purple"), (sam_rows, "SAM", "tab:green")):
        for j, (col, label) in enumerate(series):
            pts = [
                (r["step"], r["train_loss"], 1 - r["test_accuracy"] if col == "test_error" else r.get(col))
                for r in rows
                if (r.get("test_accuracy") if col == "test_error" else r.get(col)) is not None
            ]
            steps, losses, values = zip(*pts) if pts else ((), (), ())
            axes[0, j].plot(steps, values, color=color, marker="." if col == "trace" else None, label=name)
            axes[1, j].plot(losses, values, color=color, marker="." if col == "trace" else None, label=name)
            axes[0, j].set_ylabel(label)
            axes[1, j].set_ylabel(label)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("training loss")
        ax.set_xscale("log")
        ax.invert_xaxis()  # training runs left to right
    fig.suptitle(title)
    return save_figure(fig, out, "flatness")
