"""Hessian eigenpairs of an :class:`~samedge.core.objective.Objective`, warm-started across calls.

:class:`HessianEigensolver` binds an objective's exact HVP (its
:meth:`~samedge.core.objective.Objective.hvp_operator`) to a solver from :mod:`samedge.core.eigen`
and keeps the last eigenvectors, so that a reading during training starts from the previous
one (a few HVPs instead of tens).  With ``block = b > k`` it keeps the top ``b`` Ritz vectors and starts the next solve from
that block (see :func:`samedge.core.eigen.lanczos`).  Method ``"paper"`` is Long & Bartlett's
estimator (finite-difference HVP with ``eps = 1e-3``, power iteration from a fresh random vector,
relative-change rule), never warm-started, for comparison only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from samedge.core.eigen import SOLVERS, EigenResult, paper_power_iteration
from samedge.core.objective import Objective
from samedge.core.operator import LinearOperator
from samedge.core.params import flatten, unflatten
from samedge.core.validation import positive_int, real_number

__all__ = ["HessianEigensolver", "METHODS", "ONE_EIGENPAIR_METHODS", "hessian_eigenpairs"]

METHODS = (*SOLVERS, "paper")
#: methods that find one eigenpair only (``k`` must be 1)
ONE_EIGENPAIR_METHODS = ("power", "paper-power", "paper")


class HessianEigensolver:
    """Top-``k`` Hessian eigenpairs at given parameters, warm-started from the previous call."""

    def __init__(
        self,
        *,
        k: int = 1,
        method: str = "lanczos",
        tol: float = 1e-3,
        max_iter: int = 100,
        warm_start: bool = True,
        seed: int = 0,
        fd_eps: float = 1e-3,
        block: int = 1,
    ):
        if method not in METHODS:
            raise ValueError(f"unknown eigen-solver {method!r}; choose one of {', '.join(METHODS)}")
        k = positive_int("k", k)
        if method in ONE_EIGENPAIR_METHODS and k != 1:
            raise ValueError(f"eigen-solver {method!r} finds one eigenvalue; use k = 1 or lanczos")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        tol = real_number("tol", tol, low=0.0, low_open=True)
        max_iter = positive_int("max_iter", max_iter)
        self.k, self.method, self.tol, self.max_iter = k, method, tol, max_iter
        #: Ritz vectors carried from one solve to the next as its start (lanczos only; at least k)
        self.block = max(block, k) if method == "lanczos" else k
        self.warm_start = warm_start and method != "paper"
        self.fd_eps = fd_eps
        self.generator = torch.Generator().manual_seed(seed)
        self.previous: Tensor | None = None
        #: the last solve's result (its eigenvectors and, where the solver has them, their products)
        self.last: EigenResult | None = None

    def __call__(
        self,
        objective: Objective,
        params: Sequence[Tensor],
        transform: Callable[[LinearOperator], LinearOperator] | None = None,
    ) -> EigenResult:
        """Top eigenpairs of the Hessian at ``params``, or of ``transform(H)`` (an operator built
        from the Hessian's, e.g. the preconditioned ``P^-1/2 H P^-1/2``; lanczos, eigsh, power)."""
        params = tuple(params)
        operator: LinearOperator
        if self.method == "paper":

            def matvec(v: Tensor) -> Tensor:
                return flatten(objective.finite_difference_hvp(params, unflatten(v, params), self.fd_eps))

            first = params[0]
            operator = LinearOperator(matvec, sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
            solver = paper_power_iteration
        else:
            # every product after the first reuses the gradient graph (released below)
            operator = objective.hvp_operator(params)
            if transform is not None:
                operator = transform(operator)
            solver = SOLVERS[self.method]
        keep: dict[str, Any] = {"keep": self.block} if self.block > self.k else {}  # lanczos only
        try:
            result = solver(
                operator,
                k=self.k,
                v0=self.previous if self.warm_start else None,
                tol=self.tol,
                max_iter=self.max_iter,
                generator=self.generator,
                **keep,
            )
        finally:
            objective.release_hvp_graph()
        start = result.block if result.block is not None else result.eigenvectors
        if self.warm_start and torch.isfinite(start).all():
            self.previous = start.detach().clone()
        self.last = result
        return result

    def state_dict(self) -> dict:
        return {"previous": self.previous, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.previous = state["previous"]
        self.generator.set_state(state["generator"])


def hessian_eigenpairs(objective: Objective, params: Sequence[Tensor], **solver_options) -> EigenResult:
    """One cold eigen-solve: ``HessianEigensolver(**solver_options)(objective, params)``."""
    return HessianEigensolver(warm_start=False, **solver_options)(objective, params)
