"""The tasks by name: each is a module of this package with a builder ``RunConfig -> Task``.

A new task is a new module here plus one line in :data:`TASK_BUILDERS` (and its name in
:data:`samedge.experiment.config.TASKS`, the names a configuration may give, with a preset file of
that name).  Builders are imported on first use, so naming a task loads only its data and model.
"""

from __future__ import annotations

import importlib

from samedge.experiment.config import TASKS, RunConfig
from samedge.experiment.tasks.base import Task

__all__ = ["TASK_BUILDERS", "build_task"]

#: task name -> "module:function" of its builder
TASK_BUILDERS: dict[str, str] = {
    "mnist": "samedge.experiment.tasks.mnist:build_mnist",
    "cifar10": "samedge.experiment.tasks.cifar10:build_cifar10",
    "shakespeare": "samedge.experiment.tasks.shakespeare:build_shakespeare",
}


def build_task(cfg: RunConfig) -> Task:
    """The data, model and objectives of ``cfg.task`` as ``cfg`` sets them."""
    if cfg.task not in TASK_BUILDERS:  # config validation knows :data:`TASKS`; a test keeps the two equal
        raise ValueError(f"task {cfg.task!r} has no builder; tasks: {', '.join(TASKS)}")
    module, function = TASK_BUILDERS[cfg.task].split(":")
    task = getattr(importlib.import_module(module), function)(cfg)
    if cfg.measure_test:
        task.test_every_measurement = True
    return task
