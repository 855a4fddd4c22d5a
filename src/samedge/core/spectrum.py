"""Beyond the top eigenvalue: the Hessian's trace and spectral density from exact HVPs.

* :func:`hutchinson_trace`: Hutchinson's estimator ``tr(A) ~ mean_i z_i^T A z_i`` with Rademacher
  probes ``z_i`` (entries +-1), returned with its standard error (sample standard deviation over
  ``sqrt(probes)``).  Optionally *deflated* by known top eigenvectors ``V`` (orthonormalized
  here): ``tr(A) = tr(V^T A V) + tr(P A P)`` with ``P = I - V V^T``, exactly, for any orthonormal
  ``V``; the first term costs ``k`` products and is exact, the second is estimated with probes
  ``P z``.  Better vectors only lower the variance; the estimate stays unbiased whatever ``V`` is.
  (Hutch++ is not offered: it spends two thirds of its products on a random sketch, which pays
  only when a few eigenvalues carry most of ``||A||_F``; here the top eigenvectors come free from
  the sharpness solve, and ``benchmarks/bench_spectrum.py`` measures what deflating by them gains.)
* :func:`slq_density`: stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019, "An
  investigation into neural net optimization via Hessian eigenvalue density"; Lin, Saad & Yang
  2016): ``steps`` Lanczos steps with full reorthogonalization from each of ``probes`` normalized
  Rademacher vectors; the Ritz values of each tridiagonal matrix are the quadrature nodes and the
  squared first components of its eigenvectors the weights.  The average over probes is a
  discrete probability measure that approximates the empirical eigenvalue distribution
  ``(1/n) sum_i delta(lambda_i)``; :class:`SpectralDensity` smooths it with a Gaussian, gives its
  Wasserstein-1 distance to a set of eigenvalues and its own trace estimate.

Both take a :class:`~samedge.core.operator.LinearOperator` (or a ``matvec`` callable with its
``dim``), as the solvers of :mod:`samedge.core.eigen` do, run the same
:class:`~samedge.core.lanczos.LanczosProcess` (SLQ) and are seeded by a ``torch.Generator``: the
same generator state gives the same numbers.  :func:`hessian_trace` and :func:`hessian_density`
bind them to an :class:`Objective`'s exact HVP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from samedge.core.lanczos import LanczosProcess, orthonormal_rows
from samedge.core.objective import Objective
from samedge.core.operator import LinearOperator, Matvec, as_operator

__all__ = [
    "TraceEstimate",
    "SpectralDensity",
    "hutchinson_trace",
    "slq_density",
    "hessian_trace",
    "hessian_density",
    "rademacher",
]


def rademacher(dim: int, generator: torch.Generator | None, dtype=torch.float32, device="cpu") -> Tensor:
    """A vector of independent +-1 entries (drawn on the CPU from ``generator``, then moved)."""
    bits = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8)
    return (2 * bits - 1).to(dtype=dtype, device=device)


@dataclass(frozen=True)
class TraceEstimate:
    """``trace`` with its standard error ``stderr``; ``samples`` are the per-probe quadratic forms
    (of the deflated remainder when ``deflated > 0``; ``trace = deflated_part + mean(samples)``)."""

    trace: float
    stderr: float
    probes: int
    matvecs: int
    samples: np.ndarray
    deflated: int = 0
    deflated_part: float = 0.0


def hutchinson_trace(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    *,
    probes: int = 32,
    generator: torch.Generator | None = None,
    deflate: Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutchinson's trace estimate of the symmetric ``operator`` (or ``matvec`` callable with its
    ``dim``) with ``probes`` Rademacher probes, and its standard error.  ``deflate``: vectors (rows,
    shape ``(k, dim)``) whose span is handled exactly (e.g. the top eigenvectors from the sharpness
    solve); ``k`` more products."""
    if probes < 2:
        raise ValueError(f"probes must be >= 2 for a standard error, got {probes}")
    op = as_operator(operator, dim, dtype=dtype, device=device)
    taken = op.matvecs
    V = None
    deflated_part = 0.0
    if deflate is not None:
        if deflate.ndim != 2 or deflate.shape[1] != op.dim:
            raise ValueError(f"deflation vectors must have shape (k, {op.dim}), got {tuple(deflate.shape)}")
        V = orthonormal_rows(deflate.to(device=op.device, dtype=op.dtype)).to(op.dtype)
        for v in V:
            deflated_part += float(torch.dot(v.double(), op(v).double()))
    samples = np.empty(probes)
    for i in range(probes):
        z = rademacher(op.dim, generator, op.dtype, op.device)
        if V is not None and len(V):
            z = z - V.T @ (V @ z)
        samples[i] = float(torch.dot(z.double(), op(z).double()))
    matvecs = op.matvecs - taken
    return TraceEstimate(
        trace=deflated_part + float(samples.mean()),
        stderr=float(samples.std(ddof=1) / math.sqrt(probes)),
        probes=probes,
        matvecs=matvecs,
        samples=samples,
        deflated=0 if V is None else len(V),
        deflated_part=deflated_part,
    )


@dataclass(frozen=True)
class SpectralDensity:
    """The SLQ spectral measure: probe ``p`` gives nodes ``nodes[p]`` with weights ``weights[p]``
    (each row sums to 1; unused entries, when a Krylov space was exhausted early, have weight 0).
    The measure is the average over probes; it approximates ``(1/dim) sum_i delta(lambda_i)``."""

    nodes: np.ndarray
    weights: np.ndarray
    dim: int
    matvecs: int

    @property
    def probes(self) -> int:
        return int(self.nodes.shape[0])

    def atoms(self) -> tuple[np.ndarray, np.ndarray]:
        """All nodes and their probability weights (summing to 1), flattened, zero weights dropped."""
        values = self.nodes.ravel()
        weights = self.weights.ravel() / self.probes
        keep = weights > 0
        return values[keep], weights[keep]

    @property
    def trace(self) -> float:
        """``dim * E[lambda]`` under the measure: SLQ's own (Hutchinson-like) trace estimate."""
        values, weights = self.atoms()
        return float(self.dim * np.dot(values, weights))

    def density(self, grid: Sequence[float] | np.ndarray, sigma: float | None = None) -> np.ndarray:
        """The measure smoothed by a Gaussian of width ``sigma`` (default 1% of the nodes' range)
        on ``grid``: a probability density in eigenvalue units."""
        values, weights = self.atoms()
        grid = np.asarray(grid, dtype=float)
        if sigma is None:
            spread = float(values.max() - values.min())
            sigma = 0.01 * spread if spread > 0 else 1e-3 * max(abs(float(values.max())), 1.0)
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        z = (grid[:, None] - values[None, :]) / sigma
        return (np.exp(-0.5 * z**2) @ weights) / (sigma * math.sqrt(2 * math.pi))

    def wasserstein(self, eigenvalues: Sequence[float] | np.ndarray) -> float:
        """Wasserstein-1 distance to the empirical distribution of ``eigenvalues`` (equal weights)."""
        values, weights = self.atoms()
        import scipy.stats  # here: importing it costs most of a second, and only this comparison needs it

        return float(scipy.stats.wasserstein_distance(values, np.asarray(eigenvalues, dtype=float), weights))


def _quadrature(process: LanczosProcess, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (Ritz values) and weights (squared first components of the tridiagonal matrix's
    eigenvectors) after ``steps`` steps of ``process``; fewer when the Krylov space is exhausted
    first (then the Ritz values are exact eigenvalues, and the quadrature is exact for that start)."""
    for j in range(steps):
        beta = process.step()
        if j == steps - 1 or beta <= 1e-10 * max(abs(a) for a in process.alphas + [1e-300]):
            break
        process.advance()
    theta, S = process.ritz()
    return theta, S[0, :] ** 2


def slq_density(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    *,
    probes: int = 4,
    steps: int = 64,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature of ``operator`` (or a ``matvec`` callable with its ``dim``):
    ``probes`` runs of ``steps`` Lanczos steps (at most ``dim``)."""
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    op = as_operator(operator, dim, dtype=dtype, device=device)
    taken = op.matvecs
    steps = min(steps, op.dim)
    nodes = np.zeros((probes, steps))
    weights = np.zeros((probes, steps))
    for p in range(probes):
        z = rademacher(op.dim, generator, op.dtype, op.device)
        theta, w = _quadrature(LanczosProcess(op, z / math.sqrt(op.dim)), steps)
        n = len(theta)  # fewer than steps when the Krylov space was exhausted: pad with weight 0
        nodes[p, :n], weights[p, :n], nodes[p, n:] = theta, w, theta[-1]
    return SpectralDensity(nodes, weights, op.dim, op.matvecs - taken)


def hessian_trace(
    objective: Objective,
    params: Sequence[Tensor],
    *,
    probes: int = 32,
    generator: torch.Generator | None = None,
    deflate: Tensor | None = None,
) -> TraceEstimate:
    """Hutchinson trace of the Hessian of ``objective`` at ``params`` (exact, chunked HVPs)."""
    operator = objective.hvp_operator(params)  # reuses one gradient graph for all the products
    try:
        return hutchinson_trace(operator, probes=probes, generator=generator, deflate=deflate)
    finally:
        objective.release_hvp_graph()


def hessian_density(
    objective: Objective,
    params: Sequence[Tensor],
    *,
    probes: int = 4,
    steps: int = 64,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    """SLQ spectral density of the Hessian of ``objective`` at ``params`` (exact, chunked HVPs)."""
    operator = objective.hvp_operator(params)
    try:
        return slq_density(operator, probes=probes, steps=steps, generator=generator)
    finally:
        objective.release_hvp_graph()
