"""``samedge measure RUN_DIR``: the Hessian's top eigenpairs at a run's saved weights.

Reads the run's configuration and its last checkpoint (every finished run keeps one at its final
weights ``w_T``; an interrupted run's checkpoint holds the weights it would continue from), builds
the task's objective at that step (the full batch, or that step's minibatch) and solves cold with
any eigen settings.  For users who want more eigenvalues or a tighter value at the end of a run,
and for checking a run's last reading.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from samedge.core.curvature import HessianEigensolver
from samedge.errors import ConfigError
from samedge.experiment.store.checkpoint import load_checkpoint
from samedge.experiment.store.layout import RunDir
from samedge.experiment.store.lock import check_unlocked
from samedge.experiment.tasks import build_task

__all__ = ["remeasure"]


def remeasure(
    run_dir: str | Path,
    *,
    k: int = 1,
    tol: float = 1e-6,
    method: str = "lanczos",
    max_iter: int = 300,
    seed: int | None = None,
) -> dict[str, Any]:
    """Top-``k`` eigenpairs at ``run_dir``'s checkpointed weights, as a JSON-ready dictionary.

    A reader: it writes nothing into the run directory, refuses one that a run is writing, and
    says which step it measured (``step``; ``note`` when ``checkpoint.pt`` was damaged and the
    previous checkpoint was used)."""
    check_unlocked(run_dir)
    cfg = RunDir(run_dir).read_config()
    try:
        solver = HessianEigensolver(
            k=k, method=method, tol=tol, max_iter=max_iter, warm_start=False, seed=cfg.seed if seed is None else seed
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    task = build_task(cfg)
    n = task.n_parameters
    if k >= n:
        raise ConfigError(f"--eig-k {k} must be below the number of parameters ({n})")
    if max_iter < k:
        raise ConfigError(
            f"--eig-max-iter {max_iter} is below --eig-k {k}: a solve needs at least one product per eigenpair"
        )
    like = task.train.parameters()
    state = load_checkpoint(run_dir, cfg.to_dict(), like, device=like[0].device, read_only=True)
    # a finished run's checkpoint is the boundary after its last step, at that step's weights
    step = state.step - 1 if state.finished else state.step
    objective = task.objective_at(step)
    start = time.perf_counter()
    result = solver(objective, state.params)
    elapsed = time.perf_counter() - start
    scale = max(float(abs(result.eigenvalues).max()), 1e-300)

    def floats(values) -> list[float | None]:
        return [float(v) if math.isfinite(float(v)) else None for v in values]

    torch_threads = torch.get_num_threads()
    return {
        "run_dir": str(run_dir),
        "task": cfg.task,
        "step": step,
        "finished": state.finished,
        "method": method,
        "k": k,
        "tol": tol,
        "sharpness": float(result.eigenvalues[0]),
        "eigenvalues": floats(result.eigenvalues),
        "residuals": floats(result.residuals),
        "relative_residuals": floats(result.residuals / scale),
        "bounds": floats(result.bounds),
        "relative_bounds": floats(result.bounds / scale),
        "converged": bool(result.converged),
        "hvps": int(result.matvecs),
        "seconds": elapsed,
        "torch_threads": torch_threads,
        "note": state.note,
    }
