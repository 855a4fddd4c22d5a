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
from typing import Any

from torch import Tensor, nn

from samedge.core.curvature import HessianEigensolver
from samedge.core.distributed import ShardedObjective
from samedge.core.measurements import Measurement, measure
from samedge.core.method import Method
from samedge.core.objective import Objective

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
        distributed: bool = False,
        process_group: Any = None,
    ):
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
            self.objective = Objective.from_tensors(model, loss_fn, data[0], data[1], chunk_size)
        else:
            self.objective = Objective(model, loss_fn, list(data))
        if distributed:
            self.objective = ShardedObjective(self.objective, group=process_group)
        self.solver = HessianEigensolver(k=k, method=method, tol=tol, max_iter=max_iter, seed=seed)

    def measure(self, *, eta: float, rho: float = 0.0, optimizer: str = "sam", momentum: float = 0.0) -> Measurement:
        """Sharpness, gradient norm, edges and alignments at the model's current parameters."""
        method = Method(optimizer, eta, rho, momentum)  # validated before any work
        params = self.objective.parameters()
        grad = self.objective.grad(params)
        sam_grad = method.direction(self.objective.grad, params, grad)
        return measure(self.objective, params, grad, sam_grad, self.solver, method=method)
