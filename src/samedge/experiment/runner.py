"""The runner: trains with a step-based schedule and records measurements into a run directory.

The loop at step ``t`` (t = 0 .. steps):

1. loss and gradient ``g`` at ``w_t`` on the step's objective (full batch, or the minibatch);
2. the direction: ``g`` (GD) or the SAM/USAM gradient at ``w_t + e``;
3. every ``measure_every`` steps and at the last step: a measurement at ``w_t`` (eigen-solve,
   warm-started; the gradients of 1-2 are reused), written to ``metrics.csv`` at once;
4. the update ``w_{t+1}`` (heavy-ball if ``momentum > 0``), except after the last step;
5. every ``checkpoint_every`` steps, at the end, and on Ctrl-C: a checkpoint
   (:mod:`~samedge.experiment.checkpoint`) from which ``--resume`` continues with identical metrics rows.

The run directory's life (create, refuse, replace, provenance) is :mod:`~samedge.experiment.rundir`.
Everything random is seeded from ``config.seed``; the schedule counts steps, never seconds.
Figures are drawn afterwards from ``metrics.csv`` by :mod:`~samedge.experiment.plotting`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samedge.core.curvature import HessianEigensolver
from samedge.core.measurements import Measurement, measure
from samedge.core.method import Method
from samedge.core.objective import Evaluation, Objective
from samedge.core.params import Params, norm
from samedge.errors import CheckpointError
from samedge.experiment.checkpoint import TrainState, load_checkpoint, save_checkpoint
from samedge.experiment.config import RunConfig
from samedge.experiment.metrics import (
    MetricsWriter,
    base_columns,
    read_metrics,
    summarize,
    truncate_metrics,
    write_json,
)
from samedge.experiment.rundir import default_run_dir, prepare_run_dir, write_run_config
from samedge.experiment.tasks import Task, build_task

__all__ = ["RunResult", "run"]


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    summary: dict[str, Any]

    @property
    def diverged(self) -> bool:
        return bool(self.summary.get("diverged"))


class _Solvers:
    """The warm-started eigen-solvers of a run: at ``w`` (seed), at SAM's point (seed + 1, with
    ``measure_perturbed``) and on the fixed evaluation batch (seed + 2, with ``eval_batch_size``)."""

    def __init__(self, cfg: RunConfig, task: Task):
        def solver(k: int, seed: int) -> HessianEigensolver:
            return HessianEigensolver(k=k, method=cfg.eig_method, tol=cfg.eig_tol, max_iter=cfg.eig_max_iter, seed=seed)

        self.main = solver(cfg.eig_k, cfg.seed)
        self.perturbed = solver(1, cfg.seed + 1) if cfg.measure_perturbed else None
        self.eval = solver(1, cfg.seed + 2) if task.eval_batch is not None else None

    def state(
        self, step: int, params: Params, velocity: Params | None, elapsed: float, finished: bool = False
    ) -> TrainState:
        return TrainState(
            step,
            params,
            velocity,
            self.main.state_dict(),
            self.perturbed.state_dict() if self.perturbed else None,
            elapsed,
            finished,
            self.eval.state_dict() if self.eval else None,
        )

    def restore(self, state: TrainState, run_dir: Path) -> None:
        self.main.load_state_dict(state.solver)
        if self.perturbed is not None:
            if state.perturbed_solver is None:
                raise CheckpointError(f"{run_dir}: the checkpoint has no perturbed-point solver state")
            self.perturbed.load_state_dict(state.perturbed_solver)
        if self.eval is not None:
            if state.eval_solver is None:
                raise CheckpointError(f"{run_dir}: the checkpoint has no evaluation-batch solver state")
            self.eval.load_state_dict(state.eval_solver)


def run(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    task: Task | None = None,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Train and measure as ``cfg`` says; write ``config.json``, ``metrics.csv``, ``summary.json``
    and checkpoints.  With ``resume``, continue from ``run_dir``'s checkpoint.

    ``on_step(t)``, if given, is called at every step ``t < steps`` after its measurement and
    before its update; a ``KeyboardInterrupt`` raised there is handled as Ctrl-C is."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    task = task if task is not None else build_task(cfg)  # data errors surface before anything is written
    method = cfg.method()
    solvers = _Solvers(cfg, task)
    if resume:
        state = load_checkpoint(
            run_dir, cfg.to_dict(), task.train.parameters(), device=task.train.parameters()[0].device
        )
        truncate_metrics(run_dir / "metrics.csv", state.step)
    else:
        prepare_run_dir(run_dir, overwrite)
        write_run_config(run_dir, cfg, data_source=task.source, n_parameters=task.n_parameters)
        state = solvers.state(0, task.train.parameters(), None, 0.0)
    solvers.restore(state, run_dir)
    columns = base_columns(cfg.eig_k, cfg.measure_perturbed, task.test_every_measurement, task.eval_batch is not None)
    params, velocity = state.params, state.velocity
    status: dict[str, Any] = {"diverged": False, "diverged_step": None, "interrupted": False}
    if resume:
        status["resumed_from_step"] = state.step
    start = time.perf_counter() - state.elapsed
    saved_config = cfg.to_dict()

    def boundary(step: int, finished: bool = False) -> TrainState:
        return solvers.state(step, params, velocity, time.perf_counter() - start, finished)

    bar = _progress_bar(cfg.steps, progress and not state.finished, initial=min(state.step, cfg.steps))
    at_start = last_good = boundary(state.step, state.finished)
    with MetricsWriter(run_dir / "metrics.csv", columns) as writer:
        try:
            for step in range(state.step, cfg.steps + 1) if not state.finished else ():
                at_start = boundary(step)
                # 1. loss and gradient at w_t on the step's objective
                objective = task.objective_at(step)
                ev = objective.loss_and_grad(params)
                assert ev.grad is not None
                if not (math.isfinite(ev.loss) and math.isfinite(norm(ev.grad))):
                    status.update(diverged=True, diverged_step=step, reason="non-finite loss or gradient")
                    break
                last_good = at_start
                # 2. the direction: g, or the SAM/USAM gradient at w_t + e
                direction = method.direction(objective.grad, params, ev.grad)
                # 3. a measurement, written at once
                if step % cfg.measure_every == 0 or step == cfg.steps:
                    row, m = _measurement_row(cfg, task, method, solvers, objective, params, ev, direction)
                    row["step"] = step
                    row["elapsed_s"] = round(time.perf_counter() - start, 3)
                    writer.write(row)
                    bar.set_postfix(loss=f"{ev.loss:.4g}", sharp=f"{m.sharpness:.4g}", edge=f"{m.edge:.4g}")
                    if not math.isfinite(m.sharpness):
                        status.update(diverged=True, diverged_step=step, reason="non-finite sharpness")
                        break
                if step == cfg.steps:
                    save_checkpoint(run_dir, saved_config, boundary(step + 1, finished=True))
                    break
                if on_step is not None:
                    on_step(step)
                # 4. the update w_{t+1}
                params, velocity = method.update(params, direction, velocity)
                bar.update(1)
                # 5. a checkpoint every checkpoint_every steps
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


def _measurement_row(
    cfg: RunConfig,
    task: Task,
    method: Method,
    solvers: _Solvers,
    objective: Objective,
    params: Params,
    ev: Evaluation,
    direction: Params,
) -> tuple[dict[str, Any], Measurement]:
    """One row of ``metrics.csv`` at ``w_t`` (its ``elapsed_s`` is set by the caller)."""
    assert ev.grad is not None
    perturbed = method.ascent_point(params, ev.grad) if cfg.measure_perturbed else None
    m = measure(
        objective,
        params,
        ev.grad,
        direction,
        solvers.main,
        method=method,
        perturbed_params=perturbed,
        perturbed_solver=solvers.perturbed,
    )
    row = _row(ev, m, cfg.eig_k)
    if solvers.eval is not None and task.eval_batch is not None:
        row.update(_eval_columns(task.eval_batch, params, solvers.eval, method))
    if task.test_every_measurement:
        test = task.test.evaluate(params)
        row.update(test_loss=test.loss, test_accuracy=test.accuracy)
    return row, m


def _eval_columns(batch: Objective, params: Params, solver: HessianEigensolver, method: Method) -> dict[str, Any]:
    """Sharpness and edge on the fixed evaluation batch (its own gradient norm, warm-started solver)."""
    ev = batch.loss_and_grad(params)
    assert ev.grad is not None
    m = measure(batch, params, ev.grad, ev.grad, solver, method=method)
    return {
        "eval_sharpness": m.sharpness,
        "eval_grad_norm": m.grad_norm,
        "eval_edge": m.edge,
        "eval_sharpness_over_edge": m.sharpness_over_edge,
        "eval_eig_residual": m.relative_residual,
        "eval_eig_converged": m.converged,
        "eval_hvps": m.hvps,
    }


def _row(ev: Evaluation, m: Measurement, eig_k: int) -> dict[str, Any]:
    row: dict[str, Any] = {
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
    }
    for i in range(2, eig_k + 1):
        row[f"lambda_{i}"] = m.eigenvalues[i - 1] if len(m.eigenvalues) >= i else None
    return row


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


class _LineProgress(_NoBar):
    """Progress off a terminal (a log file, a Ray worker): one short line per measurement instead
    of a bar's carriage-return updates."""

    def __init__(self, total: int, initial: int):
        self.total, self.step = total, initial

    def update(self, n: int) -> None:
        self.step += n

    def set_postfix(self, **kw) -> None:
        values = " ".join(f"{k} {v}" for k, v in kw.items())
        print(f"step {self.step}/{self.total}: {values}", file=sys.stderr, flush=True)


def _progress_bar(total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return _NoBar()
    if not sys.stderr.isatty():
        return _LineProgress(total, initial)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True)
