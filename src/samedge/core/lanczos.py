"""The Lanczos process, shared by the eigen-solver and stochastic Lanczos quadrature.

:class:`LanczosProcess` runs the three-term recurrence on a :class:`LinearOperator` from a unit
start vector, one product per :meth:`~LanczosProcess.step`, with full reorthogonalization (the
new vector is projected off the whole basis twice: :func:`project_out`).  It holds the basis and
the tridiagonal matrix (``alphas`` on the diagonal, ``betas`` beside it); what to do after each
step is the caller's: :func:`samedge.core.eigen.lanczos` computes the Ritz pairs and stops on their
residuals, restarting when the Krylov space is exhausted; :func:`samedge.core.spectrum.slq_density`
takes a fixed number of steps and turns the tridiagonal matrix into quadrature nodes and weights.

:func:`orthonormal_rows` is the orthonormalizer of the core (block starts, deflation vectors).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from samedge.core.operator import LinearOperator

__all__ = ["LanczosProcess", "project_out", "orthonormal_rows"]


def project_out(w: Tensor, Q: Tensor) -> Tensor:
    """``w`` (a vector, or vectors as rows) less its part in the span of the orthonormal rows of
    ``Q``, projected out twice (classical Gram-Schmidt: twice is enough, Parlett)."""
    for _ in range(2):
        w = w - Q.T @ (Q @ w) if w.ndim == 1 else w - (w @ Q.T) @ Q
    return w


def orthonormal_rows(V: Tensor, against: Tensor | None = None) -> Tensor:
    """Orthonormal rows (float64) spanning ``V``'s rows, less any part in the row span of the
    orthonormal rows ``against``; rows that are (nearly) dependent are dropped."""
    W = V.double()
    if against is not None:
        W = project_out(W, against.double())
    rows: list[Tensor] = []
    for w in W:
        scale = float(torch.linalg.vector_norm(w))
        for _ in range(2):
            for q in rows:
                w = w - torch.dot(q, w) * q
        n = float(torch.linalg.vector_norm(w))
        if n > 1e-8 * max(scale, 1e-300):
            rows.append(w / n)
    return torch.stack(rows) if rows else W[:0]


class LanczosProcess:
    """Lanczos with full reorthogonalization on ``operator`` from the unit vector ``start``.

    Each :meth:`step` takes one product: with ``q_j`` the newest basis vector,
    ``alpha_j = q_j^T A q_j`` and the residual ``r = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}``
    (projected off the basis), whose norm is ``beta``.  Then :meth:`advance` continues from
    ``q_{j+1} = r / beta`` (``beta`` joins ``betas``), or :meth:`restart` from another vector when
    the Krylov space is exhausted (a zero joins ``betas``: the tridiagonal matrix splits into
    blocks).  After ``m`` steps ``basis`` holds ``m`` orthonormal vectors (``Q``, as rows) and
    ``A Q^T = Q^T T + r e_m^T`` with ``T`` the tridiagonal matrix of ``alphas`` and ``betas``.
    """

    def __init__(self, operator: LinearOperator, start: Tensor):
        self.operator = operator
        self.basis: list[Tensor] = []
        self.alphas: list[float] = []
        self.betas: list[float] = []
        #: norm of the newest residual (0 before the first step and after a restart)
        self.beta = 0.0
        #: the basis as rows (after the first step)
        self.Q: Tensor = start[None][:0]
        self._next: Tensor | None = start
        self._residual: Tensor | None = None

    def step(self) -> float:
        """One product: extend the basis and ``alphas``; return the new residual's norm ``beta``."""
        q = self._next
        if q is None:
            raise RuntimeError("advance() or restart() must come between two steps")
        self.basis.append(q)
        w = self.operator(q)
        alpha = float(torch.dot(q.double(), w.double()))
        w = w - alpha * q
        if len(self.basis) > 1:
            w = w - self.beta * self.basis[-2]
        self.Q = torch.stack(self.basis)
        w = project_out(w, self.Q)
        self.alphas.append(alpha)
        self.beta = float(torch.linalg.vector_norm(w.double()))
        self._next, self._residual = None, w
        return self.beta

    @property
    def residual(self) -> Tensor | None:
        """The newest residual ``r`` (after :meth:`step`, before :meth:`advance`): with the basis
        ``Q`` and ``T``, ``A Q^T = Q^T T + r e_m^T``, so a Ritz vector ``Q^T s`` has the product
        ``theta Q^T s + s_m r`` without another product."""
        return self._residual

    def advance(self) -> None:
        """Continue the recurrence: the next basis vector is the residual over its norm."""
        if self._residual is None:
            raise RuntimeError("step() must come before advance()")
        self.betas.append(self.beta)
        self._next, self._residual = self._residual / self.beta, None

    def restart(self, v: Tensor) -> None:
        """Continue from ``v`` (of the operator's dtype and device) made orthogonal to the basis and
        normalized, with a zero off-diagonal entry: for an exhausted Krylov space."""
        w = project_out(v, self.Q)
        self.betas.append(0.0)
        self.beta = 0.0
        self._next, self._residual = w / torch.linalg.vector_norm(w), None

    def tridiagonal(self) -> tuple[np.ndarray, np.ndarray]:
        """The diagonal (``alphas``) and off-diagonal (``betas``) of ``T``, as float64 arrays."""
        return np.array(self.alphas), np.array(self.betas)

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues of ``T`` (ascending, the Ritz values) and its eigenvectors (columns; ``Q^T S``
        are the Ritz vectors), by LAPACK's tridiagonal solver through SciPy."""
        return scipy.linalg.eigh_tridiagonal(*self.tridiagonal())
