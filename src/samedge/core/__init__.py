"""The library core: pure functions and small classes, no files, no command line, no printing.

* :mod:`~samedge.core.thresholds` -- the GD, heavy-ball, SAM and USAM edges (closed forms);
* :mod:`~samedge.core.method` -- :class:`Method`, what an optimizer kind means (edge, step);
* :mod:`~samedge.core.update_rules` -- :class:`UpdateRule`, an optimizer's step that owns its
  state, and the :data:`UPDATE_RULES` registry (heavy-ball SGD, ``"sgd"``);
* :mod:`~samedge.core.optim` -- SAM/USAM/heavy-ball steps on parameter tuples and the ``SAM``
  torch optimizer;
* :mod:`~samedge.core.objective` -- the chunked full-batch loss, gradient and exact HVP;
* :mod:`~samedge.core.distributed` -- the same objective sharded over ``torch.distributed`` ranks;
* :mod:`~samedge.core.operator` -- :class:`LinearOperator`, a symmetric operator given by its
  product, which the solvers take;
* :mod:`~samedge.core.lanczos` -- the Lanczos process shared by the eigen-solver and SLQ;
* :mod:`~samedge.core.eigen` -- Lanczos, eigsh and power iteration with residuals;
* :mod:`~samedge.core.curvature` -- the warm-started Hessian eigen-solver;
* :mod:`~samedge.core.spectrum` -- Hutchinson trace and SLQ spectral density;
* :mod:`~samedge.core.blocks` -- the top eigenvector's mass per block and the blocks' own top
  eigenvalues; :mod:`~samedge.core.batch_sharpness` -- curvature of minibatches along their steps;
* :mod:`~samedge.core.measurements` and :mod:`~samedge.core.tracker` -- one reading, and
  readings in a user's own loop;
* :mod:`~samedge.core.params`, :mod:`~samedge.core.losses`, :mod:`~samedge.core.quadratic`,
  :mod:`~samedge.core.validation` -- helpers and the quadratic model.
"""

from samedge.core.batch_sharpness import BatchSharpness, batch_sharpness
from samedge.core.blocks import BlockEigensolver, BlockReading
from samedge.core.curvature import HessianEigensolver, hessian_eigenpairs
from samedge.core.distributed import ShardedObjective
from samedge.core.eigen import EigenResult, lanczos
from samedge.core.losses import SummedLoss
from samedge.core.measurements import Measurement, measure
from samedge.core.method import METHOD_KINDS, Method, edge_for
from samedge.core.objective import Objective
from samedge.core.operator import LinearOperator
from samedge.core.optim import SAM, heavy_ball_update, perturbation, sam_gradient
from samedge.core.spectrum import (
    SpectralDensity,
    TraceEstimate,
    hessian_density,
    hessian_trace,
    hutchinson_trace,
    slq_density,
)
from samedge.core.thresholds import gd_edge, momentum_edge, sam_edge, usam_edge
from samedge.core.tracker import SharpnessTracker
from samedge.core.update_rules import UPDATE_RULES, HeavyBallSGD, UpdateRule

__all__ = [
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
    "SummedLoss",
    "ShardedObjective",
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
    "hutchinson_trace",
    "slq_density",
    "hessian_trace",
    "hessian_density",
    "BlockReading",
    "BlockEigensolver",
    "BatchSharpness",
    "batch_sharpness",
]
