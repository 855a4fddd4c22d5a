"""samedge: gradient descent and SAM at the edge of stability.

Two layers (the direction is checked by an import-linter contract in ``pyproject.toml``):

* :mod:`samedge.core` -- the library: stability thresholds, the optimizer method, the chunked
  objective with exact HVPs, eigen-solvers, measurements and :class:`SharpnessTracker`.  Pure
  functions and small classes: no files, no command line, no printing, no plotting.
* :mod:`samedge.experiment` -- the experiments: configuration, tasks, the runner, run
  directories, metrics files, checkpoints, figures and the command line.  It uses the core;
  the core never imports it.

:mod:`samedge.data` and :mod:`samedge.models` hold the data sets and the paper's models.
The public library API is importable from here; the core (and so torch) is imported on first
use of one of its names, so that the command line can answer some things before torch loads.
"""

from typing import TYPE_CHECKING

__version__ = "0.2.0"

from samedge.errors import BadInput

#: The library API: every name of ``samedge.core.__all__`` (a test keeps the two equal, and the
#: names for type checkers below too), imported on first use.
_CORE_NAMES = (
    "Method",
    "METHOD_KINDS",
    "gd_edge",
    "momentum_edge",
    "sam_edge",
    "usam_edge",
    "edge_for",
    "UpdateRule",
    "UPDATE_RULES",
    "HeavyBallSGD",
    "Objective",
    "ShardedObjective",
    "SummedLoss",
    "LinearOperator",
    "EigenResult",
    "lanczos",
    "HessianEigensolver",
    "hessian_eigenpairs",
    "SAM",
    "perturbation",
    "sam_gradient",
    "heavy_ball_update",
    "Measurement",
    "measure",
    "SharpnessTracker",
    "TraceEstimate",
    "SpectralDensity",
    "hessian_trace",
    "hessian_density",
    "hutchinson_trace",
    "slq_density",
    "BlockReading",
    "BlockEigensolver",
    "BatchSharpness",
    "batch_sharpness",
)

__all__ = ["__version__", "BadInput", *_CORE_NAMES]

if TYPE_CHECKING:  # the names as static type checkers see them
    from samedge.core import (
        METHOD_KINDS,
        SAM,
        UPDATE_RULES,
        BatchSharpness,
        BlockEigensolver,
        BlockReading,
        EigenResult,
        HeavyBallSGD,
        HessianEigensolver,
        LinearOperator,
        Measurement,
        Method,
        Objective,
        ShardedObjective,
        SharpnessTracker,
        SpectralDensity,
        SummedLoss,
        TraceEstimate,
        UpdateRule,
        batch_sharpness,
        edge_for,
        gd_edge,
        heavy_ball_update,
        hessian_density,
        hessian_eigenpairs,
        hessian_trace,
        hutchinson_trace,
        lanczos,
        measure,
        momentum_edge,
        perturbation,
        sam_edge,
        sam_gradient,
        slq_density,
        usam_edge,
    )


def __getattr__(name: str):  # PEP 562: the core's names, imported on first use
    if name in _CORE_NAMES:
        import samedge.core

        return getattr(samedge.core, name)
    raise AttributeError(f"module 'samedge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CORE_NAMES))
