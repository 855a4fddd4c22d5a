"""The runner: trains with a step-based schedule and records measurements into a run directory.

The loop at step ``t`` (t = 0 .. steps):

1. loss and gradient ``g`` at ``w_t`` on the step's objective (full batch, or the minibatch);
2. the direction: ``g`` (GD) or the SAM/USAM gradient at ``w_t + e``; with ``secant_pairs``, a
   row of ``steps.csv`` with the per-step secant sharpness from these gradients (no extra work);
3. every ``measure_every`` steps and at the last step: a measurement at ``w_t`` (eigen-solve,
   warm-started; the gradients of 1-2 are reused), written to ``metrics.csv`` at once;
4. the update ``w_{t+1}`` by the method's update rule (heavy-ball SGD; the loop holds the rule's
   state with ``w_t``), except after the last step;
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
from typing import Any, NamedTuple

import samedge.experiment.world as world
from samedge.core.curvature import HessianEigensolver
from samedge.core.measurements import Measurement, measure
from samedge.core.method import Method
from samedge.core.objective import Evaluation, Objective
from samedge.core.params import Params, norm
from samedge.core.secant import StepSecants
from samedge.core.update_rules import RuleState
from samedge.errors import CheckpointError
from samedge.experiment.config import RunConfig
from samedge.experiment.run.layers import RunLayers
from samedge.experiment.run.readings import RunSpectrum
from samedge.experiment.store.checkpoint import TrainState, load_checkpoint, save_checkpoint
from samedge.experiment.store.create import create_run_dir, lock_run_dir
from samedge.experiment.store.density import DensityWriter
from samedge.experiment.store.layers import LayersWriter
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


class _RunState:
    """What a run carries from one step to the next besides ``w_t``, and its packing into a
    checkpoint's :class:`TrainState`: the update rule (whose state the loop holds), the
    warm-started eigen-solvers at ``w`` (seed), at SAM's point (seed + 1, with
    ``measure_perturbed``) and on the fixed evaluation batch (seed + 2, with ``eval_batch_size``),
    the trace/density probes and the per-step secant pairs (with ``secant_pairs``)."""

    def __init__(self, cfg: RunConfig, task: Task, method: Method):
        def solver(k: int, seed: int) -> HessianEigensolver:
            return HessianEigensolver(k=k, method=cfg.eig_method, tol=cfg.eig_tol, max_iter=cfg.eig_max_iter, seed=seed)

        self.rule = method.rule
        self.main = solver(cfg.eig_k, cfg.seed)
        self.perturbed = solver(1, cfg.seed + 1) if cfg.measure_perturbed else None
        self.eval = solver(1, cfg.seed + 2) if task.eval_batch is not None else None
        self.spectrum = RunSpectrum(cfg)  # trace/density probes (seeds + 3, + 4)
        self.secants = StepSecants(method, cfg.secant_pairs) if cfg.secant_pairs != 0 else None
        # preconditioned bases: warm solvers of P^-1/2 H P^-1/2 (seed + 5) and, with SAM/USAM, of
        # the effective operator P^-1/2 (H + s H^2) P^-1/2 (seed + 6)
        self.adaptive: dict[str, HessianEigensolver] = {}
        if method.preconditioned:
            self.adaptive["preconditioned"] = solver(1, cfg.seed + 5)
            if method.perturbs:
                self.adaptive["effective"] = solver(1, cfg.seed + 6)
        self.layers = RunLayers(cfg, task)  # layers.csv's block solvers and batch sharpness

    def train_state(
        self, step: int, params: Params, rule_state: RuleState, elapsed: float, finished: bool = False
    ) -> TrainState:
        """The checkpoint's state at the boundary before ``step`` (references, not copies)."""
        return TrainState(
            step=step,
            params=params,
            rule_state=self.rule.state_dict(rule_state),
            rule=self.rule.name,
            solver=self.main.state_dict(),
            perturbed_solver=self.perturbed.state_dict() if self.perturbed else None,
            elapsed=elapsed,
            finished=finished,
            eval_solver=self.eval.state_dict() if self.eval else None,
            secant=self.secants.state_dict() if self.secants is not None else None,
            spectrum=self.spectrum.state_dict() if self.spectrum.enabled else None,
            adaptive_solvers={k: v.state_dict() for k, v in self.adaptive.items()} or None,
            layers=self.layers.state_dict(),
        )

    def restore(self, state: TrainState, run_dir: Path) -> RuleState:
        """Load the solvers, probes and secant pairs from ``state``; the update rule's state there."""
        if state.rule != self.rule.name:
            raise CheckpointError(
                f"{run_dir}: the checkpoint holds the state of update rule {state.rule!r}, the run's is {self.rule.name!r}"
            )
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
        for name, solver in self.adaptive.items():
            saved = (state.adaptive_solvers or {}).get(name)
            if saved is None:
                raise CheckpointError(f"{run_dir}: the checkpoint has no state of the {name} sharpness's solver")
            solver.load_state_dict(saved)
        self.layers.load_state_dict(state.layers, run_dir)
        if self.secants is not None and state.secant is not None:  # a checkpoint from before steps.csv starts empty
            self.secants.load_state_dict(state.secant)
        try:
            return self.rule.load_state_dict(state.rule_state, state.params)
        except ValueError as err:
            raise CheckpointError(f"{run_dir}: {err}") from None


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
                extra=world.process_group_info(),
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
    training = _Training(cfg, run_dir, task, resume=resume)
    training.loop(progress=progress, on_step=on_step)
    return training.finish()


class _Point(NamedTuple):
    """Step ``t``'s objective, its loss and gradient at ``w_t`` and the method's direction."""

    objective: Objective
    ev: Evaluation
    direction: Params


class _Training:
    """One run from the state it opens with (a checkpoint's, or step 0's) to its summary.

    The loop holds ``params`` and ``rule_state`` (``w_t`` and the update rule's state); each
    step is :meth:`_direction` (loss, gradient, direction), :meth:`_measure` (a row of
    ``metrics.csv``), :meth:`_update` (the rule's step) and :meth:`_checkpoint`."""

    def __init__(self, cfg: RunConfig, run_dir: Path, task: Task, *, resume: bool):
        self.cfg, self.run_dir, self.task, self.resume = cfg, run_dir, task, resume
        self.method = cfg.method()
        self.run_state = _RunState(cfg, task, self.method)
        self.rule = self.run_state.rule
        self.files = RunDir(run_dir)
        self.writer = world.is_writer()  # rank 0 (or the only process) writes files
        self.dist_info = world.process_group_info()
        self.opened = self._open()
        self.rule_state = self.run_state.restore(self.opened, run_dir)
        self.columns = base_columns(
            cfg.eig_k,
            cfg.measure_perturbed,
            task.test_every_measurement,
            task.eval_batch is not None,
            cfg.trace_every > 0,
            preconditioned=self.method.preconditioned,
            effective=self.method.preconditioned and self.method.perturbs,
        )
        at = self.columns.index("eig_residual")  # the per-block and batch-sharpness columns (if any) before it
        self.columns[at:at] = self.run_state.layers.metric_columns()
        self.layers_writer = (
            LayersWriter(run_dir, self.opened.step if resume else None)
            if self.run_state.layers.enabled and self.writer
            else None
        )
        self.density_writer = (
            DensityWriter(run_dir, self.opened.step if resume else None) if cfg.density_every and self.writer else None
        )
        self.params = self.opened.params
        self.status: dict[str, Any] = {"diverged": False, "diverged_step": None, "interrupted": False}
        if resume:
            self.status["resumed_from_step"] = self.opened.step
        self.start = time.perf_counter() - self.opened.elapsed
        self.saved_config = cfg.to_dict()
        # cost accounting (this process, since the start or the resume): what training and measuring spent
        self.cost: dict[str, Any] = {
            "train_gradients": 0,
            "train_seconds": 0.0,
            "measure_gradients": 0,
            "measure_hvps": 0,
            "measure_seconds": 0.0,
        }

    # opening -------------------------------------------------------------------------------
    def _open(self) -> TrainState:
        """The state the run starts from: its checkpoint's (with ``resume``; the rows after it
        are dropped from ``metrics.csv`` and ``steps.csv``), or step 0's."""
        cfg, task = self.cfg, self.task
        if not self.resume:
            params = task.train.parameters()
            return self.run_state.train_state(0, params, self.rule.init(params), 0.0)
        state = load_checkpoint(
            self.run_dir,
            cfg.to_dict(),
            task.train.parameters(),
            device=task.train.parameters()[0].device,
            read_only=not self.writer,  # one rank (the writer) sets a damaged checkpoint aside
        )
        if not self.writer:
            return state
        if state.note:
            _note(state.note)
        expected = expected_steps(state.step, cfg.steps, cfg.measure_every)
        restored = restore_metrics(self.files.metrics, state.step, state.metrics, expected)
        if restored:
            _note(restored)
        if self.run_state.secants is not None:  # steps.csv: a row for every step before the checkpoint's
            restored = restore_metrics(self.files.steps, state.step, state.steps, list(range(state.step)))
            if restored:
                _note(restored)
        return state

    def _boundary(self, step: int, finished: bool = False) -> TrainState:
        """The checkpoint's state at the boundary before ``step``, from the loop's."""
        return self.run_state.train_state(
            step, self.params, self.rule_state, time.perf_counter() - self.start, finished
        )

    # the loop -----------------------------------------------------------------------------
    def loop(self, *, progress: bool, on_step: Callable[[int], None] | None) -> None:
        """Steps from the opened state to ``cfg.steps``, checkpointed on Ctrl-C and at divergence."""
        cfg, opened = self.cfg, self.opened
        self.bar = _progress_bar(
            cfg.steps, progress and self.writer and not opened.finished, initial=min(opened.step, cfg.steps)
        )
        self.at_start = self.last_good = self._boundary(opened.step, opened.finished)
        self.steps_writer = (
            MetricsWriter(self.files.steps, STEP_COLUMNS, fsync_each_row=False)
            if self.run_state.secants is not None and self.writer
            else None
        )
        with MetricsWriter(self.files.metrics, self.columns) if self.writer else _NoWriter() as rows:
            self.rows = rows
            try:
                for step in range(opened.step, cfg.steps + 1) if not opened.finished else ():
                    if not self._step(step, on_step):
                        break
            except KeyboardInterrupt:
                self._checkpoint(self.at_start)
                self.params = self.at_start.params
                self.status.update(interrupted=True, interrupted_step=self.at_start.step)
            finally:
                self.bar.close()
            if self.status["diverged"]:
                self._checkpoint(self.last_good)
            if self.steps_writer is not None:
                self.steps_writer.sync()
                self.steps_writer.close()
            if self.density_writer is not None:
                self.density_writer.close()
            if self.layers_writer is not None:
                self.layers_writer.close()

    def _step(self, step: int, on_step: Callable[[int], None] | None) -> bool:
        """Step ``t``: direction, measurement, update and checkpoint as the schedule says; False
        where the run stops (it diverged, or ``t`` was its last step)."""
        cfg = self.cfg
        self.at_start = self._boundary(step)
        point = self._direction(step)
        if point is None:
            return False
        if (step % cfg.measure_every == 0 or step == cfg.steps) and not self._measure(step, point):
            return False
        if step == cfg.steps:
            self._checkpoint(self._boundary(step + 1, finished=True))
            return False
        if on_step is not None:
            on_step(step)
        self._update(point.direction)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            self._checkpoint(self._boundary(step + 1))
        return True

    def _direction(self, step: int) -> _Point | None:
        """1-2: the loss and gradient at ``w_t`` on the step's objective and the method's direction
        (a row of ``steps.csv`` with ``secant_pairs``); None where they are not finite."""
        tick = time.perf_counter()
        objective = self.task.objective_at(step)
        ev = objective.loss_and_grad(self.params)
        self.cost["train_gradients"] += 1
        assert ev.grad is not None
        g_norm = norm(ev.grad)
        if not (math.isfinite(ev.loss) and math.isfinite(g_norm)):
            self.status.update(diverged=True, diverged_step=step, reason="non-finite loss or gradient")
            return None
        self.last_good = self.at_start
        direction = self.method.direction(_counted(objective.grad, self.cost, "train_gradients"), self.params, ev.grad)
        self.cost["train_seconds"] += time.perf_counter() - tick
        secants = self.run_state.secants
        if secants is not None:  # every rank observes (the pairs are replicated state)
            step_row = _step_row(step, ev.loss, g_norm, self.method, secants, self.params, ev.grad, direction)
            if self.steps_writer is not None:
                self.steps_writer.write(step_row)
        return _Point(objective, ev, direction)

    def _measure(self, step: int, point: _Point) -> bool:
        """3: a measurement at ``w_t``, written to ``metrics.csv`` at once; False where its
        sharpness is not finite."""
        cfg, objective = self.cfg, point.objective
        tick = time.perf_counter()
        row, m = _measurement_row(
            cfg,
            self.task,
            self.method,
            self.run_state,
            objective,
            self.params,
            point.ev,
            point.direction,
            self.rule.preconditioner(self.rule_state),
        )
        row["step"] = step
        if cfg.trace_every:
            row.update(self.run_state.spectrum.trace_columns(objective, self.params, step))
        density = self.run_state.spectrum.density(objective, self.params, step)
        if density is not None and self.density_writer is not None:
            self.density_writer.write(step, density)
        layer_rows, layer_columns = self.run_state.layers.reading(step, objective, self.params, self.run_state.main)
        row.update(layer_columns)
        row.update(self.run_state.layers.batch_columns(step, self.params, self.method))
        if self.layers_writer is not None and layer_rows:
            self.layers_writer.write(layer_rows)
        self.cost["measure_seconds"] += time.perf_counter() - tick
        self.cost["measure_hvps"] += sum(
            int(row.get(c) or 0) for c in ("hvps", "eval_hvps", "trace_hvps", "layer_hvps", "batch_sharpness_hvps")
        )
        self.cost["measure_gradients"] += 1 if "eval_hvps" in row else 0  # the evaluation batch's gradient
        row["elapsed_s"] = round(time.perf_counter() - self.start, 3)
        self.rows.write(row)
        self.bar.set_postfix(loss=f"{point.ev.loss:.4g}", sharp=f"{m.sharpness:.4g}", edge=f"{m.edge:.4g}")
        if not math.isfinite(m.sharpness):
            self.status.update(diverged=True, diverged_step=step, reason="non-finite sharpness")
            return False
        return True

    def _update(self, direction: Params) -> None:
        """4: ``w_{t+1}`` and the rule's new state by the update rule's step."""
        tick = time.perf_counter()
        self.params, self.rule_state = self.rule.step(self.params, direction, self.rule_state)
        self.cost["train_seconds"] += time.perf_counter() - tick
        self.bar.update(1)

    def _checkpoint(self, at: TrainState) -> None:
        """5: ``at`` saved with the rows of ``metrics.csv`` and ``steps.csv`` before its step."""
        if not self.writer:
            return
        steps = None
        if self.steps_writer is not None:
            self.steps_writer.sync()  # the rows a checkpoint vouches for are on disk before it
            steps = self.steps_writer.rows_before(at.step)
        save_checkpoint(self.run_dir, self.saved_config, at, metrics=self.rows.rows_before(at.step), steps=steps)

    # finishing ----------------------------------------------------------------------------
    def finish(self) -> RunResult:
        """``summary.json``: the metrics' summary, how the run ended, the test loss at its last
        weights (unless it diverged) and what training and measuring cost."""
        status, cost = self.status, self.cost
        elapsed = time.perf_counter() - self.start
        summary = summarize(read_metrics(self.files.metrics)) if self.writer else {}
        summary.update(status)
        summary.update(self.dist_info)
        if status["diverged"]:
            summary["last_good_step"] = self.last_good.step
        else:
            test = self.task.test.evaluate(self.params)
            summary.update(test_loss=test.loss, test_accuracy=test.accuracy, test_error=1.0 - test.accuracy)
        summary["elapsed_s"] = elapsed
        since = time.perf_counter() - self.start - self.opened.elapsed  # this process's wall time
        cost.update(
            train_share=cost["train_seconds"] / since if since > 0 else None,
            measure_share=cost["measure_seconds"] / since if since > 0 else None,
            wall_seconds=since,
        )
        summary["cost"] = cost
        if self.writer and not write_summary(self.files.summary, summary):
            _note(f"kept {self.files.summary}: it was computed from more rows than {self.files.METRICS} now holds")
        return RunResult(self.run_dir, summary)


def _measurement_row(
    cfg: RunConfig,
    task: Task,
    method: Method,
    solvers: _RunState,
    objective: Objective,
    params: Params,
    ev: Evaluation,
    direction: Params,
    preconditioner: Params | None = None,
) -> tuple[dict[str, Any], Measurement]:
    """One row of ``metrics.csv`` at ``w_t`` (its ``elapsed_s`` is set by the caller);
    ``preconditioner``: the rule's P in its state at ``w_t`` (preconditioned bases)."""
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
        preconditioner=preconditioner,
        preconditioned_solver=solvers.adaptive.get("preconditioned"),
        effective_solver=solvers.adaptive.get("effective"),
    )
    row = _row(ev, m, cfg.eig_k)
    if solvers.eval is not None and task.eval_batch is not None:
        row.update(_eval_columns(task.eval_batch, params, solvers.eval, method, preconditioner))
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
    if method.preconditioned:
        # a gradient-difference secant sees H along one direction, not the preconditioned operator the
        # threshold bounds (P changes every step): no per-step estimate for adam, adamw, rmsprop
        est = None
    return {
        "step": step,
        "train_loss": loss,
        "grad_norm": g_norm,
        "edge": method.edge(g_norm),
        "sharpness_secant": est.sharpness if est is not None and secants.valid(est) else None,
        "secant_residual": est.residual if est is not None and math.isfinite(est.residual) else None,
    }


def _eval_columns(
    batch: Objective, params: Params, solver: HessianEigensolver, method: Method, preconditioner: Params | None
) -> dict[str, Any]:
    """Sharpness and edge on the fixed evaluation batch (its own gradient norm, warm-started solver;
    a preconditioned base's readings with the training state's P, from the same solver)."""
    ev = batch.loss_and_grad(params)
    assert ev.grad is not None
    m = measure(batch, params, ev.grad, ev.grad, solver, method=method, preconditioner=preconditioner)
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
    if m.preconditioned_sharpness is not None:
        row.update(preconditioned_sharpness=m.preconditioned_sharpness, preconditioned_hvps=m.preconditioned_hvps)
    if m.effective_sharpness is not None:
        row.update(effective_sharpness=m.effective_sharpness, effective_hvps=m.effective_hvps)
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
