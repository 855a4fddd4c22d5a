"""One point of a sweep, run into its own run directory: the unit every executor runs.

:func:`execute_point` decides from the run directory alone whether to skip, resume or start the
point, and runs it on the point's own ``threads`` setting (torch threads; the executor's count
for a point recorded without one): the float sums of a matrix product depend on how many threads
share them, so the same threads give the same ``metrics.csv`` whichever executor ran the run,
and ``samedge run`` with the point's settings gives it too.

Faults map to outcomes as ``samedge run`` maps them to exit codes: settings or data refused
(:class:`~samedge.errors.BadInput`) is ``failed`` with the reason (exit 2); the machine refusing
(an ``OSError``: no permission, a full disk) is ``failed`` with one line naming the path
(exit 4); a diverged run is ``diverged``; a point another process is running is ``running``
(the sweep waits for it); any other exception propagates (a samedge bug: the executor records it
``error``, exit 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from samedge.errors import BadInput, RunDirError
from samedge.experiment.store.files import describe_os_error
from samedge.experiment.store.layout import RunDir
from samedge.experiment.store.lock import RunLocked
from samedge.experiment.sweeps.spec import point_state

__all__ = ["execute_point", "describe_bug", "failed", "EXIT_BUG", "EXIT_BAD_INPUT", "EXIT_ENVIRONMENT"]

#: the exit codes of ``samedge run`` that a point's failure carries (``outcome["exit"]``)
EXIT_BUG, EXIT_BAD_INPUT, EXIT_ENVIRONMENT = 1, 2, 4


def failed(err: BaseException | str) -> dict[str, Any]:
    """The outcome of a point that failed, with the exit code ``samedge run`` would give."""
    if isinstance(err, OSError):
        return {"status": "failed", "reason": describe_os_error(err), "exit": EXIT_ENVIRONMENT}
    return {"status": "failed", "reason": str(err), "exit": EXIT_BAD_INPUT}


def execute_point(settings: dict[str, Any], run_dir: str, threads: int | None = 1, progress: bool = False) -> dict:
    """Run one point into ``run_dir``: skipped when finished or diverged, left to the process
    that is running it, resumed from its checkpoint when interrupted, started otherwise.
    Returns ``{"status", "reason", ...}``; a ``KeyboardInterrupt`` (Ctrl-C; the run checkpoints
    first) propagates."""
    import torch

    from samedge.experiment.config import from_mapping
    from samedge.experiment.run.runner import run

    path = Path(run_dir)
    try:
        cfg = from_mapping(settings)
    except BadInput as err:
        return failed(err)
    previous = torch.get_num_threads()
    count = cfg.threads or threads
    if count:
        torch.set_num_threads(count)
    try:
        state = point_state(path, settings)
        if state.state in ("done", "diverged"):
            return {"status": state.state, "reason": "", "skipped": True}
        if state.state == "running":
            return {"status": "running", "reason": state.reason}
        if state.state == "damaged":
            return failed(state.reason)
        try:
            result = run(
                cfg,
                path,
                overwrite=state.state == "start" and RunDir(path).config.exists(),
                progress=progress,
                resume=state.state == "resume",
            )
        except RunDirError as err:  # another process may have taken the point since it was read
            now = point_state(path, settings)
            if isinstance(err, RunLocked) or now.state == "running":
                return {"status": "running", "reason": now.reason or str(err)}
            if now.state in ("done", "diverged"):
                return {"status": now.state, "reason": "", "skipped": True}
            return failed(err)
        except (BadInput, OSError) as err:
            return failed(err)
        s = result.summary
        if s.get("interrupted"):
            raise KeyboardInterrupt
        if s.get("diverged"):
            return {"status": "diverged", "reason": f"step {s.get('diverged_step')}: {s.get('reason', '')}"}
        return {"status": "done", "reason": "", "resumed": state.state == "resume"}
    finally:
        torch.set_num_threads(previous)


def describe_bug(err: BaseException) -> str:
    """A run's unexpected exception as one line (recorded as the point's ``error`` reason)."""
    return f"internal error {type(err).__name__}: {err}".splitlines()[0]
