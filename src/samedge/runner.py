"""The runner: trains with a step-based schedule and records measurements into a run directory.

The loop at step ``t`` (t = 0 .. steps):

1. loss and gradient ``g`` at ``w_t`` on the step's objective (full batch, or the minibatch);
2. the direction: ``g`` (GD) or the SAM/USAM gradient at ``w_t + e``;
3. every ``measure_every`` steps and at the last step: a measurement at ``w_t`` (eigen-solve,
   warm-started; the gradients of 1-2 are reused), written to ``metrics.csv`` at once;
4. the update ``w_{t+1}`` (heavy-ball if ``momentum > 0``), except after the last step.

Everything random is seeded from ``config.seed``; the schedule counts steps, never seconds.
Figures are drawn afterwards from ``metrics.csv`` by :mod:`samedge.plotting`.
"""

from __future__ import annotations

import math
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import RunConfig
from .curvature import HessianEigensolver
from .measurements import measure
from .metrics import MetricsWriter, base_columns, read_metrics, summarize, write_json
from .optim import heavy_ball_update, perturbation, sam_gradient
from .params import add_scaled, norm
from .tasks import Task, build_task

__all__ = ["RunResult", "run", "prepare_run_dir", "RUN_FILES", "default_run_dir"]

RUN_FILES = ("config.json", "metrics.csv", "summary.json")


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    summary: dict[str, Any]

    @property
    def diverged(self) -> bool:
        return bool(self.summary.get("diverged"))


def default_run_dir(cfg: RunConfig) -> Path:
    tag = f"{cfg.task}-{cfg.optimizer}-eta{cfg.eta:g}"
    if cfg.optimizer != "gd":
        tag += f"-rho{cfg.rho:g}"
    return Path("runs") / f"{tag}-seed{cfg.seed}"


def prepare_run_dir(path: Path, overwrite: bool) -> None:
    """Create ``path``; an existing non-empty one is replaced only with ``overwrite`` and only if it
    looks like a samedge run directory (has ``config.json``), so nothing else is ever deleted."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"run directory {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run directory {path} already exists; pass --overwrite to replace it")
        if not (path / "config.json").exists():
            raise FileExistsError(f"{path} is not a samedge run directory (no config.json); refusing to overwrite it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    import matplotlib
    import numpy
    import scipy

    return {
        "samedge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }


def _finite(x: float) -> bool:
    return math.isfinite(x)


def run(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    task: Task | None = None,
) -> RunResult:
    """Train and measure as ``cfg`` says; write ``config.json``, ``metrics.csv``, ``summary.json``."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    task = task if task is not None else build_task(cfg)  # data errors surface before anything is written
    prepare_run_dir(run_dir, overwrite)
    write_json(
        run_dir / "config.json",
        {
            "config": cfg.to_dict(),
            "data_source": task.source,
            "n_parameters": task.n_parameters,
            "versions": provenance(),
            "command": sys.argv,
        },
    )
    columns = base_columns(cfg.eig_k, cfg.measure_perturbed, task.test_every_measurement)
    solver = HessianEigensolver(
        k=cfg.eig_k, method=cfg.eig_method, tol=cfg.eig_tol, max_iter=cfg.eig_max_iter, seed=cfg.seed
    )
    perturbed_solver = (
        HessianEigensolver(k=1, method=cfg.eig_method, tol=cfg.eig_tol, max_iter=cfg.eig_max_iter, seed=cfg.seed + 1)
        if cfg.measure_perturbed
        else None
    )
    normalized = cfg.optimizer == "sam"
    rho = 0.0 if cfg.optimizer == "gd" else cfg.rho
    params = task.train.parameters()
    velocity = None
    status: dict[str, Any] = {"diverged": False, "diverged_step": None, "interrupted": False}
    start = time.perf_counter()
    bar = _progress_bar(cfg.steps, progress)
    with MetricsWriter(run_dir / "metrics.csv", columns) as writer:
        try:
            for step in range(cfg.steps + 1):
                objective = task.objective_at(step)
                ev = objective.loss_and_grad(params)
                g_norm = norm(ev.grad)
                if not (_finite(ev.loss) and _finite(g_norm)):
                    status.update(diverged=True, diverged_step=step, reason="non-finite loss or gradient")
                    break
                direction = sam_gradient(objective.grad, params, ev.grad, rho, normalized)
                if step % cfg.measure_every == 0 or step == cfg.steps:
                    perturbed = (
                        add_scaled(params, perturbation(ev.grad, rho, normalized), 1.0) if cfg.measure_perturbed else None
                    )
                    m = measure(
                        objective, params, ev.grad, direction, solver,
                        optimizer=cfg.optimizer, eta=cfg.eta, rho=rho, momentum=cfg.momentum,
                        perturbed_params=perturbed, perturbed_solver=perturbed_solver,
                    )
                    row = _row(step, ev, m, cfg.eig_k, start)
                    if task.test_every_measurement:
                        test = task.test.evaluate(params)
                        row.update(test_loss=test.loss, test_accuracy=test.accuracy)
                    writer.write(row)
                    bar.set_postfix(loss=f"{ev.loss:.4g}", sharp=f"{m.sharpness:.4g}", edge=f"{m.edge:.4g}")
                    if not _finite(m.sharpness):
                        status.update(diverged=True, diverged_step=step, reason="non-finite sharpness")
                        break
                if step == cfg.steps:
                    break
                params, velocity = heavy_ball_update(params, direction, cfg.eta, velocity, cfg.momentum)
                bar.update(1)
        except KeyboardInterrupt:
            status.update(interrupted=True, interrupted_step=step)
        finally:
            bar.close()
    elapsed = time.perf_counter() - start
    summary = summarize(read_metrics(run_dir / "metrics.csv"))
    summary.update(status)
    if not status["diverged"]:
        test = task.test.evaluate(params)
        summary.update(test_loss=test.loss, test_accuracy=test.accuracy, test_error=1.0 - test.accuracy)
    summary["elapsed_s"] = elapsed
    write_json(run_dir / "summary.json", summary)
    return RunResult(run_dir, summary)


def _row(step: int, ev, m, eig_k: int, start: float) -> dict[str, Any]:
    row = {
        "step": step,
        "train_loss": ev.loss,
        "train_accuracy": ev.accuracy,
        "grad_norm": m.grad_norm,
        "sharpness": m.sharpness,
        "gd_edge": m.gd_edge,
        "sam_edge": m.edge,
        "sharpness_over_edge": m.sharpness_over_edge,
        "grad_alignment": m.grad_alignment,
        "sam_grad_alignment": m.sam_grad_alignment,
        "sharpness_perturbed": m.sharpness_perturbed,
        "eig_residual": m.relative_residual,
        "eig_converged": m.converged,
        "hvps": m.hvps,
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
    for i in range(2, eig_k + 1):
        row[f"lambda_{i}"] = m.eigenvalues[i - 1] if len(m.eigenvalues) >= i else None
    return row


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
