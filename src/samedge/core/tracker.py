"""Sharpness measurements inside a user's own training loop.

    tracker = SharpnessTracker(model, loss_fn, (x, y))         # any nn.Module, any loss
    m = tracker.measure(eta=0.1, rho=0.05, optimizer="sam")     # at the model's current weights
    m.sharpness, m.edge, m.sharpness_over_edge, m.grad_alignment

The loss function takes ``(outputs, targets)`` and returns the mean loss of a batch.  ``data`` is
one ``(inputs, targets)`` pair (split into ``chunk_size`` pieces) or a list of such batches,
which are combined weighted by their number of targets: the full-batch loss.  Eigen-solves are
warm-started from the previous call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from samedge.core.curvature import HessianEigensolver
from samedge.core.measurements import Measurement, measure
from samedge.core.method import Method
from samedge.core.objective import Objective
from samedge.core.spectrum import SpectralDensity, TraceEstimate, hessian_density, hessian_trace

__all__ = ["SharpnessTracker"]


class SharpnessTracker:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data: tuple[Tensor, Tensor] | Sequence[tuple[Tensor, Tensor]],
        *,
        chunk_size: int | None = None,
        k: int = 1,
        tol: float = 1e-3,
        max_iter: int = 100,
        method: str = "lanczos",
        seed: int = 0,
    ):
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
            self.objective = Objective.from_tensors(model, loss_fn, data[0], data[1], chunk_size)
        else:
            self.objective = Objective(model, loss_fn, list(data))
        self.solver = HessianEigensolver(k=k, method=method, tol=tol, max_iter=max_iter, seed=seed)

    def measure(self, *, eta: float, rho: float = 0.0, optimizer: str = "sam", momentum: float = 0.0) -> Measurement:
        """Sharpness, gradient norm, edges and alignments at the model's current parameters."""
        method = Method(optimizer, eta, rho, momentum)  # validated before any work
        params = self.objective.parameters()
        grad = self.objective.grad(params)
        sam_grad = method.direction(self.objective.grad, params, grad)
        return measure(self.objective, params, grad, sam_grad, self.solver, method=method)

    # Beyond the top eigenvalue (samedge.core.spectrum): the probes come from one generator,
    # seeded with ``seed + 3`` when first used, so a tracker's sequence of readings is reproducible.
    def _probe_generator(self) -> torch.Generator:
        if getattr(self, "_probes", None) is None:
            self._probes = torch.Generator().manual_seed(self.solver.generator.initial_seed() + 3)
        return self._probes

    def trace(self, *, probes: int = 32, deflate: bool = False) -> TraceEstimate:
        """Hutchinson trace of the Hessian at the model's current parameters, with its standard
        error; ``deflate`` handles the span of the last :meth:`measure`'s eigenvectors exactly."""
        params = self.objective.parameters()
        vectors = self.solver.previous if deflate else None
        return hessian_trace(self.objective, params, probes=probes, generator=self._probe_generator(), deflate=vectors)

    def density(self, *, probes: int = 4, steps: int = 64) -> SpectralDensity:
        """SLQ spectral density of the Hessian at the model's current parameters."""
        params = self.objective.parameters()
        return hessian_density(self.objective, params, probes=probes, steps=steps, generator=self._probe_generator())
