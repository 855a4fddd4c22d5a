"""One measurement at the current parameters: sharpness, edges, alignments, diagnostics.

Used by the runner at every ``measure_every`` steps and by :class:`samedge.tracker.SharpnessTracker`
in a user's own loop.  The gradient and SAM gradient are passed in (the step computes them
anyway), so a measurement costs only the eigen-solve's HVPs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from samedge.core.curvature import HessianEigensolver
from samedge.core.method import Method
from samedge.core.objective import Objective
from samedge.core.params import flatten, norm

__all__ = ["Measurement", "measure", "alignment"]


@dataclass(frozen=True)
class Measurement:
    """What the sharpness study records at one point ``w``.

    ``sharpness`` is the largest Hessian eigenvalue; ``edge`` the optimizer's stability threshold
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
) -> Measurement:
    """Eigen-solve at ``params`` (and, if given, at the SAM point ``perturbed_params``); the edges
    are ``method``'s at ``||grad||``."""
    result = solver(objective, params)
    g_norm = norm(grad)
    sharpness = float(result.eigenvalues[0])
    edge = method.edge(g_norm) if math.isfinite(g_norm) else math.nan
    top = result.eigenvectors[0]
    hvps = result.matvecs
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
        converged=bool(result.converged),
        hvps=hvps,
        sharpness_perturbed=sharpness_perturbed,
    )
