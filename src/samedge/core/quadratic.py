"""GD / SAM / USAM over each base (sgd, adam, adamw, rmsprop) on a quadratic ``L(w) = 1/2 w^T H w + b^T w`` (NumPy, float64).

The quadratic is where the edges in :mod:`samedge.core.thresholds` are exact, so it is the
independent check for them (tests) and the picture behind them (report):

* GD and USAM are linear maps on a quadratic: the component along an eigenvector with
  eigenvalue ``lam`` stays bounded iff ``lam`` is at most the edge, and grows geometrically above.
* SAM's perturbation is normalized, so its map depends on ``||g||``.  With the norm held fixed
  (``frozen_grad_norm``: the idealization in Long & Bartlett, where the gradient is dominated by
  other directions) the top component is again linear with edge ``sam_edge(eta, rho, ||g||)``.
  With the true norm and a linear term ``b`` in a flat direction of ``H`` (a gradient that does
  not vanish), SAM settles into a period-2 orbit along the top direction on which
  ``lam == sam_edge(eta, rho, ||g||)``: the top eigenvalue sits exactly at the SAM-edge.
* Over a preconditioned base (adam, adamw, rmsprop) the preconditioner ``P`` is held fixed (a
  given positive diagonal): the step is linear, :func:`linearised_update` its matrix, and it is
  stable while :func:`effective_sharpness`, the top eigenvalue of
  ``P^-1/2 (H + s H^2 + lambda I) P^-1/2``, stays below the base's threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from samedge.core.method import Method

__all__ = ["QuadraticTrajectory", "simulate_quadratic", "linearised_update", "effective_sharpness"]


@dataclass(frozen=True)
class QuadraticTrajectory:
    """Iterates ``w[t]`` and gradient norms ``grad_norm[t] = ||H w[t] + b||`` for t = 0..steps.

    ``diverged`` is True when an iterate exceeded ``1e150`` in norm (the run stops there, so
    the arrays may be shorter than ``steps + 1``).
    """

    w: np.ndarray
    grad_norm: np.ndarray
    diverged: bool


def _method(optimizer: str, eta: float, rho: float, momentum: float, hyper: dict[str, Any]) -> Method:
    return Method(optimizer, eta, rho, momentum, **hyper)


def _inverse_p(method: Method, preconditioner: np.ndarray | None, dim: int) -> np.ndarray:
    if not method.preconditioned:
        if preconditioner is not None:
            raise ValueError(f"base {method.base!r} has no preconditioner; leave preconditioner out")
        return np.ones(dim)
    if preconditioner is None:
        raise ValueError(f"base {method.base!r} needs the fixed diagonal preconditioner P (a positive vector)")
    P = np.asarray(preconditioner, dtype=np.float64)
    if P.shape != (dim,) or not np.all(P > 0):
        raise ValueError(f"preconditioner must be a positive vector of length {dim}")
    return 1.0 / P


def _base_step(
    method: Method, w: np.ndarray, buf: np.ndarray, d: np.ndarray, p_inv: np.ndarray, first: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The base's step with direction ``d`` and its preconditioner held fixed (``P^-1 = p_inv``):
    the arithmetic of the update rules with ``P`` frozen (Adam's ``P`` includes ``1 - beta1^t``)."""
    eta, decay = method.eta, method.weight_decay
    if method.base == "sgd":
        g = d + decay * w
        beta = method.momentum
        if beta == 0.0:
            return w - eta * g, np.zeros_like(buf)  # no buffer
        buf = g.copy() if first else beta * buf + (1.0 - method.dampening) * g
        return w - eta * (g + beta * buf if method.nesterov else buf), buf
    if method.base == "adam":
        buf = method.beta1 * buf + (1.0 - method.beta1) * (d + decay * w)
        return w - eta * p_inv * buf, buf
    if method.base == "adamw":
        buf = method.beta1 * buf + (1.0 - method.beta1) * d
        return (1.0 - eta * decay) * w - eta * p_inv * buf, buf
    if method.base == "rmsprop":
        buf = method.momentum * buf + p_inv * (d + decay * w)
        return w - eta * buf, buf
    raise ValueError(f"no quadratic model of base {method.base!r}")  # pragma: no cover


def linearised_update(
    H: np.ndarray,
    *,
    eta: float,
    optimizer: str = "gd",
    rho: float = 0.0,
    momentum: float = 0.0,
    grad_norm: float = 1.0,
    preconditioner: np.ndarray | None = None,
    **hyper: Any,
) -> np.ndarray:
    """The matrix ``M`` of one step on ``L = 1/2 w^T H w`` acting on ``(w, buffer)`` (``2n x 2n``),
    with SAM's ``||g||`` held at ``grad_norm`` and the preconditioner fixed: the step is stable
    iff its spectral radius is below 1.  ``hyper``: the base and its settings, as :class:`Method`."""
    method = _method(optimizer, eta, rho, momentum, hyper)
    H = np.asarray(H, dtype=np.float64)
    n = H.shape[0]
    p_inv = _inverse_p(method, preconditioner, n)
    s = method.curvature_scale(grad_norm)
    M = np.zeros((2 * n, 2 * n))
    for j in range(2 * n):
        x = np.zeros(2 * n)
        x[j] = 1.0
        w, buf = x[:n], x[n:]
        g = H @ w
        w2, buf2 = _base_step(method, w, buf, H @ (w + s * g), p_inv, first=False)
        M[:, j] = np.concatenate([w2, buf2])
    return M


def effective_sharpness(
    H: np.ndarray,
    *,
    eta: float,
    optimizer: str = "gd",
    rho: float = 0.0,
    momentum: float = 0.0,
    grad_norm: float = 1.0,
    preconditioner: np.ndarray | None = None,
    **hyper: Any,
) -> float:
    """The top eigenvalue of ``P^-1/2 (H + s H^2 + lambda I) P^-1/2`` (``P = I`` for sgd, ``s``
    the method's :meth:`~Method.curvature_scale`, ``lambda`` its coupled weight decay): the
    quantity the method's :attr:`~Method.threshold` bounds."""
    method = _method(optimizer, eta, rho, momentum, hyper)
    H = np.asarray(H, dtype=np.float64)
    r = np.sqrt(_inverse_p(method, preconditioner, H.shape[0]))
    s = method.curvature_scale(grad_norm)
    J = H + s * (H @ H) + method.rule.coupled_decay() * np.eye(H.shape[0])
    K = r[:, None] * J * r[None, :]
    return float(np.linalg.eigvalsh((K + K.T) / 2)[-1])


def simulate_quadratic(
    H: np.ndarray,
    w0: np.ndarray,
    *,
    eta: float,
    steps: int,
    rho: float = 0.0,
    optimizer: str = "gd",
    momentum: float = 0.0,
    b: np.ndarray | None = None,
    frozen_grad_norm: float | None = None,
    preconditioner: np.ndarray | None = None,
    **hyper: Any,
) -> QuadraticTrajectory:
    """Run ``steps`` steps of ``optimizer`` ("gd", "sam" or "usam") over the base in ``hyper``
    (``base="sgd"`` by default, with ``dampening``, ``nesterov``, ``weight_decay``; ``adam``,
    ``adamw``, ``rmsprop`` with ``beta1``, ``weight_decay`` ... and a fixed diagonal
    ``preconditioner`` P) from ``w0``.

    ``frozen_grad_norm`` replaces ``||g||`` in SAM's normalization by a constant.  SAM perturbs
    along the loss's gradient ``H w + b`` (without weight decay, as ``samedge.SAM`` does).
    """
    method = _method(optimizer, eta, rho, momentum, hyper)
    H = np.asarray(H, dtype=np.float64)
    w = np.array(w0, dtype=np.float64)
    b = np.zeros_like(w) if b is None else np.asarray(b, dtype=np.float64)
    p_inv = _inverse_p(method, preconditioner, len(w))
    buf = np.zeros_like(w)
    ws, norms = [w.copy()], [np.linalg.norm(H @ w + b)]
    diverged = False
    for t in range(steps):
        g = H @ w + b
        grad_norm = np.linalg.norm(g) if frozen_grad_norm is None else frozen_grad_norm
        e = method.perturbation_scale(float(grad_norm)) * g
        w, buf = _base_step(method, w, buf, H @ (w + e) + b, p_inv, first=t == 0)
        if not np.all(np.isfinite(w)) or np.linalg.norm(w) > 1e150:
            diverged = True
            break
        ws.append(w.copy())
        norms.append(np.linalg.norm(H @ w + b))
    return QuadraticTrajectory(np.array(ws), np.array(norms), diverged)
