"""GD, SAM and USAM steps: pure functions on parameter tuples, and a ``torch.optim`` optimizer.

SAM (Foret et al.) evaluates the gradient at an ascent point and steps from the original one:

    e = rho g / ||g||          (SAM, "normalized")      or      e = rho g    (USAM)
    w <- w - eta grad L(w + e)

with optional heavy-ball momentum ``v <- beta v + d; w <- w - eta v``.  ``rho = 0`` is exactly GD
(the second gradient is not even computed).  When ``||g|| = 0`` SAM's perturbation is zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from samedge.core.params import Params, add_scaled, norm

__all__ = ["perturbation_scale", "perturbation", "sam_point", "sam_gradient", "heavy_ball_update", "SAM"]


def perturbation_scale(grad: Sequence[Tensor], rho: float, normalized: bool = True) -> float:
    """The factor ``s`` with ``e = s g``: ``rho / ||g||`` (SAM; 0 when ``g = 0``) or ``rho`` (USAM)."""
    return _scale(norm(grad) if normalized else 1.0, rho, normalized)


def _scale(grad_norm: float, rho: float, normalized: bool) -> float:
    if not normalized:
        return rho
    return rho / grad_norm if grad_norm > 0.0 else 0.0


def perturbation(grad: Sequence[Tensor], rho: float, normalized: bool = True) -> Params:
    """SAM's ascent step ``rho g / ||g||`` (``normalized``) or USAM's ``rho g``."""
    scale = perturbation_scale(grad, rho, normalized)
    return tuple(scale * g for g in grad)


def sam_point(params: Sequence[Tensor], grad: Sequence[Tensor], rho: float, normalized: bool = True) -> Params:
    """``w + e``: the point where SAM (or USAM) evaluates its gradient."""
    return add_scaled(params, grad, perturbation_scale(grad, rho, normalized))


def sam_gradient(
    grad_fn: Callable[[Params], Params],
    params: Sequence[Tensor],
    grad: Sequence[Tensor],
    rho: float,
    normalized: bool = True,
) -> Params:
    """``grad_fn(params + e)``: the gradient SAM (or USAM) steps along; ``grad`` is ``grad_fn(params)``."""
    if rho == 0.0:
        return tuple(grad)
    return grad_fn(sam_point(params, grad, rho, normalized))


def heavy_ball_update(
    params: Sequence[Tensor],
    direction: Sequence[Tensor],
    eta: float,
    velocity: Sequence[Tensor] | None = None,
    momentum: float = 0.0,
) -> tuple[Params, Params | None]:
    """``v <- momentum v + d; w <- w - eta v``.  Returns ``(new_params, new_velocity)``; with
    ``momentum = 0`` this is ``w - eta d`` and the velocity stays ``None``."""
    if momentum == 0.0:
        return add_scaled(params, direction, -eta), None
    if velocity is None:
        velocity = tuple(torch.zeros_like(d) for d in direction)
    velocity = tuple(momentum * v + d for v, d in zip(velocity, direction))
    return add_scaled(params, velocity, -eta), velocity


class SAM(torch.optim.Optimizer):
    """SAM / USAM / GD (``rho = 0``) with optional heavy-ball momentum, as a drop-in optimizer.

    ``step`` needs a closure that zeroes the gradients, computes the loss, calls ``backward()``
    and returns the loss; it is called twice per step when ``rho > 0`` (at ``w`` and at
    ``w + e``)::

        opt = SAM(model.parameters(), lr=0.1, rho=0.05)
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)

    The perturbation uses the gradient norm over all parameter groups.  ``last_grad_norm``
    holds ``||g||`` at ``w`` after each step (what the SAM-edge needs).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        rho: float = 0.05,
        normalized: bool = True,
        momentum: float = 0.0,
    ):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, rho=rho, normalized=normalized, momentum=momentum))
        self.last_grad_norm: float | None = None

    def _params_with_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and its gradient")
        with torch.enable_grad():
            loss = closure()
        grads = [p.grad for _, p in self._params_with_grad()]
        self.last_grad_norm = norm(grads)
        perturbed = []
        for group, p in self._params_with_grad():
            rho = group["rho"]
            if rho == 0.0:
                continue
            scale = _scale(self.last_grad_norm, rho, group["normalized"])
            perturbed.append((p, p.detach().clone()))  # restored exactly, not by subtraction
            p.add_(p.grad, alpha=scale)
        if perturbed:
            self.zero_grad()
            with torch.enable_grad():
                closure()
            for p, original in perturbed:
                p.copy_(original)
        for group, p in self._params_with_grad():
            d = p.grad
            if group["momentum"] != 0.0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                buf = d.clone() if buf is None else buf.mul_(group["momentum"]).add_(d)
                state["momentum_buffer"] = buf
                d = buf
            p.add_(d, alpha=-group["lr"])
        return loss
