"""The experiments: configuration, tasks, runs, their files, sweeps and the analyses over them.

Rooms, each a sub-package or module of this one (lower rooms never import higher ones; an
import-linter contract in ``pyproject.toml`` keeps it so):

* ``config`` -- :class:`RunConfig`, one validated record of a run's settings, and the presets;
* ``world`` -- this process's place among the processes of a run (rank, world size, sharding);
* ``store/`` -- one run directory's files: their names and the settings' reader
  (:class:`RunDir`), creation and lock, checkpoint, metrics, spectral densities;
* ``tasks/`` -- the paper's three tasks (data, model, loss) by name;
* ``run/`` -- one run: the runner, its extra readings, re-measuring, the ``--nproc`` launcher;
* ``sweeps/`` -- many runs: sweep definitions, the executors, the paper's grids;
* ``analysis/`` -- what is drawn and concluded from run directories: figures, overlays, the
  paper's report, the flatness check;
* ``cli`` -- the ``samedge`` command.

The names below are the experiment layer's public face (what ``benchmarks/`` and scripts use);
each is imported on first use, so importing this package costs nothing.
"""

import importlib
from typing import Any

#: public name -> the module that defines it (``module:name`` where the name differs: the function
#: ``run`` is ``run_experiment`` here, as ``samedge.experiment.run`` is the sub-package of one run)
_PUBLIC = {
    "RunConfig": "samedge.experiment.config",
    "build_config": "samedge.experiment.config",
    "TASKS": "samedge.experiment.config",
    "build_task": "samedge.experiment.tasks.registry",
    "RunDir": "samedge.experiment.store.layout",
    "read_metrics": "samedge.experiment.store.metrics",
    "summarize": "samedge.experiment.store.metrics",
    "load_checkpoint": "samedge.experiment.store.checkpoint",
    "run_experiment": "samedge.experiment.run.runner:run",
    "remeasure": "samedge.experiment.run.remeasure",
    "SweepSpec": "samedge.experiment.sweeps.spec",
    "prepare_sweep_dir": "samedge.experiment.sweeps.spec",
    "run_sweep": "samedge.experiment.sweeps.driver",
    "plot_run": "samedge.experiment.analysis.figures",
    "overlay_runs": "samedge.experiment.analysis.overlay",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:  # PEP 562: imported on first use
    if name in _PUBLIC:
        module, _, attr = _PUBLIC[name].partition(":")
        return getattr(importlib.import_module(module), attr or name)
    raise AttributeError(f"module 'samedge.experiment' has no attribute {name!r}")
