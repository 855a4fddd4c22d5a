"""GD / SAM / USAM on a quadratic ``L(w) = 1/2 w^T H w + b^T w`` (NumPy, float64).

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samedge.core.method import Method

__all__ = ["QuadraticTrajectory", "simulate_quadratic"]


@dataclass(frozen=True)
class QuadraticTrajectory:
    """Iterates ``w[t]`` and gradient norms ``grad_norm[t] = ||H w[t] + b||`` for t = 0..steps.

    ``diverged`` is True when an iterate exceeded ``1e150`` in norm (the run stops there, so
    the arrays may be shorter than ``steps + 1``).
    """

    w: np.ndarray
    grad_norm: np.ndarray
    diverged: bool


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
) -> QuadraticTrajectory:
    """Run ``steps`` steps of ``optimizer`` ("gd", "sam" or "usam") from ``w0``.

    ``frozen_grad_norm`` replaces ``||g||`` in SAM's normalization by a constant.
    """
    method = Method(optimizer, eta, rho, momentum)
    H = np.asarray(H, dtype=np.float64)
    w = np.array(w0, dtype=np.float64)
    b = np.zeros_like(w) if b is None else np.asarray(b, dtype=np.float64)
    velocity = np.zeros_like(w)
    ws, norms = [w.copy()], [np.linalg.norm(H @ w + b)]
    diverged = False
    for _ in range(steps):
        g = H @ w + b
        grad_norm = np.linalg.norm(g) if frozen_grad_norm is None else frozen_grad_norm
        e = method.perturbation_scale(float(grad_norm)) * g
        direction = H @ (w + e) + b
        velocity = momentum * velocity + direction
        w = w - eta * velocity
        if not np.all(np.isfinite(w)) or np.linalg.norm(w) > 1e150:
            diverged = True
            break
        ws.append(w.copy())
        norms.append(np.linalg.norm(H @ w + b))
    return QuadraticTrajectory(np.array(ws), np.array(norms), diverged)
