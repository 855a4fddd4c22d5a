"""Sharpness from the gradients training already computes: Rayleigh-Ritz on secant pairs.

A pair ``(s, y)`` with ``y = grad(w + s) - grad(w)`` is a secant of the Hessian along ``s``:
``y = H s`` exactly on a quadratic, and up to ``O(||s||^2)`` otherwise.  Training produces such
pairs for free:

* SAM evaluates the gradient at ``w`` and at ``w + e``: ``(e, g(w + e) - g(w))``, with ``e`` along
  ``g`` (the *perturbation pairs*);
* any optimizer has the consecutive steps ``(w_{t+1} - w_t, g_{t+1} - g_t)``.

Given the last ``m`` pairs as the rows of ``S`` and ``Y``, Rayleigh-Ritz on the span of the
``s_i`` needs only their Gram matrices: with ``S^T S = V diag(sigma^2) V^T`` (directions whose
``sigma`` is below ``rcond * sigma_max`` dropped), ``Q = S V diag(1/sigma)`` is an orthonormal
basis, ``H Q = Y V diag(1/sigma)``, the projected matrix is
``T = diag(1/sigma) V^T (S^T Y) V diag(1/sigma)`` (symmetrized), and for its top eigenpair
``(theta, z)`` with ``a = V diag(1/sigma) z`` the Ritz vector is ``u = S a`` and the residual
``||H u - theta u||^2 = a^T (Y^T Y) a - 2 theta a^T (Y^T S) a + theta^2 a^T (S^T S) a``.
On a quadratic every quantity is exact: the estimate is Rayleigh-Ritz of the true Hessian on that
span, and the residual is its true residual.  Elsewhere the relative residual
``||H u - theta u|| / theta`` says whether the estimate holds, as it does for Lanczos.

Costs: no gradient and no HVP; ``2 m`` parameter vectors of memory and ``O(m d)`` work per pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from samedge.core.method import Method
from samedge.core.params import flatten

__all__ = [
    "SecantEstimate",
    "rayleigh_ritz_secants",
    "SecantWindow",
    "StepSecants",
    "SECANT_MAX_RESIDUAL",
    "PERTURBATION_PAIRS",
    "CONSECUTIVE_PAIRS",
]

#: An estimate is reported when its relative residual is at most this.  Measured on the MNIST
#: defaults (benchmarks/bench_secant.py): once SAM's sharpness reaches its edge its perturbation
#: pairs give residuals of 0.06-0.14 and estimates 0.95-1.00 of the Lanczos value; before the
#: edge the residuals are 0.45-10 and the estimates off by 25-99%.  It was 0.25 until a GD
#: reading (the mnist-gd preset, step 140) passed with residual 0.246 and an estimate 10.6% high;
#: every other written estimate there had a residual of at most 0.16 (SAM: 0.06-0.16; GD:
#: 0.004-0.08), so 0.2 keeps them all and drops that one.
SECANT_MAX_RESIDUAL = 0.2

#: Default window sizes, by kind of pair (measured as above).  SAM's perturbation pairs are short
#: (length rho) secants at the current point: 10 of them give 0.95-1.00 of lambda_1 at the edge
#: (5: 2-5% low; 20: 0.96-1.03 but twice the memory).  Consecutive steps are long secants
#: (length eta ||g||) between different points, so older pairs mislead: under GD at its edge 3
#: pairs gave 1.005-1.03 of lambda_1, 5 pairs up to 1.13 and 10 pairs up to 1.44 with residuals
#: that still passed the rule.
PERTURBATION_PAIRS = 10
CONSECUTIVE_PAIRS = 3


@dataclass(frozen=True)
class SecantEstimate:
    """The top Ritz value of the secant pairs' span (``sharpness``), its relative residual
    ``||H u - theta u|| / |theta|`` and the unit Ritz vector ``u`` (flat, or None when not asked
    for); ``pairs`` is the number of pairs, ``rank`` the dimension of their span that was used."""

    sharpness: float
    residual: float
    vector: Tensor | None
    pairs: int
    rank: int

    @property
    def trusted(self) -> bool:
        """Whether the residual rule (:data:`SECANT_MAX_RESIDUAL`) vouches for the estimate."""
        return math.isfinite(self.sharpness) and self.sharpness > 0 and self.residual <= SECANT_MAX_RESIDUAL


def _gram(a: Tensor, b: Tensor) -> np.ndarray:
    return (a.double() @ b.double().T).cpu().numpy()


def rayleigh_ritz_secants(
    S: Tensor, Y: Tensor, *, rcond: float = 1e-6, with_vector: bool = True, grams: tuple | None = None
) -> SecantEstimate:
    """Rayleigh-Ritz on the span of the rows of ``S`` (shape ``(m, d)``) with ``Y = S H`` known
    only through the secants (rows ``y_i ~ H s_i``).  ``grams`` may pass the precomputed
    ``(S S^T, S Y^T, Y Y^T)`` as NumPy arrays (see :class:`SecantWindow`)."""
    if S.ndim != 2 or S.shape != Y.shape:
        raise ValueError(f"S and Y must be (m, d) matrices of one shape, got {tuple(S.shape)} and {tuple(Y.shape)}")
    m = S.shape[0]
    if m == 0:
        raise ValueError("Rayleigh-Ritz needs at least one secant pair")
    ss, sy, yy = grams if grams is not None else (_gram(S, S), _gram(S, Y), _gram(Y, Y))
    sigma2, V = np.linalg.eigh((ss + ss.T) / 2)
    keep = sigma2 > max(float(sigma2.max()), 0.0) * rcond**2
    if not keep.any():
        return SecantEstimate(math.nan, math.nan, None, m, 0)
    W = V[:, keep] / np.sqrt(sigma2[keep])  # S^T W = Q: orthonormal columns
    T = W.T @ sy @ W
    T = (T + T.T) / 2
    thetas, Z = np.linalg.eigh(T)
    theta, z = float(thetas[-1]), Z[:, -1]
    a = W @ z
    r2 = float(a @ yy @ a - 2.0 * theta * (a @ sy.T @ a) + theta**2 * (a @ ss @ a))
    residual = math.sqrt(max(r2, 0.0)) / abs(theta) if theta != 0.0 else math.inf
    vector = None
    if with_vector:
        u = torch.as_tensor(a, dtype=torch.float64, device=S.device) @ S.double()
        vector = (u / torch.linalg.vector_norm(u)).to(S.dtype)
    return SecantEstimate(theta, residual, vector, m, int(keep.sum()))


class SecantWindow:
    """The last ``size`` secant pairs and their Gram matrices.

    A new pair costs ``4 size`` dot products in the parameters' dtype (``O(size d)``), small next
    to a training step.  Pairs are never changed in place, so :meth:`state_dict` is a cheap
    snapshot (references and two small matrices) that later pushes leave intact.
    :meth:`estimate` is Rayleigh-Ritz on the pairs held.
    """

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.size = size
        self._s: list[Tensor] = []  # oldest first
        self._y: list[Tensor] = []
        self._grams = np.zeros((3, 0, 0))  # S S^T, S Y^T ([i, j] = s_i . y_j), Y Y^T

    def __len__(self) -> int:
        return len(self._s)

    def push(self, s: Tensor, y: Tensor) -> None:
        """Add the pair ``(s, y)`` (tensors of any shape, flattened and copied), dropping the
        oldest beyond ``size``; a pair with ``s = 0`` or a non-finite entry carries no
        information and is skipped."""
        s, y = s.detach().reshape(-1).clone(), y.detach().reshape(-1).to(s.dtype).clone()
        if s.shape != y.shape:
            raise ValueError(f"s and y must have one shape, got {tuple(s.shape)} and {tuple(y.shape)}")
        if not (torch.isfinite(s).all() and torch.isfinite(y).all()) or not bool(s.any()):
            return
        if self._s and self._s[0].shape != s.shape:
            self.clear()
        grams = self._grams
        if len(self._s) == self.size:
            self._s, self._y, grams = self._s[1:], self._y[1:], grams[:, 1:, 1:]
        n = len(self._s)
        out = np.empty((3, n + 1, n + 1))
        out[:, :n, :n] = grams
        for i, (si, yi) in enumerate(zip(self._s, self._y)):
            out[0, i, n] = out[0, n, i] = float(torch.dot(si, s))
            out[1, i, n] = float(torch.dot(si, y))  # s_i . y_new
            out[1, n, i] = float(torch.dot(s, yi))  # s_new . y_i
            out[2, i, n] = out[2, n, i] = float(torch.dot(yi, y))
        out[0, n, n], out[1, n, n], out[2, n, n] = (
            float(torch.dot(s, s)),
            float(torch.dot(s, y)),
            float(torch.dot(y, y)),
        )
        self._s, self._y, self._grams = [*self._s, s], [*self._y, y], out

    def clear(self) -> None:
        self._s, self._y, self._grams = [], [], np.zeros((3, 0, 0))

    def estimate(self, *, with_vector: bool = False) -> SecantEstimate | None:
        """Rayleigh-Ritz on the pairs held, or None when there are none."""
        if not self._s:
            return None
        grams = (self._grams[0], self._grams[1], self._grams[2])
        if with_vector:
            S, Y = torch.stack(self._s), torch.stack(self._y)
        else:
            S = Y = self._s[0].new_zeros((len(self._s), 0))
        return rayleigh_ritz_secants(S, Y, with_vector=with_vector, grams=grams)

    def state_dict(self) -> dict:
        """A snapshot from which :meth:`load_state_dict` continues bit for bit."""
        return {
            "size": self.size,
            "s": list(self._s),
            "y": list(self._y),
            "grams": torch.from_numpy(self._grams.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"secant window of size {state['size']} cannot be loaded into one of size {self.size}")
        self._s, self._y = list(state["s"]), list(state["y"])
        self._grams = state["grams"].double().numpy().copy()


class StepSecants:
    """A per-step sharpness estimate from a training loop's own gradients.

    ``observe(params, grad, direction)`` is called once per step with the parameters ``w_t``,
    the gradient ``g_t`` there and the direction the method steps along.  A method with a
    perturbation (SAM, USAM with ``rho > 0``) contributes its perturbation pair
    ``(e, direction - g)``; any other contributes the consecutive-step pair
    ``(w_t - w_{t-1}, g_t - g_{t-1})``.  The estimate is Rayleigh-Ritz on the last ``size``
    pairs (``size``; by default :data:`PERTURBATION_PAIRS` or :data:`CONSECUTIVE_PAIRS`);
    :meth:`valid` applies the residual rule :data:`SECANT_MAX_RESIDUAL`.
    """

    def __init__(self, method: Method, size: int | None = None, max_residual: float = SECANT_MAX_RESIDUAL):
        self.method = method
        if size is None:
            size = PERTURBATION_PAIRS if self.uses_perturbation_pairs else CONSECUTIVE_PAIRS
        self.window = SecantWindow(size)
        self.max_residual = max_residual
        self._previous: tuple[Tensor, Tensor] | None = None  # (w_{t-1}, g_{t-1}), consecutive pairs only

    @property
    def uses_perturbation_pairs(self) -> bool:
        return self.method.perturbs and self.method.rho > 0.0

    def observe(
        self,
        params: Sequence[Tensor],
        grad: Sequence[Tensor],
        direction: Sequence[Tensor],
        grad_norm: float | None = None,
    ) -> SecantEstimate | None:
        """``grad_norm`` is ``||grad||`` where the caller has it already (it is computed otherwise)."""
        g = flatten(grad)
        if self.uses_perturbation_pairs:
            if grad_norm is None:
                grad_norm = float(torch.linalg.vector_norm(g.double()))
            scale = self.method.perturbation_scale(grad_norm)
            self.window.push(g * scale, flatten(direction) - g)
        else:
            w = flatten(params)
            if self._previous is not None:
                self.window.push(w - self._previous[0], g - self._previous[1])
            self._previous = (w, g)
        return self.window.estimate()

    def valid(self, estimate: SecantEstimate | None) -> bool:
        """Whether ``estimate`` passes the residual rule (and is a positive, finite value)."""
        return (
            estimate is not None
            and math.isfinite(estimate.sharpness)
            and estimate.sharpness > 0
            and estimate.residual <= self.max_residual
        )

    def state_dict(self) -> dict:
        return {"window": self.window.state_dict(), "previous": self._previous}

    def load_state_dict(self, state: dict) -> None:
        self.window.load_state_dict(state["window"])
        previous = state["previous"]
        self._previous = None if previous is None else (previous[0], previous[1])
