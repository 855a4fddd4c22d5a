"""The executors of ``samedge sweep`` and ``samedge reproduce``, by name.

A new executor is a new module here with an :class:`~samedge.experiment.sweeps.executors.base.Executor`
subclass, plus one line in :data:`EXECUTORS`; the command line's ``--executor`` choices and flags
come from this table.
"""

from __future__ import annotations

import importlib

from samedge.errors import ConfigError
from samedge.experiment.sweeps.executors.base import Executor

__all__ = ["EXECUTORS", "executor_class", "Executor"]

#: name -> "module:class" (imported on first use: an executor's package is needed only when it runs)
EXECUTORS: dict[str, str] = {
    "local": "samedge.experiment.sweeps.executors.local:LocalExecutor",
    "serial": "samedge.experiment.sweeps.executors.serial:SerialExecutor",
    "ray": "samedge.experiment.sweeps.executors.ray:RayExecutor",
    "submitit": "samedge.experiment.sweeps.executors.submitit_slurm:SubmititExecutor",
}


def executor_class(name: str) -> type[Executor]:
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
    module, cls = EXECUTORS[name].split(":")
    return getattr(importlib.import_module(module), cls)
