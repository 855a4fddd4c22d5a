"""Top eigenpairs of a symmetric operator given only as a matrix-vector product.

Every solver returns an :class:`EigenResult` that carries its own diagnostics: residual norms
``||A v - lam v||``, whether the stopping rule was met (``converged``) and the number of
matrix-vector products (``matvecs``; HVPs when the operator is a Hessian).

* :func:`lanczos` (default): Lanczos with full reorthogonalization and a residual-based stopping
  rule, warm-startable from previous eigenvectors.  It is written here rather than taken from
  ``scipy.sparse.linalg.eigsh`` because ARPACK builds a Krylov basis of at least ``ncv`` vectors
  (20 by default, never fewer than ``k + 1``) before it first tests convergence, and takes a
  single start vector: a warm start from the previous step's eigenvector, which is within a few
  HVPs of converging, still costs ``ncv`` HVPs.  Here convergence is tested after every step
  (``benchmarks/RESULTS.md`` compares the two).  The recurrence is
  :class:`~samedge.core.lanczos.LanczosProcess`, shared with the spectral density.
* :func:`eigsh` : SciPy's ARPACK, with residuals computed afterwards (k extra products, counted).
* :func:`power_iteration`: power iteration stopped on the residual (not the relative change).
* :func:`paper_power_iteration`: the estimator of Long & Bartlett's code, kept as a baseline:
  stops when ``||A v||`` changes by less than ``rtol`` relative, at most 100 products.  It
  reports its residual, but its stopping rule does not bound it.

Every solver takes the operator as a :class:`~samedge.core.operator.LinearOperator` (which knows its
``dim``, ``dtype`` and ``device`` and counts its products), or as a plain ``matvec`` callable on
torch tensors of shape ``(dim,)`` with ``dim`` (and ``dtype``, ``device``) beside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor

from samedge.core.lanczos import LanczosProcess, orthonormal_rows
from samedge.core.operator import LinearOperator, Matvec, as_operator

__all__ = ["EigenResult", "lanczos", "eigsh", "power_iteration", "paper_power_iteration", "SOLVERS"]


@dataclass(frozen=True)
class EigenResult:
    """Top eigenpairs, largest first, with their diagnostics.

    ``residuals[i] = ||A v_i - eigenvalues[i] v_i||`` (for Lanczos the exact-arithmetic value
    ``beta_m |s_{m,i}|`` from the Lanczos relation; the tests check it against the true one).
    """

    eigenvalues: np.ndarray
    eigenvectors: Tensor
    residuals: np.ndarray
    converged: bool
    matvecs: int
    method: str
    #: distance from each Ritz value to the nearest other Ritz value the solver saw (Lanczos: all
    #: the tridiagonal's; others: the ``k`` returned); NaN where there is none
    gaps: np.ndarray | None = None
    #: the top Ritz vectors (rows, ``keep`` of them, the ``k`` eigenvectors first) when the solver
    #: was asked to keep more than ``k`` for the next solve's warm start; None otherwise
    block: Tensor | None = None
    #: the operator applied to each eigenvector (rows, float64), where the solver has it without
    #: another product (Lanczos: ``theta v + s_m r`` from the Lanczos relation, or the stored
    #: products of a block start; power iteration: its last product); None otherwise
    products: Tensor | None = None

    @property
    def relative_residuals(self) -> np.ndarray:
        scale = max(float(np.max(np.abs(self.eigenvalues))), np.finfo(float).tiny)
        return self.residuals / scale

    @property
    def bounds(self) -> np.ndarray:
        """Error bound of each eigenvalue: ``min(r, r**2 / gap)`` (Kato-Temple's form, with the gap
        estimated by the nearest other Ritz value; ``r`` alone where no gap is known).  The
        residual part is rigorous (an eigenvalue lies within ``r`` of the Ritz value); the
        ``r**2 / gap`` part relies on the gap estimate, which for the top value is the distance
        to the second Ritz value (a lower bound of the second eigenvalue, so the estimate can be
        too wide while the Krylov space has not yet resolved the second eigenvalue)."""
        r = np.asarray(self.residuals, dtype=float)
        if self.gaps is None:
            return r.copy()
        gaps = np.asarray(self.gaps, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            quad = np.where(np.isfinite(gaps) & (gaps > 0), r**2 / gaps, np.inf)
        return np.minimum(r, quad)

    @property
    def relative_bounds(self) -> np.ndarray:
        scale = max(float(np.max(np.abs(self.eigenvalues))), np.finfo(float).tiny)
        return self.bounds / scale


def _gaps(wanted: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """For each of ``wanted`` (a subset of ``seen``, by position), the distance to the nearest
    other value of ``seen``."""
    out = np.full(len(wanted), np.nan)
    for i in range(len(wanted)):
        others = np.delete(seen, i)
        if len(others):
            out[i] = float(np.min(np.abs(others - wanted[i])))
    return out


def _random_vector(dim: int, generator: torch.Generator | None, dtype, device) -> Tensor:
    """A standard normal vector drawn in float64 on the CPU from ``generator``, then moved."""
    return torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def _start_vector(dim: int, v0: Tensor | None, generator: torch.Generator | None, dtype, device) -> Tensor:
    if v0 is None:
        v = _random_vector(dim, generator, dtype, device)
    else:
        v = v0.to(dtype=dtype, device=device)
        if v.ndim == 2:  # several previous eigenvectors: start from their sum
            v = v.sum(dim=0)
        if v.shape != (dim,):
            raise ValueError(f"start vector has shape {tuple(v.shape)}, expected ({dim},)")
    n = torch.linalg.vector_norm(v)
    if not torch.isfinite(n) or n == 0:
        raise ValueError("start vector must be finite and nonzero")
    return v / n


def lanczos(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    *,
    k: int = 1,
    v0: Tensor | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    keep: int | None = None,
) -> EigenResult:
    """The ``k`` largest (algebraic) eigenpairs by Lanczos with full reorthogonalization.

    ``operator``: a :class:`~samedge.core.operator.LinearOperator`, or a ``matvec`` callable with
    its ``dim`` (``dtype`` float32 and ``device`` CPU unless given).
    Stops as soon as every wanted Ritz pair has ``residual <= tol * max |ritz value|``; since an
    eigenvalue lies within the residual of each Ritz value, this bounds the relative error of
    the eigenvalues by ``tol`` (in practice the error is about ``residual**2 / gap``, far smaller).
    ``v0`` warm-starts the iteration: one vector, or a block of vectors as rows (the previous
    solve's top Ritz vectors).  A block start first takes the products of the whole block and then
    adds, at each step, the residual of the wanted Ritz pair that is furthest from converged (for
    a single vector this spans the same Krylov space as Lanczos).  A block holds every copy of a
    repeated eigenvalue it spans, which one start vector's Krylov space can miss (what it saves
    on a clustered spectrum: ``benchmarks/RESULTS.md``).
    ``keep`` (>= ``k``) sets how many top Ritz vectors the result carries in ``block``, to start
    the next solve from.  When the Krylov space becomes invariant (the start lies in an
    eigenspace), the iteration restarts from a random vector orthogonal to it, so one more
    product checks for eigenvalues it cannot see.
    """
    op = as_operator(operator, dim, dtype=dtype, device=device)
    if k < 1 or k > op.dim:
        raise ValueError(f"k must be in [1, {op.dim}], got {k}")
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    max_iter = min(max_iter, op.dim)
    if max_iter < k:
        raise ValueError(f"max_iter must be >= k = {k}, got {max_iter}")
    keep = k if keep is None else max(keep, k)
    if v0 is not None and v0.ndim == 2 and v0.shape[0] > 1:
        return _block_started(op, v0, k, keep, tol, max_iter, generator)
    taken = op.matvecs
    process = LanczosProcess(op, _start_vector(op.dim, v0, generator, op.dtype, op.device))
    theta = np.zeros(0)
    S = np.zeros((0, 0))
    residuals = np.full(k, np.inf)
    converged = False
    fresh = -1  # iteration index of the last restart vector
    for j in range(max_iter):
        beta = process.step()
        theta, S = process.ritz()
        order = np.argsort(theta)[::-1]
        theta, S = theta[order], S[:, order]
        m = min(k, len(theta))
        residuals = beta * np.abs(S[-1, :m])
        scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
        # An exhausted (invariant) Krylov space holds exact eigenpairs but can hide others, e.g. a
        # repeated top eigenvalue: restart from a fresh orthogonal vector, and trust an exhausted
        # space only when that fresh vector is itself an eigenvector (all that is left is one
        # eigenspace, already represented).
        invariant = beta <= 1e-10 * scale and len(process.basis) < op.dim
        if m == k and np.all(residuals <= tol * scale) and not (invariant and j != fresh):
            converged = True
            break
        if j == max_iter - 1:
            break
        if invariant:
            fresh = j + 1
            process.restart(_random_vector(op.dim, generator, op.dtype, op.device))
        else:
            process.advance()
    result = _ritz_result(theta, S, process.Q, residuals, k, keep, converged, op.dtype, op.matvecs - taken)
    r = process.residual
    if r is None or len(theta) == 0:
        return result
    m = len(result.eigenvalues)
    Sm = torch.as_tensor(S[:, :m].T.copy(), dtype=torch.float64, device=r.device)
    ritz = Sm @ process.Q.double()  # A Q^T s = theta Q^T s + s_m r
    products = torch.as_tensor(theta[:m].copy(), device=r.device)[:, None] * ritz + Sm[:, -1:] * r.double()[None]
    return dataclasses.replace(result, products=products)


def _ritz_result(
    theta: np.ndarray,
    S: np.ndarray,
    Q: Tensor,
    residuals: np.ndarray,
    k: int,
    keep: int,
    converged: bool,
    dtype: torch.dtype,
    matvecs: int,
) -> EigenResult:
    """The top ``k`` Ritz pairs of basis ``Q`` (rows) with coefficients ``S`` (columns, by
    ``theta`` descending), and the top ``keep`` Ritz vectors as ``block`` when ``keep > k``."""
    m, kept = min(k, len(theta)), min(keep, len(theta))
    ritz = (torch.as_tensor(S[:, :kept].T.copy(), dtype=Q.dtype, device=Q.device) @ Q).to(dtype)
    return EigenResult(
        theta[:m].copy(),
        ritz[:m],
        np.asarray(residuals[:m]).copy(),
        converged,
        matvecs,
        "lanczos",
        _gaps(theta[:m], theta),
        block=ritz if kept > m else None,
    )


def _block_started(
    op: LinearOperator,
    block: Tensor,
    k: int,
    keep: int,
    tol: float,
    max_iter: int,
    generator: torch.Generator | None,
) -> EigenResult:
    """:func:`lanczos` from a block of start vectors: Rayleigh-Ritz on a basis that starts as the
    block and grows by one residual per product.  Residuals are computed from the stored products
    (``||A u - theta u||`` exactly, not the Lanczos relation's estimate); the basis and its products
    are kept, two vectors of ``dim`` per product.  It stops on the residual, as the one-vector path
    does (``benchmarks/RESULTS.md`` shows why not on the error bound ``min(r, r**2 / gap)``)."""
    dim, dtype = op.dim, op.dtype
    if block.shape[1:] != (dim,):
        raise ValueError(f"start block has shape {tuple(block.shape)}, expected (b, {dim})")
    if not torch.isfinite(block).all():
        raise ValueError("start block must be finite")
    Q = orthonormal_rows(block.to(device=op.device))[:max_iter]
    if len(Q) == 0:
        raise ValueError("start block must be nonzero")
    taken = op.matvecs
    AQ = torch.stack([op(q.to(dtype)).double() for q in Q])
    T = Q @ AQ.T
    converged = checked = False
    while True:
        theta, S = np.linalg.eigh(((T + T.T) / 2).cpu().numpy())
        order = np.argsort(theta)[::-1]
        theta, S = theta[order], S[:, order]
        m = min(k, len(theta))
        Sm = torch.as_tensor(S[:, :m].T.copy(), dtype=torch.float64, device=Q.device)
        R = Sm @ AQ - torch.as_tensor(theta[:m].copy(), device=Q.device)[:, None] * (Sm @ Q)
        residuals = torch.linalg.vector_norm(R, dim=1).cpu().numpy()
        scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
        # as for one start vector: a basis that is an invariant subspace (a block of exact
        # eigenvectors) is trusted only after one more product with a random vector; like any
        # Krylov method, a start with no component along the top eigenvector cannot see it
        invariant = float(torch.linalg.matrix_norm(AQ - T.T @ Q)) <= 1e-10 * scale
        done = m == k and np.all(residuals <= tol * scale)
        if done and not (invariant and not checked):
            converged = True
            break
        if len(Q) >= max_iter or len(Q) >= dim:
            break
        # grow by the residual of the wanted pair furthest from converged (orthogonal to the basis);
        # a residual already in the basis' span (lost to rounding) is replaced by a random vector
        new = orthonormal_rows(R[int(np.argmax(residuals))][None], Q)
        if done or len(new) == 0:
            checked = True
            fresh = _random_vector(dim, generator, torch.float64, Q.device)
            new = orthonormal_rows(fresh[None], Q)
        q = new[0]
        Aq = op(q.to(dtype)).double()
        T = torch.cat([torch.cat([T, (Q @ Aq)[:, None]], dim=1), torch.cat([AQ @ q, (q @ Aq)[None]])[None]], dim=0)
        Q, AQ = torch.cat([Q, q[None]]), torch.cat([AQ, Aq[None]])
    result = _ritz_result(theta, S, Q, residuals, k, keep, converged, dtype, op.matvecs - taken)
    m = len(result.eigenvalues)
    Sm = torch.as_tensor(S[:, :m].T.copy(), dtype=torch.float64, device=Q.device)
    return dataclasses.replace(result, products=Sm @ AQ)


def eigsh(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    *,
    k: int = 1,
    v0: Tensor | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    ncv: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> EigenResult:
    """The ``k`` largest eigenpairs by SciPy's ARPACK (``which="LA"``), on
    :meth:`~samedge.core.operator.LinearOperator.to_scipy`.

    ``max_iter`` is ARPACK's restart limit.  Residuals are computed exactly afterwards with
    ``k`` more products, which are included in ``matvecs``.
    """
    op = as_operator(operator, dim, dtype=dtype, device=device)
    taken = op.matvecs
    start = _start_vector(op.dim, v0, generator, torch.float64, "cpu").numpy()
    converged = True
    try:
        vals, vecs = scipy.sparse.linalg.eigsh(
            op.to_scipy(), k=k, which="LA", v0=start, tol=tol, maxiter=max_iter, ncv=ncv
        )
    except scipy.sparse.linalg.ArpackNoConvergence as err:
        vals, vecs, converged = err.eigenvalues, err.eigenvectors, False
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    vectors = torch.as_tensor(vecs.T.copy(), dtype=op.dtype, device=op.device)
    products = [op(v).double() for v in vectors]
    residuals = np.array(
        [float(torch.linalg.vector_norm(p - lam * v.double())) for lam, v, p in zip(vals, vectors, products)]
    )
    return EigenResult(
        vals,
        vectors,
        residuals,
        converged and len(vals) == k,
        op.matvecs - taken,
        "eigsh",
        _gaps(vals, vals),
        products=torch.stack(products) if products else None,
    )


def power_iteration(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    *,
    k: int = 1,
    v0: Tensor | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> EigenResult:
    """Top (largest-magnitude) eigenpair by power iteration, stopped on ``residual <= tol |lam|``."""
    if k != 1:
        raise ValueError("power iteration finds one eigenpair; use lanczos for k > 1")
    op = as_operator(operator, dim, dtype=dtype, device=device)
    v = _start_vector(op.dim, v0, generator, op.dtype, op.device)
    theta, residual, converged, n = 0.0, np.inf, False, 0
    for n in range(1, max_iter + 1):
        w = op(v)
        theta = float(torch.dot(v.double(), w.double()))
        residual = float(torch.linalg.vector_norm((w - theta * v).double()))
        if residual <= tol * abs(theta):
            converged = True
            break
        if n == max_iter:
            break  # keep v: theta and residual belong to it
        v = w / torch.linalg.vector_norm(w)
    return EigenResult(
        np.array([theta]), v[None], np.array([residual]), converged, n, "power", products=w.double()[None]
    )


def paper_power_iteration(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    *,
    k: int = 1,
    v0: Tensor | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> EigenResult:
    """Long & Bartlett's estimator: iterate ``v <- A v / ||A v||`` until ``||A v||`` changes by at
    most ``tol`` relative (or falls below ``tol``), at most ``max_iter`` products; the estimate is
    the last ``||A v||``.  ``converged`` reports that rule, which does not bound the error."""
    if k != 1:
        raise ValueError("the paper's estimator finds one eigenpair")
    op = as_operator(operator, dim, dtype=dtype, device=device)
    v = _start_vector(op.dim, v0, generator, op.dtype, op.device)
    last, current, n = None, 1.0, 0
    residual = np.inf
    while (last is None or (abs(current - last) > current * tol and abs(current) > tol)) and n < max_iter:
        last = current
        w = op(v)
        n += 1
        rayleigh = float(torch.dot(v.double(), w.double()))
        residual = float(torch.linalg.vector_norm((w - rayleigh * v).double()))
        current = float(torch.linalg.vector_norm(w.double()))
        v = w / current
    converged = last is not None and (abs(current - last) <= current * tol or abs(current) <= tol)
    return EigenResult(np.array([current]), v[None], np.array([residual]), converged, n, "paper-power")


SOLVERS: dict[str, Callable[..., EigenResult]] = {
    "lanczos": lanczos,
    "eigsh": eigsh,
    "power": power_iteration,
    "paper-power": paper_power_iteration,
}
