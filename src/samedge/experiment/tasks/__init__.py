"""Tasks: a data set, a model and a loss built from a :class:`~samedge.experiment.config.RunConfig`.

:mod:`.base` holds :class:`Task` and what builders share; :mod:`.registry` maps each task name to
its builder; ``mnist``, ``cifar10`` and ``shakespeare`` are the paper's three experiments.
"""

from samedge.experiment.tasks.base import Task
from samedge.experiment.tasks.registry import TASK_BUILDERS, build_task

__all__ = ["Task", "TASK_BUILDERS", "build_task"]
