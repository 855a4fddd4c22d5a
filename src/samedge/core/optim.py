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
from samedge.core.validation import real_number

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


_OWN_KEYS = {"params", "param_names", "rho", "normalized"}  # param_names: torch's named parameters


class SAM(torch.optim.Optimizer):
    """SAM / USAM / GD (``rho = 0``) as a ``torch.optim`` optimizer, in two forms.

    **Over any base optimizer** (the convention of the most-used PyTorch SAM)::

        opt = SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.05,
                  lr=0.1, momentum=0.9, weight_decay=5e-4)      # or torch.optim.AdamW, ...
        loss_fn(model(x), y).backward()          # the gradient g at w
        opt.step(closure)                        # closure: zero_grad, loss, backward, return loss

    ``step(closure)`` is ``first_step()`` (``w <- w + e`` with ``e = rho g/||g||``, USAM
    ``rho g``, from the gradients in ``.grad``), ``zero_grad()``, ``closure()`` (the gradient at
    ``w + e``) and ``second_step()`` (back to ``w`` exactly, then the base optimizer's step with
    the gradient at ``w + e``); it returns the closure's loss (at ``w + e``).  The two steps may
    also be called by hand.  The keyword arguments other than ``rho`` and ``normalized`` go to
    the base optimizer; the perturbation uses the plain gradient (weight decay and momentum act
    in the base step only).

    **Built in** (no ``base_optimizer``): ``SAM(params, lr=0.1, rho=0.05, momentum=0.9)`` with
    heavy-ball momentum ``v <- beta v + d; w <- w - lr v``.  Here ``step(closure)`` calls the
    closure twice, at ``w`` and at ``w + e`` (once when ``rho = 0``), and returns the loss at
    ``w``.

    The perturbation uses the gradient norm over all parameter groups (parameters without a
    gradient, e.g. frozen ones, are left out); ``last_grad_norm`` holds ``||g||`` at ``w`` after
    each step (what the SAM-edge needs).  A param-group key that neither SAM nor its base
    optimizer uses is refused (``ValueError``), never ignored.

    With ``secant_pair=True`` each step also keeps ``last_secant_pair = (e, g(w + e) - g(w))``
    (flat tensors over the perturbed parameters): a secant of the Hessian along ``e`` that
    :meth:`samedge.SharpnessTracker.secant` turns into a per-step sharpness estimate at no extra
    gradient (it costs two parameter-sized copies per step).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        rho: float = 0.05,
        normalized: bool = True,
        *,
        lr: float | None = None,
        momentum: float = 0.0,
        secant_pair: bool = False,
        **base_kwargs,
    ):
        rho = real_number("rho", rho, low=0.0)
        self.last_grad_norm: float | None = None
        self.secant_pair = bool(secant_pair)
        self.last_secant_pair: tuple[Tensor, Tensor] | None = None
        self._grad_at_w: dict[Tensor, Tensor] = {}
        self._origin: dict[Tensor, Tensor] = {}
        if base_optimizer is None:
            if base_kwargs:
                raise ValueError(
                    f"SAM's built-in update takes lr, rho, normalized and momentum, not {', '.join(sorted(base_kwargs))}; "
                    "for those pass base_optimizer=torch.optim.SGD (or another torch optimizer)"
                )
            if lr is None:
                raise ValueError("lr must be given (a number > 0)")
            lr = real_number("lr", lr, low=0.0, low_open=True)
            momentum = real_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
            self.base_optimizer: torch.optim.Optimizer | None = None
            super().__init__(params, dict(lr=lr, rho=rho, normalized=normalized, momentum=momentum))
            self._allowed = _OWN_KEYS | {"lr", "momentum"}
        else:
            if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
                hint = (
                    " (the step size is a keyword: SAM(params, lr=...))"
                    if isinstance(base_optimizer, (int, float))
                    else ""
                )
                raise ValueError(f"base_optimizer must be a torch.optim.Optimizer class, got {base_optimizer!r}{hint}")
            if lr is not None:
                base_kwargs["lr"] = lr
            if momentum:
                base_kwargs["momentum"] = momentum
            super().__init__(params, dict(rho=rho, normalized=normalized))
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
            self.param_groups = self.base_optimizer.param_groups  # one list of groups, shared
            self.defaults.update(self.base_optimizer.defaults)
            self._allowed = _OWN_KEYS | set(self.base_optimizer.defaults)
        for group in self.param_groups:
            self._check_group(group)

    def _check_group(self, group: dict) -> None:
        unknown = sorted(set(group) - self._allowed)
        if unknown:
            who = type(self.base_optimizer).__name__ if self.base_optimizer is not None else "SAM's built-in update"
            raise ValueError(f"param group keys {unknown} are not used by SAM or {who}; they would be ignored")
        if "rho" in group and not group["rho"] >= 0:
            raise ValueError(f"rho must be >= 0, got {group['rho']}")

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_allowed"):  # after construction: refused before anything is added
            self._check_group(param_group)
        base = getattr(self, "base_optimizer", None)
        if base is None:
            super().add_param_group(param_group)
        else:
            base.add_param_group(
                {"rho": self.defaults["rho"], "normalized": self.defaults["normalized"], **param_group}
            )

    def _params_with_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """``w <- w + e`` from the gradients in ``.grad`` (the gradient at ``w``); sets
        ``last_grad_norm``.  Groups with ``rho = 0`` are not moved."""
        grads = [p.grad for _, p in self._params_with_grad()]
        if not grads:
            raise ValueError("SAM.first_step needs the gradient at w: call loss.backward() first")
        self.last_grad_norm = norm(grads)
        self._origin = {}
        for group, p in self._params_with_grad():
            if group["rho"] == 0.0:
                continue
            scale = _scale(self.last_grad_norm, group["rho"], group["normalized"])
            self._origin[p] = p.detach().clone()  # restored exactly, not by subtraction
            if self.secant_pair:
                self._grad_at_w[p] = p.grad.detach().clone()
            p.add_(p.grad, alpha=scale)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Back to ``w`` and the update with the gradients in ``.grad`` (those at ``w + e``)."""
        if self.secant_pair:
            held = [(p, p.grad) for p in self._origin if p.grad is not None and p in self._grad_at_w]
            self.last_secant_pair = (
                (
                    torch.cat([(p.detach() - self._origin[p]).reshape(-1) for p, _ in held]),
                    torch.cat([(g - self._grad_at_w[p]).reshape(-1) for p, g in held]),
                )
                if held
                else None
            )
            self._grad_at_w = {}
        for p, original in self._origin.items():
            p.copy_(original)
        self._origin = {}
        if self.base_optimizer is not None:
            self.base_optimizer.step()
        else:
            self._heavy_ball_step()
        if zero_grad:
            self.zero_grad()

    def _heavy_ball_step(self) -> None:
        for group, p in self._params_with_grad():
            d = p.grad
            if group["momentum"] != 0.0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                buf = d.clone() if buf is None else buf.mul_(group["momentum"]).add_(d)
                state["momentum_buffer"] = buf
                d = buf
            p.add_(d, alpha=-group["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and its gradient")
        if self.base_optimizer is not None:
            if not any(True for _ in self._params_with_grad()):
                raise ValueError(
                    "SAM(base_optimizer=...).step(closure) uses the gradient at w: call loss.backward() before it"
                )
            self.first_step(zero_grad=True)
            with torch.enable_grad():
                loss = closure()
            self.second_step()
            return loss
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        if self._origin:
            self.zero_grad()
            with torch.enable_grad():
                closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict:
        if self.base_optimizer is not None:
            return self.base_optimizer.state_dict()  # the groups are shared; the state is the base's
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if self.base_optimizer is None:
            super().load_state_dict(state_dict)
            return
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
