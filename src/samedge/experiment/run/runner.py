"""The runner: trains with a step-based schedule and records measurements into a run directory.

The loop at step ``t`` (t = 0 .. steps):

1. loss and gradient ``g`` at ``w_t`` on the step's objective (full batch, or the minibatch);
2. the direction: ``g`` (GD) or the SAM/USAM gradient at ``w_t + e``; with ``secant_pairs``, a
   row of ``steps.csv`` with the per-step secant sharpness from these gradients (no extra work);
3. every ``measure_every`` steps and at the last step: a measurement at ``w_t`` (eigen-solve,
   warm-started; the gradients of 1-2 are reused), written to ``metrics.csv`` at once;
4. the update ``w_{t+1}`` (heavy-ball if ``momentum > 0``), except after the last step;
5. every ``checkpoint_every`` steps, at the end, and on Ctrl-C: a checkpoint
   (:mod:`~samedge.experiment.store.checkpoint`) from which ``--resume`` continues with identical metrics rows.

The run directory's files are named by :mod:`~samedge.experiment.store.layout`; creating, refusing and
replacing one is :mod:`~samedge.experiment.store.create`.
Everything random is seeded from ``config.seed``; the schedule counts steps, never seconds.
Figures are drawn afterwards from ``metrics.csv`` by :mod:`~samedge.experiment.analysis.figures`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import samedge.experiment.world as world
from samedge.core.curvature import HessianEigensolver
from samedge.core.measurements import Measurement, measure
from samedge.core.method import Method
from samedge.core.objective import Evaluation, Objective
from samedge.core.params import Params, norm
from samedge.core.secant import StepSecants
from samedge.errors import CheckpointError
from samedge.experiment.config import RunConfig
from samedge.experiment.run.readings import RunSpectrum
from samedge.experiment.store.checkpoint import TrainState, load_checkpoint, save_checkpoint
from samedge.experiment.store.create import create_run_dir, lock_run_dir
from samedge.experiment.store.density import DensityWriter
from samedge.experiment.store.layout import RunDir
from samedge.experiment.store.lock import RunLock, check_unlocked
from samedge.experiment.store.metrics import (
    STEP_COLUMNS,
    MetricsWriter,
    base_columns,
    expected_steps,
    read_metrics,
    restore_metrics,
    summarize,
    write_summary,
)
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
        self.spectrum = RunSpectrum(cfg)  # trace/density probes (seeds + 3, + 4)

    def state(
        self,
        step: int,
        params: Params,
        velocity: Params | None,
        elapsed: float,
        finished: bool = False,
        secants: StepSecants | None = None,
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
            secant=secants.state_dict() if secants is not None else None,
            spectrum=self.spectrum.state_dict() if self.spectrum.enabled else None,
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
        self.spectrum.load_state_dict(state.spectrum, run_dir)


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
    before its update; a ``KeyboardInterrupt`` raised there is handled as Ctrl-C is.

    The run holds ``run_dir``'s lock (:mod:`~samedge.experiment.store.lock`) from before its first
    write to its end: a second run or resume of the directory is refused meanwhile."""
    world.use_threads(cfg.threads)  # before anything is computed: the sums depend on the thread count
    run_dir = Path(run_dir) if run_dir is not None else RunDir.default_for(cfg).path
    # Over many processes (torch.distributed) every rank runs the loop on the same values; rank 0
    # alone holds the lock and writes files, and what it refuses is refused on every rank.
    held: list[RunLock] = []
    # A directory another process is writing is refused at once, before the data are read.
    if resume:
        world.on_rank0(lambda: held.append(lock_run_dir(run_dir)))
    else:
        world.on_rank0(lambda: check_unlocked(run_dir))
    try:
        task = task if task is not None else build_task(cfg)  # data errors surface before anything is written
    except BaseException:
        for lock in held:
            lock.release()
        raise
    if not resume:
        built = task

        def setup(directory: Path) -> None:
            RunDir(directory).write_config(
                cfg,
                data_source=built.source,
                n_parameters=built.n_parameters,
                extra=world.provenance(),
            )

        world.on_rank0(lambda: held.append(create_run_dir(run_dir, overwrite, setup=setup)))
    with held[0] if held else contextlib.nullcontext():  # rank 0 is the directory's only writer until the end
        return _run(cfg, run_dir, task, progress=progress, resume=resume, on_step=on_step)


def _note(message: str) -> None:
    print(f"samedge: note: {message}", file=sys.stderr)


def _run(
    cfg: RunConfig,
    run_dir: Path,
    task: Task,
    *,
    progress: bool,
    resume: bool,
    on_step: Callable[[int], None] | None,
) -> RunResult:
    method = cfg.method()
    solvers = _Solvers(cfg, task)
    secants = StepSecants(method, cfg.secant_pairs) if cfg.secant_pairs != 0 else None
    files = RunDir(run_dir)
    metrics_path, steps_path = files.metrics, files.steps
    writer = world.is_writer()  # rank 0 (or the only process) writes files
    dist_info = world.provenance()
    if resume and writer:
        state = load_checkpoint(
            run_dir, cfg.to_dict(), task.train.parameters(), device=task.train.parameters()[0].device
        )
        if state.note:
            _note(state.note)
        expected = expected_steps(state.step, cfg.steps, cfg.measure_every)
        restored = restore_metrics(metrics_path, state.step, state.metrics, expected)
        if restored:
            _note(restored)
        if secants is not None:  # steps.csv: a row for every step before the checkpoint's
            restored = restore_metrics(steps_path, state.step, state.steps, list(range(state.step)))
            if restored:
                _note(restored)
    elif resume:
        state = load_checkpoint(
            run_dir, cfg.to_dict(), task.train.parameters(), device=task.train.parameters()[0].device
        )
    else:
        state = solvers.state(0, task.train.parameters(), None, 0.0)
    solvers.restore(state, run_dir)
    if secants is not None and state.secant is not None:  # a checkpoint from before steps.csv starts empty
        secants.load_state_dict(state.secant)
    columns = base_columns(
        cfg.eig_k, cfg.measure_perturbed, task.test_every_measurement, task.eval_batch is not None, cfg.trace_every > 0
    )
    density_writer = DensityWriter(run_dir, state.step if resume else None) if cfg.density_every and writer else None
    params, velocity = state.params, state.velocity
    status: dict[str, Any] = {"diverged": False, "diverged_step": None, "interrupted": False}
    if resume:
        status["resumed_from_step"] = state.step
    start = time.perf_counter() - state.elapsed
    saved_config = cfg.to_dict()
    # cost accounting (this process, since the start or the resume): what training and measuring spent
    cost: dict[str, Any] = {
        "train_gradients": 0,
        "train_seconds": 0.0,
        "measure_gradients": 0,
        "measure_hvps": 0,
        "measure_seconds": 0.0,
    }

    def boundary(step: int, finished: bool = False) -> TrainState:
        return solvers.state(step, params, velocity, time.perf_counter() - start, finished, secants)

    bar = _progress_bar(cfg.steps, progress and writer and not state.finished, initial=min(state.step, cfg.steps))
    at_start = last_good = boundary(state.step, state.finished)
    steps_writer = MetricsWriter(steps_path, STEP_COLUMNS, fsync_each_row=False) if secants and writer else None
    with MetricsWriter(metrics_path, columns) if writer else _NoWriter() as rows:

        def checkpoint(at: TrainState) -> None:
            if not writer:
                return
            steps = None
            if steps_writer is not None:
                steps_writer.sync()  # the rows a checkpoint vouches for are on disk before it
                steps = steps_writer.rows_before(at.step)
            save_checkpoint(run_dir, saved_config, at, metrics=rows.rows_before(at.step), steps=steps)

        try:
            for step in range(state.step, cfg.steps + 1) if not state.finished else ():
                at_start = boundary(step)
                tick = time.perf_counter()
                # 1. loss and gradient at w_t on the step's objective
                objective = task.objective_at(step)
                ev = objective.loss_and_grad(params)
                cost["train_gradients"] += 1
                assert ev.grad is not None
                g_norm = norm(ev.grad)
                if not (math.isfinite(ev.loss) and math.isfinite(g_norm)):
                    status.update(diverged=True, diverged_step=step, reason="non-finite loss or gradient")
                    break
                last_good = at_start
                # 2. the direction: g, or the SAM/USAM gradient at w_t + e
                direction = method.direction(_counted(objective.grad, cost, "train_gradients"), params, ev.grad)
                cost["train_seconds"] += time.perf_counter() - tick
                if secants is not None:  # every rank observes (the pairs are replicated state)
                    step_row = _step_row(step, ev.loss, g_norm, method, secants, params, ev.grad, direction)
                    if steps_writer is not None:
                        steps_writer.write(step_row)
                # 3. a measurement, written at once
                if step % cfg.measure_every == 0 or step == cfg.steps:
                    tick = time.perf_counter()
                    row, m = _measurement_row(cfg, task, method, solvers, objective, params, ev, direction)
                    row["step"] = step
                    if cfg.trace_every:
                        row.update(solvers.spectrum.trace_columns(objective, params, step))
                    density = solvers.spectrum.density(objective, params, step)
                    if density is not None and density_writer is not None:
                        density_writer.write(step, density)
                    cost["measure_seconds"] += time.perf_counter() - tick
                    cost["measure_hvps"] += sum(int(row.get(c) or 0) for c in ("hvps", "eval_hvps", "trace_hvps"))
                    cost["measure_gradients"] += 1 if "eval_hvps" in row else 0  # the evaluation batch's gradient
                    row["elapsed_s"] = round(time.perf_counter() - start, 3)
                    rows.write(row)
                    bar.set_postfix(loss=f"{ev.loss:.4g}", sharp=f"{m.sharpness:.4g}", edge=f"{m.edge:.4g}")
                    if not math.isfinite(m.sharpness):
                        status.update(diverged=True, diverged_step=step, reason="non-finite sharpness")
                        break
                if step == cfg.steps:
                    checkpoint(boundary(step + 1, finished=True))
                    break
                if on_step is not None:
                    on_step(step)
                # 4. the update w_{t+1}
                tick = time.perf_counter()
                params, velocity = method.update(params, direction, velocity)
                cost["train_seconds"] += time.perf_counter() - tick
                bar.update(1)
                # 5. a checkpoint every checkpoint_every steps
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    checkpoint(boundary(step + 1))
        except KeyboardInterrupt:
            checkpoint(at_start)
            params = at_start.params
            status.update(interrupted=True, interrupted_step=at_start.step)
        finally:
            bar.close()
        if status["diverged"]:
            checkpoint(last_good)
        if steps_writer is not None:
            steps_writer.sync()
            steps_writer.close()
        if density_writer is not None:
            density_writer.close()
    elapsed = time.perf_counter() - start
    summary = summarize(read_metrics(metrics_path)) if writer else {}
    summary.update(status)
    summary.update(dist_info)
    if status["diverged"]:
        summary["last_good_step"] = last_good.step
    else:
        test = task.test.evaluate(params)
        summary.update(test_loss=test.loss, test_accuracy=test.accuracy, test_error=1.0 - test.accuracy)
    summary["elapsed_s"] = elapsed
    since = time.perf_counter() - start - state.elapsed  # this process's wall time
    cost.update(
        train_share=cost["train_seconds"] / since if since > 0 else None,
        measure_share=cost["measure_seconds"] / since if since > 0 else None,
        wall_seconds=since,
    )
    summary["cost"] = cost
    if writer and not write_summary(files.summary, summary):
        _note(f"kept {files.summary}: it was computed from more rows than {files.METRICS} now holds")
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


def _counted(grad: Callable[[Params], Params], cost: dict[str, Any], key: str) -> Callable[[Params], Params]:
    """``grad`` that counts its calls in ``cost[key]`` (the SAM/USAM direction's extra gradient)."""

    def counted(params: Params) -> Params:
        cost[key] += 1
        return grad(params)

    return counted


def _step_row(
    step: int,
    loss: float,
    g_norm: float,
    method: Method,
    secants: StepSecants,
    params: Params,
    grad: Params,
    direction: Params,
) -> dict[str, Any]:
    """One row of ``steps.csv``: the secant estimate at ``w_t`` where it passes the residual rule."""
    est = secants.observe(params, grad, direction, grad_norm=g_norm)
    return {
        "step": step,
        "train_loss": loss,
        "grad_norm": g_norm,
        "edge": method.edge(g_norm),
        "sharpness_secant": est.sharpness if est is not None and secants.valid(est) else None,
        "secant_residual": est.residual if est is not None and math.isfinite(est.residual) else None,
    }


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
        "eig_bound": m.eig_bound,
        "eig_converged": m.converged,
        "hvps": m.hvps,
    }
    for i in range(2, eig_k + 1):
        row[f"lambda_{i}"] = m.eigenvalues[i - 1] if len(m.eigenvalues) >= i else None
    return row


class _NoWriter:
    """Ranks other than 0 write no metrics."""

    def write(self, row: dict[str, Any]) -> None: ...

    def rows_before(self, step: int) -> str:
        return ""

    def __enter__(self) -> _NoWriter:
        return self

    def __exit__(self, *exc: Any) -> None: ...


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
