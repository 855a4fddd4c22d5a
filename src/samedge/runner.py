"""The runner: trains with a step-based schedule and records measurements into a run directory.

The loop at step ``t`` (t = 0 .. steps):

1. loss and gradient ``g`` at ``w_t`` on the step's objective (full batch, or the minibatch);
2. the direction: ``g`` (GD) or the SAM/USAM gradient at ``w_t + e``;
3. every ``measure_every`` steps and at the last step: a measurement at ``w_t`` (eigen-solve,
   warm-started; the gradients of 1-2 are reused), written to ``metrics.csv`` at once;
4. the update ``w_{t+1}`` (heavy-ball if ``momentum > 0``), except after the last step;
5. every ``checkpoint_every`` steps, at the end, and on Ctrl-C: a checkpoint
   (:mod:`samedge.checkpoint`) from which ``--resume`` continues with identical metrics rows.

Everything random is seeded from ``config.seed``; the schedule counts steps, never seconds.
Figures are drawn afterwards from ``metrics.csv`` by :mod:`samedge.plotting`.
"""

from __future__ import annotations

import json
import math
import os
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
from .checkpoint import CheckpointError, TrainState, load_checkpoint, save_checkpoint
from .config import RunConfig, from_mapping
from .curvature import HessianEigensolver
from .measurements import measure
from .metrics import MetricsWriter, base_columns, read_metrics, summarize, write_json
from .optim import heavy_ball_update, sam_gradient, sam_point
from .params import norm
from .tasks import Task, build_task

__all__ = ["RunResult", "run", "prepare_run_dir", "default_run_dir", "load_run_config", "truncate_metrics"]


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


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The configuration saved in ``run_dir/config.json`` (for ``--resume``)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no config.json; is it a samedge run directory?")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["config"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is corrupted (no readable 'config')") from None
    return from_mapping(saved, where=f"{path} config")


def run(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    task: Task | None = None,
    resume: bool = False,
) -> RunResult:
    """Train and measure as ``cfg`` says; write ``config.json``, ``metrics.csv``, ``summary.json``
    and checkpoints.  With ``resume``, continue from ``run_dir``'s checkpoint."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    task = task if task is not None else build_task(cfg)  # data errors surface before anything is written
    solver = HessianEigensolver(
        k=cfg.eig_k, method=cfg.eig_method, tol=cfg.eig_tol, max_iter=cfg.eig_max_iter, seed=cfg.seed
    )
    perturbed_solver = (
        HessianEigensolver(k=1, method=cfg.eig_method, tol=cfg.eig_tol, max_iter=cfg.eig_max_iter, seed=cfg.seed + 1)
        if cfg.measure_perturbed
        else None
    )
    eval_solver = (
        HessianEigensolver(k=1, method=cfg.eig_method, tol=cfg.eig_tol, max_iter=cfg.eig_max_iter, seed=cfg.seed + 2)
        if task.eval_batch is not None
        else None
    )
    if resume:
        state = load_checkpoint(run_dir, cfg.to_dict(), task.train.parameters(), device=task.train.parameters()[0].device)
        truncate_metrics(run_dir / "metrics.csv", state.step)
    else:
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
        state = TrainState(0, task.train.parameters(), None, solver.state_dict(),
                           perturbed_solver.state_dict() if perturbed_solver else None, 0.0,
                           eval_solver=eval_solver.state_dict() if eval_solver else None)
    solver.load_state_dict(state.solver)
    if perturbed_solver is not None:
        perturbed_solver.load_state_dict(state.perturbed_solver)
    if eval_solver is not None:
        if state.eval_solver is None:
            raise CheckpointError(f"{run_dir}: the checkpoint has no evaluation-batch solver state")
        eval_solver.load_state_dict(state.eval_solver)
    columns = base_columns(cfg.eig_k, cfg.measure_perturbed, task.test_every_measurement, task.eval_batch is not None)
    normalized = cfg.optimizer == "sam"
    rho = 0.0 if cfg.optimizer == "gd" else cfg.rho
    params, velocity = state.params, state.velocity
    status: dict[str, Any] = {"diverged": False, "diverged_step": None, "interrupted": False}
    if resume:
        status["resumed_from_step"] = state.step
    start = time.perf_counter() - state.elapsed
    saved_config = cfg.to_dict()

    def boundary(step: int, finished: bool = False) -> TrainState:
        return TrainState(step, params, velocity, solver.state_dict(),
                          perturbed_solver.state_dict() if perturbed_solver else None,
                          time.perf_counter() - start, finished,
                          eval_solver.state_dict() if eval_solver else None)

    bar = _progress_bar(cfg.steps, progress and not state.finished, initial=min(state.step, cfg.steps))
    at_start = last_good = boundary(state.step, state.finished)
    step = state.step
    with MetricsWriter(run_dir / "metrics.csv", columns) as writer:
        try:
            for step in range(state.step, cfg.steps + 1) if not state.finished else ():
                at_start = boundary(step)
                objective = task.objective_at(step)
                ev = objective.loss_and_grad(params)
                g_norm = norm(ev.grad)
                if not (_finite(ev.loss) and _finite(g_norm)):
                    status.update(diverged=True, diverged_step=step, reason="non-finite loss or gradient")
                    break
                last_good = at_start
                direction = sam_gradient(objective.grad, params, ev.grad, rho, normalized)
                if step % cfg.measure_every == 0 or step == cfg.steps:
                    perturbed = (
                        sam_point(params, ev.grad, rho, normalized) if cfg.measure_perturbed else None
                    )
                    m = measure(
                        objective, params, ev.grad, direction, solver,
                        optimizer=cfg.optimizer, eta=cfg.eta, rho=rho, momentum=cfg.momentum,
                        perturbed_params=perturbed, perturbed_solver=perturbed_solver,
                    )
                    row = _row(step, ev, m, cfg.eig_k, start)
                    if eval_solver is not None:
                        row.update(_eval_columns(task.eval_batch, params, eval_solver, cfg, rho))
                    if task.test_every_measurement:
                        test = task.test.evaluate(params)
                        row.update(test_loss=test.loss, test_accuracy=test.accuracy)
                    row["elapsed_s"] = round(time.perf_counter() - start, 3)
                    writer.write(row)
                    bar.set_postfix(loss=f"{ev.loss:.4g}", sharp=f"{m.sharpness:.4g}", edge=f"{m.edge:.4g}")
                    if not _finite(m.sharpness):
                        status.update(diverged=True, diverged_step=step, reason="non-finite sharpness")
                        break
                if step == cfg.steps:
                    save_checkpoint(run_dir, saved_config, boundary(step + 1, finished=True))
                    break
                params, velocity = heavy_ball_update(params, direction, cfg.eta, velocity, cfg.momentum)
                bar.update(1)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    save_checkpoint(run_dir, saved_config, boundary(step + 1))
        except KeyboardInterrupt:
            save_checkpoint(run_dir, saved_config, at_start)
            params = at_start.params
            status.update(interrupted=True, interrupted_step=at_start.step)
        finally:
            bar.close()
    elapsed = time.perf_counter() - start
    summary = summarize(read_metrics(run_dir / "metrics.csv"))
    summary.update(status)
    if status["diverged"]:
        save_checkpoint(run_dir, saved_config, last_good)
        summary["last_good_step"] = last_good.step
    else:
        test = task.test.evaluate(params)
        summary.update(test_loss=test.loss, test_accuracy=test.accuracy, test_error=1.0 - test.accuracy)
    summary["elapsed_s"] = elapsed
    write_json(run_dir / "summary.json", summary)
    return RunResult(run_dir, summary)


def _eval_columns(batch, params, solver: HessianEigensolver, cfg: RunConfig, rho: float) -> dict[str, Any]:
    """Sharpness and edge on the fixed evaluation batch (its own gradient norm, warm-started solver)."""
    ev = batch.loss_and_grad(params)
    m = measure(batch, params, ev.grad, ev.grad, solver, optimizer=cfg.optimizer, eta=cfg.eta, rho=rho,
                momentum=cfg.momentum)
    return {
        "eval_sharpness": m.sharpness,
        "eval_grad_norm": m.grad_norm,
        "eval_edge": m.edge,
        "eval_sharpness_over_edge": m.sharpness_over_edge,
        "eval_eig_residual": m.relative_residual,
        "eval_eig_converged": m.converged,
        "eval_hvps": m.hvps,
    }


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


def _progress_bar(total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True)
