"""Stability thresholds ("edges") for GD, SAM, USAM and heavy-ball momentum.

All functions are pure and work on Python floats.  They are the curvature at which the
top Hessian direction of a quadratic stops being stable under the given optimizer:

* GD with step ``eta``: ``2 / eta``.
* Heavy-ball GD with momentum ``beta``: ``(2 + 2 beta) / eta``.
* SAM (normalized perturbation ``rho g / ||g||``): along an eigendirection with eigenvalue
  ``lam`` the step multiplies the component by ``1 - eta lam (1 + rho lam / ||g||)``, so the
  direction is stable while ``eta lam (1 + rho lam / ||g||) <= 2``.  Solving for ``lam``::

      lam = (||g|| / (2 rho)) (sqrt(1 + 8 rho / (eta ||g||)) - 1)
          = 4 / (eta (1 + sqrt(1 + 8 rho / (eta ||g||))))

  The second form is used: it has no cancellation for small ``rho`` and equals ``2 / eta``
  exactly at ``rho = 0``.
* USAM (unnormalized perturbation ``rho g``): ``4 / (eta (1 + sqrt(1 + 8 rho / eta)))``.

With heavy-ball momentum the effective curvature ``lam (1 + rho lam / ||g||)`` (SAM) or
``lam (1 + rho lam)`` (USAM) must stay below the momentum edge ``c = (2 + 2 beta) / eta``,
which gives ``2 c / (1 + sqrt(1 + 4 rho c / ||g||))`` and ``2 c / (1 + sqrt(1 + 4 rho c))``;
at ``beta = 0`` these are the formulas above.
"""

from __future__ import annotations

import math

__all__ = ["gd_edge", "momentum_edge", "sam_edge", "usam_edge", "sam_edge_from"]


def _check(name: str, value: float, *, positive: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_momentum(beta: float) -> float:
    beta = _check("momentum", beta)
    if beta >= 1:
        raise ValueError(f"momentum must be in [0, 1), got {beta}")
    return beta


def momentum_edge(eta: float, beta: float) -> float:
    """Heavy-ball GD edge ``(2 + 2 beta) / eta``; ``beta = 0`` gives ``2 / eta``."""
    eta = _check("eta", eta, positive=True)
    beta = _check_momentum(beta)
    return (2.0 + 2.0 * beta) / eta


def gd_edge(eta: float) -> float:
    """Gradient-descent edge of stability ``2 / eta``."""
    return momentum_edge(eta, 0.0)


def sam_edge(eta: float, rho: float, grad_norm: float, momentum: float = 0.0) -> float:
    """SAM-edge for step ``eta``, radius ``rho`` and full gradient norm ``grad_norm``.

    ``rho = 0`` gives the GD (or heavy-ball) edge exactly; ``grad_norm = 0`` with ``rho > 0``
    gives 0, the limit of the formula (any curvature is unstable when the perturbation is a
    full ``rho`` step along a vanishing gradient).
    """
    return sam_edge_from(momentum_edge(eta, momentum), rho, grad_norm)


def sam_edge_from(c: float, rho: float, grad_norm: float) -> float:
    """The largest ``lam`` with ``lam (1 + rho lam / ||g||) <= c``: ``2 c / (1 + sqrt(1 + 4 rho c / ||g||))``
    (SAM over a base whose edge on the Hessian is ``c``; USAM: ``grad_norm = 1``).  ``rho = 0``
    gives ``c``; ``grad_norm = 0`` with ``rho > 0`` gives 0."""
    c = _check("edge", c)
    rho = _check("rho", rho)
    grad_norm = _check("grad_norm", grad_norm)
    if rho == 0.0:
        return c
    if grad_norm == 0.0:
        return 0.0
    return 2.0 * c / (1.0 + math.sqrt(1.0 + 4.0 * rho * c / grad_norm))


def usam_edge(eta: float, rho: float, momentum: float = 0.0) -> float:
    """Unnormalized-SAM edge ``4 / (eta (1 + sqrt(1 + 8 rho / eta)))``."""
    c = momentum_edge(eta, momentum)
    rho = _check("rho", rho)
    return 2.0 * c / (1.0 + math.sqrt(1.0 + 4.0 * rho * c))
