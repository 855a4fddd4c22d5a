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
from samedge.core.operator import LinearOperator
from samedge.core.params import flatten, norm, unflatten

__all__ = ["Measurement", "measure", "alignment", "repeat_check", "preconditioned_operator"]


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
    #: preconditioned bases (adam, adamw, rmsprop): the top eigenvalue of ``P^-1/2 (H + lambda I) P^-1/2``
    #: (``lambda`` the coupled weight decay; None for sgd, NaN before the first step, when there is no P)
    preconditioned_sharpness: float | None = None
    #: preconditioned bases with SAM/USAM: the top eigenvalue of ``P^-1/2 (H + s H^2 + lambda I) P^-1/2``
    #: (``s = rho/||g||`` or ``rho``), the quantity ``edge`` bounds; two HVPs per product
    effective_sharpness: float | None = None
    #: HVPs of the preconditioned and effective readings (included in ``hvps``)
    preconditioned_hvps: int | None = None
    effective_hvps: int | None = None

    @property
    def compared_sharpness(self) -> float:
        """What ``edge`` bounds: the effective (SAM/USAM over a preconditioned base), preconditioned
        (a preconditioned base) or plain sharpness."""
        for value in (self.effective_sharpness, self.preconditioned_sharpness):
            if value is not None:
                return value
        return self.sharpness

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
    preconditioner: Sequence[Tensor] | None = None,
    preconditioned_solver: HessianEigensolver | None = None,
    effective_solver: HessianEigensolver | None = None,
) -> Measurement:
    """Eigen-solve at ``params`` (and, if given, at the SAM point ``perturbed_params``); the edges
    are ``method``'s at ``||grad||``.  With ``check_repeat``, two more HVPs with the top
    eigenvector must agree (see :func:`repeat_check`).

    A preconditioned ``method`` (adam, adamw, rmsprop) also reads the top eigenvalue of
    ``P^-1/2 (H + lambda I) P^-1/2`` with ``preconditioner`` P (the rule's, one tensor per
    parameter) and, for SAM/USAM, of ``P^-1/2 (H + s H^2 + lambda I) P^-1/2``: the ratio is the
    latter over ``method.threshold``, exactly 1 at the edge.  Each with its own warm solver
    (default: ``solver``).  Without P (before the first step) these are NaN."""
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
    extra: dict = {}
    compared = sharpness
    if method.preconditioned:
        extra = _preconditioned(
            objective,
            params,
            method,
            g_norm,
            preconditioner,
            preconditioned_solver or solver,
            effective_solver or solver,
        )
        hvps += extra["preconditioned_hvps"] + (extra["effective_hvps"] or 0)
        compared = extra["effective_sharpness"] if method.perturbs else extra["preconditioned_sharpness"]
    return Measurement(
        sharpness=sharpness,
        grad_norm=g_norm,
        gd_edge=method.gd_edge,
        edge=edge,
        sharpness_over_edge=compared / edge if edge > 0 else math.inf,
        **extra,
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


def preconditioned_operator(
    hessian: LinearOperator, preconditioner: Sequence[Tensor], scale: float = 0.0, shift: float = 0.0
) -> LinearOperator:
    """``v -> P^-1/2 (H + scale H^2 + shift I) P^-1/2 v`` from the Hessian's operator (two HVPs
    per product when ``scale != 0``); its ``matvecs`` counts its products."""
    r = flatten(tuple(preconditioner)).to(dtype=hessian.dtype, device=hessian.device).rsqrt()

    def matvec(v: Tensor) -> Tensor:
        x = r * v
        hx = hessian(x)
        out = hx + scale * hessian(hx) if scale != 0.0 else hx
        if shift != 0.0:
            out = out + shift * x
        return r * out

    return LinearOperator(matvec, hessian.dim, dtype=hessian.dtype, device=hessian.device)


def _preconditioned(
    objective: Objective,
    params: Sequence[Tensor],
    method: Method,
    g_norm: float,
    preconditioner: Sequence[Tensor] | None,
    solver: HessianEigensolver,
    effective_solver: HessianEigensolver,
) -> dict:
    """The preconditioned (and, for SAM/USAM, effective) sharpness and their HVPs."""
    out: dict = dict(preconditioned_sharpness=math.nan, preconditioned_hvps=0)
    out.update(effective_sharpness=math.nan if method.perturbs else None, effective_hvps=0 if method.perturbs else None)
    if preconditioner is None or not math.isfinite(g_norm):
        return out
    shift = method.rule.coupled_decay()
    result = solver(objective, params, lambda h: preconditioned_operator(h, preconditioner, 0.0, shift))
    out.update(preconditioned_sharpness=float(result.eigenvalues[0]), preconditioned_hvps=result.matvecs)
    if method.perturbs:
        scale = method.curvature_scale(g_norm)
        per_product = 2 if scale != 0.0 else 1
        result = effective_solver(objective, params, lambda h: preconditioned_operator(h, preconditioner, scale, shift))
        out.update(effective_sharpness=float(result.eigenvalues[0]), effective_hvps=per_product * result.matvecs)
    return out


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
