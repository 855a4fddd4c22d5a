"""One measurement at the current parameters: sharpness, edges, alignments, diagnostics.

Used by the runner at every ``measure_every`` steps and by :class:`samedge.core.tracker.SharpnessTracker`
in a user's own loop.  The gradient and SAM gradient are passed in (the step computes them
anyway), so a measurement costs only the eigen-solve's HVPs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from samedge.core.blocks import BlockReading
from samedge.core.curvature import HessianEigensolver
from samedge.core.method import Method
from samedge.core.objective import Objective
from samedge.core.params import flatten, norm, unflatten

__all__ = ["Measurement", "measure", "alignment", "repeat_check"]


@dataclass(frozen=True)
class Measurement:
    """What the sharpness study records at one point ``w``.

    ``sharpness`` is the largest Hessian eigenvalue (over the parameters the objective differentiates); ``edge`` the optimizer's stability threshold
    (SAM-edge for SAM, USAM edge for USAM, ``(2 + 2 beta)/eta`` for GD); ``gd_edge`` the GD (or
    heavy-ball) edge; alignments are ``|cos|`` between a gradient and the top eigenvector.
    """

    sharpness: float
    grad_norm: float
    gd_edge: float
    edge: float
    sharpness_over_edge: float
    grad_alignment: float
    sam_grad_alignment: float
    eigenvalues: tuple[float, ...]
    relative_residual: float
    converged: bool
    hvps: int
    sharpness_perturbed: float | None = None
    #: whether two products with the top eigenvector agreed (None: not checked); a function that
    #: changed between products (randomness or state the objective does not control) is never
    #: reported as converged
    hvp_consistent: bool | None = None
    #: error bound of the sharpness relative to it (``EigenResult.relative_bounds`` of the top value)
    eig_bound: float = math.nan
    #: per block of parameters (asked for with ``groups=`` or ``by_module=True``): the top
    #: eigenvector's mass and Rayleigh share, and the block's own top eigenvalue where computed
    #: (:mod:`samedge.core.blocks`); None when not asked for
    blocks: tuple[BlockReading, ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def alignment(a: Sequence[Tensor] | Tensor, v: Tensor) -> float:
    """``|cos(a, v)|`` for a parameter tuple (or flat vector) ``a`` and a flat vector ``v``."""
    a_flat = a if isinstance(a, Tensor) else flatten(a)
    na, nv = float(torch.linalg.vector_norm(a_flat.double())), float(torch.linalg.vector_norm(v.double()))
    if na == 0.0 or nv == 0.0:
        return 0.0
    return abs(float(torch.dot(a_flat.double(), v.double()))) / (na * nv)


def measure(
    objective: Objective,
    params: Sequence[Tensor],
    grad: Sequence[Tensor],
    sam_grad: Sequence[Tensor],
    solver: HessianEigensolver,
    *,
    method: Method,
    perturbed_params: Sequence[Tensor] | None = None,
    perturbed_solver: HessianEigensolver | None = None,
    check_repeat: bool = False,
) -> Measurement:
    """Eigen-solve at ``params`` (and, if given, at the SAM point ``perturbed_params``); the edges
    are ``method``'s at ``||grad||``.  With ``check_repeat``, two more HVPs with the top
    eigenvector must agree (see :func:`repeat_check`)."""
    result = solver(objective, params)
    g_norm = norm(grad)
    sharpness = float(result.eigenvalues[0])
    edge = method.edge(g_norm) if math.isfinite(g_norm) else math.nan
    top = result.eigenvectors[0]
    hvps = result.matvecs
    consistent = None
    if check_repeat:
        consistent = repeat_check(objective, params, top, solver.tol)
        hvps += 2
    sharpness_perturbed = None
    if perturbed_params is not None:
        other = (perturbed_solver or solver)(objective, perturbed_params)
        sharpness_perturbed = float(other.eigenvalues[0])
        hvps += other.matvecs
    return Measurement(
        sharpness=sharpness,
        grad_norm=g_norm,
        gd_edge=method.gd_edge,
        edge=edge,
        sharpness_over_edge=sharpness / edge if edge > 0 else math.inf,
        grad_alignment=alignment(grad, top),
        sam_grad_alignment=alignment(sam_grad, top),
        eigenvalues=tuple(float(x) for x in result.eigenvalues),
        relative_residual=float(result.relative_residuals.max()),
        converged=bool(result.converged) and consistent is not False,
        hvps=hvps,
        sharpness_perturbed=sharpness_perturbed,
        hvp_consistent=consistent,
        eig_bound=float(result.relative_bounds[0]),
    )


def repeat_check(objective: Objective, params: Sequence[Tensor], vector: Tensor, tol: float) -> bool:
    """Whether two Hessian-vector products with the same ``vector`` agree to within
    ``max(tol, 100 eps)`` relative: a cheap test that the function did not change between
    products (it does when a layer draws random numbers the objective does not seed, or keeps
    state between calls).  A warning says so when they disagree."""
    like = tuple(params)
    v = unflatten(vector.to(like[0].dtype), like)
    # each product on a freshly built graph: a reused graph would agree with itself trivially
    objective.release_hvp_graph()
    first = flatten(objective.hvp(like, v))
    objective.release_hvp_graph()
    second = flatten(objective.hvp(like, v))
    objective.release_hvp_graph()
    scale = float(torch.linalg.vector_norm(first.double()))
    diff = float(torch.linalg.vector_norm((first - second).double()))
    bound = max(tol, 100 * torch.finfo(first.dtype).eps) * scale
    if diff <= bound:
        return True
    warnings.warn(
        f"two Hessian-vector products at the same point differ by {diff / max(scale, 1e-300):.2g} relative: the "
        "function changes between calls (a random or stateful layer samedge does not control); "
        "the reading is marked not converged",
        stacklevel=3,
    )
    return False
