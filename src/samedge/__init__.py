"""samedge: gradient descent and SAM at the edge of stability.

The functional core is importable from here; the runner, CLI and plotting live in their own
modules (``samedge.runner``, ``samedge.cli``, ``samedge.plotting``).
"""

__version__ = "0.1.0"

from .curvature import HessianEigensolver, hessian_eigenpairs
from .eigen import EigenResult, lanczos
from .objective import Objective
from .optim import SAM, heavy_ball_update, perturbation, sam_gradient
from .thresholds import edge_for, gd_edge, momentum_edge, sam_edge, usam_edge
from .tracker import SharpnessTracker

__all__ = [
    "__version__",
    "gd_edge", "momentum_edge", "sam_edge", "usam_edge", "edge_for",
    "Objective", "EigenResult", "lanczos", "HessianEigensolver", "hessian_eigenpairs",
    "SAM", "perturbation", "sam_gradient", "heavy_ball_update",
    "SharpnessTracker",
]
