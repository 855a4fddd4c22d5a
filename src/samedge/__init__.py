"""samedge: gradient descent and SAM at the edge of stability.

Two layers (the direction is checked by an import-linter contract in ``pyproject.toml``):

* :mod:`samedge.core` -- the library: stability thresholds, the optimizer method, the chunked
  objective with exact HVPs, eigen-solvers, measurements and :class:`SharpnessTracker`.  Pure
  functions and small classes: no files, no command line, no printing, no plotting.
* :mod:`samedge.experiment` -- the experiments: configuration, tasks, the runner, run
  directories, metrics files, checkpoints, figures and the command line.  It uses the core;
  the core never imports it.

:mod:`samedge.data` and :mod:`samedge.models` hold the data sets and the paper's models.
The public library API is importable from here.
"""

__version__ = "0.2.0"

from samedge.core import (
    SAM,
    EigenResult,
    HessianEigensolver,
    Measurement,
    Method,
    Objective,
    ShardedObjective,
    SharpnessTracker,
    edge_for,
    gd_edge,
    heavy_ball_update,
    hessian_eigenpairs,
    lanczos,
    momentum_edge,
    perturbation,
    sam_edge,
    sam_gradient,
    usam_edge,
)
from samedge.errors import BadInput

__all__ = [
    "__version__",
    "Method",
    "gd_edge",
    "momentum_edge",
    "sam_edge",
    "usam_edge",
    "edge_for",
    "Objective",
    "ShardedObjective",
    "EigenResult",
    "lanczos",
    "HessianEigensolver",
    "hessian_eigenpairs",
    "SAM",
    "perturbation",
    "sam_gradient",
    "heavy_ball_update",
    "Measurement",
    "SharpnessTracker",
    "BadInput",
]
