"""Optional run measurements beyond the top eigenvalue: the Hessian trace and spectral density.

With ``trace_every`` the runner adds a Hutchinson trace (``trace_probes`` Rademacher probes) to
the measurement rows at every ``trace_every`` steps and at the last step: columns ``trace``,
``trace_stderr`` and ``trace_hvps``.  With ``density_every`` it runs stochastic Lanczos quadrature
(``density_probes`` probes of ``density_steps`` Lanczos steps) at those steps and appends the
quadrature nodes and weights to ``density.csv`` (columns ``step, probe, node, weight``), written
and fsynced as ``metrics.csv`` is; :func:`samedge.experiment.analysis.figures.plot_run` draws it as
``density.png``.  Each has its own probe generator (seeds ``seed + 3`` and ``seed + 4``) whose
state is part of the checkpoint, so a resumed run draws the same probes as one that never stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from samedge.core.objective import Objective
from samedge.core.params import Params
from samedge.core.spectrum import SpectralDensity, hessian_density, hessian_trace
from samedge.errors import CheckpointError
from samedge.experiment.config import RunConfig

__all__ = ["RunSpectrum", "TRACE_COLUMNS"]

TRACE_COLUMNS = ["trace", "trace_stderr", "trace_hvps"]


def _due(step: int, every: int, last: int) -> bool:
    return every > 0 and (step % every == 0 or step == last)


class RunSpectrum:
    """The trace and density measurements of a run and their probe generators."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.trace_generator = torch.Generator().manual_seed(cfg.seed + 3)
        self.density_generator = torch.Generator().manual_seed(cfg.seed + 4)

    @property
    def enabled(self) -> bool:
        return self.cfg.trace_every > 0 or self.cfg.density_every > 0

    def trace_columns(self, objective: Objective, params: Params, step: int) -> dict[str, Any]:
        """The trace columns of the row at ``step`` (empty cells when no trace is due)."""
        if not _due(step, self.cfg.trace_every, self.cfg.steps):
            return dict.fromkeys(TRACE_COLUMNS)
        est = hessian_trace(objective, params, probes=self.cfg.trace_probes, generator=self.trace_generator)
        return {"trace": est.trace, "trace_stderr": est.stderr, "trace_hvps": est.matvecs}

    def density(self, objective: Objective, params: Params, step: int) -> SpectralDensity | None:
        if not _due(step, self.cfg.density_every, self.cfg.steps):
            return None
        return hessian_density(
            objective,
            params,
            probes=self.cfg.density_probes,
            steps=self.cfg.density_steps,
            generator=self.density_generator,
        )

    def state_dict(self) -> dict:
        return {"trace": self.trace_generator.get_state(), "density": self.density_generator.get_state()}

    def load_state_dict(self, state: dict | None, run_dir: Path) -> None:
        if not self.enabled:
            return
        if state is None:
            raise CheckpointError(f"{run_dir}: the checkpoint has no trace/density probe state")
        self.trace_generator.set_state(state["trace"])
        self.density_generator.set_state(state["density"])
