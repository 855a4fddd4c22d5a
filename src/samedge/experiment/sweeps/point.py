"""One point of a sweep, run into its own run directory: the unit every executor runs.

:func:`execute_point` decides from the run directory alone whether to skip, resume or start the
point, and sets the same number of torch threads per run (``threads``, default 1): the float sums
of a matrix product depend on how many threads share them, so the same threads give the same
``metrics.csv`` whichever executor ran the run.  A point whose settings or data are refused
(:class:`~samedge.errors.BadInput`) is ``failed`` with the reason; a diverged run is ``diverged``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from samedge.errors import BadInput
from samedge.experiment.store.layout import RunDir
from samedge.experiment.sweeps.spec import run_state

__all__ = ["execute_point", "describe_bug"]


def execute_point(settings: dict[str, Any], run_dir: str, threads: int | None = 1, progress: bool = False) -> dict:
    """Run one point into ``run_dir``: skipped when finished or diverged, resumed from its
    checkpoint when interrupted, started otherwise.  Returns ``{"status", "reason"}``; a
    ``KeyboardInterrupt`` (Ctrl-C; the run checkpoints first) propagates."""
    import torch

    from samedge.experiment.config import from_mapping
    from samedge.experiment.run.runner import run

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        path = Path(run_dir)
        state = run_state(path)
        if state in ("done", "diverged"):
            return {"status": state, "reason": "", "skipped": True}
        try:
            cfg = from_mapping(settings)
            result = run(
                cfg,
                path,
                overwrite=state == "start" and path.exists() and RunDir(path).config.exists(),
                progress=progress,
                resume=state == "resume",
            )
        except BadInput as err:
            return {"status": "failed", "reason": str(err)}
        s = result.summary
        if s.get("interrupted"):
            raise KeyboardInterrupt
        if s.get("diverged"):
            return {"status": "diverged", "reason": f"step {s.get('diverged_step')}: {s.get('reason', '')}"}
        return {"status": "done", "reason": "", "resumed": state == "resume"}
    finally:
        torch.set_num_threads(previous)


def describe_bug(err: BaseException) -> str:
    """A run's unexpected exception as one line (recorded as the point's ``error`` reason)."""
    return f"internal error {type(err).__name__}: {err}".splitlines()[0]
