"""Per-block readings and batch sharpness of a run (beside the top eigenvalue of each reading).

* ``layers.csv`` (unless ``layer_groups = "off"``): at every reading, the top eigenvector's mass
  and Rayleigh share per block (:mod:`samedge.core.blocks`; no HVP: the solver's ``H v``), and
  every ``layer_sharpness_every`` steps each block's own top eigenvalue ``lambda_max(H_BB)``
  (warm-started per block; the HVPs go to the metrics column ``layer_hvps``).  The block solvers'
  warm starts and generator are part of the checkpoint, so a resumed run writes the same rows.
* batch sharpness (minibatch runs, ``batch_sharpness_batches``, default 8): over that many seeded
  minibatches of the reading's step (:func:`samedge.data.sampling.probe_batches`, a pure function
  of seed and step), the metrics columns ``batch_sharpness`` (mean ``g^T H g / ||g||^2``),
  ``batch_step_sharpness`` (mean ``d^T H d / g^T d`` of the method's step ``d``; both against
  ``2/eta``), their standard errors, ``batch_edge`` (the method's edge at each batch's gradient
  norm, averaged) and ``batch_sharpness_hvps`` (:mod:`samedge.core.batch_sharpness`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from samedge.core.batch_sharpness import batch_sharpness
from samedge.core.blocks import (
    Block,
    BlockEigensolver,
    block_readings,
    group_blocks,
    interlacing_holds,
    module_blocks,
    parse_groups,
)
from samedge.core.curvature import HessianEigensolver
from samedge.core.method import Method
from samedge.core.objective import Objective
from samedge.core.params import Params
from samedge.errors import CheckpointError
from samedge.experiment.config import RunConfig
from samedge.experiment.tasks import Task

__all__ = ["RunLayers", "BATCH_COLUMNS", "LAYER_COLUMNS"]

LAYER_COLUMNS = ["layer_hvps"]
BATCH_COLUMNS = [
    "batch_sharpness",
    "batch_sharpness_stderr",
    "batch_step_sharpness",
    "batch_step_sharpness_stderr",
    "batch_edge",
    "batch_sharpness_hvps",
]


def _due(step: int, every: int, last: int) -> bool:
    return every > 0 and (step % every == 0 or step == last)


class RunLayers:
    """The run's per-block readings (rows of ``layers.csv``) and batch-sharpness columns."""

    def __init__(self, cfg: RunConfig, task: Task):
        self.cfg, self.task = cfg, task
        spec = cfg.layer_groups.strip()
        self.enabled = spec != "off"
        self.spec = spec
        self.block_solver = (
            BlockEigensolver(tol=cfg.eig_tol, max_iter=cfg.eig_max_iter, seed=cfg.seed + 5)
            if cfg.layer_sharpness_every and self.enabled
            else None
        )
        self.batches = cfg.batch_sharpness_count if task.probe_batches is not None else 0
        self._blocks: tuple[Block, ...] | None = None

    def metric_columns(self) -> list[str]:
        """The columns this adds to ``metrics.csv`` (none by default for a full-batch run)."""
        return (LAYER_COLUMNS if self.block_solver is not None else []) + (BATCH_COLUMNS if self.batches else [])

    def blocks(self, objective: Objective, params: Params) -> tuple[Block, ...]:
        if self._blocks is None:
            names, sizes = objective.names, [p.numel() for p in params]
            if self.spec in ("", "leaves"):
                by = "leaves" if self.spec else "modules"
                self._blocks = module_blocks(self.task.model, names, sizes, by=by)
            else:
                self._blocks = group_blocks(parse_groups(self.spec), names, sizes)
        return self._blocks

    def reading(
        self, step: int, objective: Objective, params: Params, solver: HessianEigensolver
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The rows of ``layers.csv`` at ``step`` (from ``solver``'s last result, the reading's) and
        the metrics columns of the block solves."""
        if not self.enabled or solver.last is None:
            return [], {}
        last = solver.last
        blocks = self.blocks(objective, params)
        readings = block_readings(last.eigenvectors[0], blocks, None if last.products is None else last.products[0])
        rows: list[dict[str, Any]] = [
            {"step": step, "block": r.name, "params": r.params, "mass": r.mass, "rayleigh_share": r.rayleigh_share}
            for r in readings
        ]
        columns: dict[str, Any] = {}
        if self.block_solver is not None:
            columns["layer_hvps"] = None
            if _due(step, self.cfg.layer_sharpness_every, self.cfg.steps):
                try:
                    results = self.block_solver(objective.hvp_operator(params), blocks, last.eigenvectors[0])
                finally:
                    objective.release_hvp_graph()
                top, residual = float(last.eigenvalues[0]), float(last.residuals[0])
                for row in rows:
                    res = results[row["block"]]
                    value = float(res.eigenvalues[0])
                    holds = interlacing_holds(value, top, residual)
                    if not holds:
                        print(
                            f"samedge: warning: step {step}: block {row['block']}'s top eigenvalue {value:.6g} exceeds "
                            f"lambda_1 = {top:.6g} (+ residual {residual:.2g}): the reading missed the top eigenvalue",
                            file=sys.stderr,
                        )
                    row.update(
                        sharpness=value,
                        sharpness_over_top=value / top if top != 0 else math.nan,
                        eig_residual=float(res.relative_residuals[0]),
                        eig_converged=bool(res.converged),
                        hvps=res.matvecs,
                        interlacing=holds,
                    )
                columns["layer_hvps"] = sum(r.matvecs for r in results.values())
        return rows, columns

    def batch_columns(self, step: int, params: Params, method: Method) -> dict[str, Any]:
        """The batch-sharpness columns at ``step`` (none when off)."""
        if not self.batches or self.task.probe_batches is None:
            return {}
        est = batch_sharpness(self.task.probe_batches(step, self.batches), params, method)
        return {
            "batch_sharpness": est.value,
            "batch_sharpness_stderr": est.stderr,
            "batch_step_sharpness": est.step_value,
            "batch_step_sharpness_stderr": est.step_stderr,
            "batch_edge": est.edge,
            "batch_sharpness_hvps": est.hvps,
        }

    def state_dict(self) -> dict | None:
        return self.block_solver.state_dict() if self.block_solver is not None else None

    def load_state_dict(self, state: dict | None, run_dir: Path) -> None:
        if self.block_solver is None:
            return
        if state is None:
            raise CheckpointError(f"{run_dir}: the checkpoint has no block eigen-solver state (layer_sharpness_every)")
        self.block_solver.load_state_dict(state)
