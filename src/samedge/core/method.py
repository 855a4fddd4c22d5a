"""The optimizer method: GD, SAM or USAM with step ``eta``, radius ``rho`` and heavy-ball momentum.

A :class:`Method` is the one place that knows what each kind means.  It validates itself and
answers every question the rest of samedge asks of an optimizer:

* its stability threshold for a gradient norm (:meth:`Method.edge`) and the GD (heavy-ball) edge;
* its perturbation ``e`` (``rho g / ||g||`` for SAM, ``rho g`` for USAM, none for GD), the ascent
  point ``w + e`` and the gradient it steps along (:meth:`Method.direction`);
* its update rule (:attr:`Method.rule`, heavy-ball SGD ``v <- beta v + d; w <- w - eta v``,
  the registry's ``"sgd"``), which owns the optimizer's state; :meth:`Method.update` is its step
  with the velocity passed by hand.

Nothing outside this module branches on the kind's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from samedge.core.optim import SAM, sam_gradient, sam_point
from samedge.core.params import Params, norm
from samedge.core.thresholds import sam_edge, usam_edge
from samedge.core.update_rules import UPDATE_RULES, UpdateRule

__all__ = ["Method", "METHOD_KINDS", "edge_for"]


class _Kind(NamedTuple):
    normalized: bool  # perturbation divided by ||g||
    perturbs: bool  # evaluates its gradient at a perturbed point (has a radius rho)
    edge_name: str  # what its threshold is called in figures and reports


_KINDS: dict[str, _Kind] = {
    "gd": _Kind(normalized=False, perturbs=False, edge_name="GD edge"),
    "sam": _Kind(normalized=True, perturbs=True, edge_name="SAM-edge"),
    "usam": _Kind(normalized=False, perturbs=True, edge_name="USAM edge"),
}
METHOD_KINDS: tuple[str, ...] = tuple(_KINDS)
_RULE = "sgd"  # the update rule of every method (heavy-ball SGD), by its name in UPDATE_RULES


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Method:
    """``kind`` ("gd", "sam" or "usam"), step ``eta`` > 0, radius ``rho`` >= 0 (0 for GD) and
    heavy-ball ``momentum`` in [0, 1).  ``rho = 0`` with SAM or USAM is GD in all but name."""

    kind: str
    eta: float
    rho: float = 0.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown optimizer {self.kind!r}; choose one of {', '.join(METHOD_KINDS)}")
        eta, rho, momentum = _number("eta", self.eta), _number("rho", self.rho), _number("momentum", self.momentum)
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta!r}")
        if not math.isfinite(4.0 / eta):  # every edge scales as 1/eta: it must stay a number
            raise ValueError(f"eta = {eta!r} is so small that its edge (~2/eta) is not a finite number")
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if rho != 0.0 and not self.perturbs:
            raise ValueError(f"rho must be 0 with optimizer {self.kind!r} (use sam or usam for rho > 0), got {rho!r}")
        object.__setattr__(self, "eta", eta)
        object.__setattr__(self, "rho", rho)
        object.__setattr__(self, "momentum", momentum)

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> Method:
        """The method a ``samedge.SAM`` or ``torch.optim.SGD`` optimizer runs, from its
        hyperparameters (step, radius, momentum), for the edge that depends on them.  Refused,
        with the reason, where samedge knows no edge: other base optimizers (Adam, AdamW, ...),
        weight decay, dampening, Nesterov, or hyperparameters that differ between groups."""
        sam = isinstance(optimizer, SAM)
        inner = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
        if inner is not None and type(inner) is not torch.optim.SGD:
            raise ValueError(
                f"samedge knows the edges of GD, heavy-ball SGD, SAM and USAM, not of {type(inner).__name__}; "
                "pass method=Method(...) or eta/rho/momentum for the edge you mean"
            )
        keys = ("lr", "momentum", "rho", "normalized", "weight_decay", "dampening", "nesterov")
        settings = {tuple(group.get(key) for key in keys) for group in optimizer.param_groups}
        if len(settings) != 1:
            raise ValueError("the optimizer's param groups differ in lr, momentum or rho: one edge does not apply")
        lr, momentum, rho, normalized, weight_decay, dampening, nesterov = settings.pop()
        if lr is None:
            raise ValueError(f"{type(optimizer).__name__} has no lr: no edge")
        if weight_decay or dampening or nesterov:
            raise ValueError(
                "the edge with weight_decay, dampening or nesterov is not modelled by samedge; "
                "pass method=Method(...) or eta/rho/momentum for the edge you mean"
            )
        if not sam:
            return cls("gd", lr, 0.0, momentum or 0.0)
        return cls("sam" if normalized else "usam", lr, rho or 0.0, momentum or 0.0)

    # what the kind means ------------------------------------------------------------------
    @staticmethod
    def takes_rho(kind: str) -> bool:
        """Whether methods of ``kind`` have a radius ``rho`` (SAM, USAM; not GD)."""
        return _KINDS[kind].perturbs

    @property
    def normalized(self) -> bool:
        """SAM's perturbation is normalized by ``||g||``; USAM's is not."""
        return _KINDS[self.kind].normalized

    @property
    def perturbs(self) -> bool:
        """Whether the kind evaluates its gradient at a perturbed point (SAM, USAM)."""
        return _KINDS[self.kind].perturbs

    @property
    def edge_name(self) -> str:
        """What the method's threshold is called: "SAM-edge", "USAM edge" or "GD edge"."""
        return _KINDS[self.kind].edge_name

    @property
    def rule(self) -> UpdateRule:
        """The update rule that turns the method's direction into a step, with this method's
        ``eta`` and ``momentum``: heavy-ball SGD (``UPDATE_RULES["sgd"]``)."""
        make: Callable[..., UpdateRule] = UPDATE_RULES[_RULE]  # a rule takes its hyperparameters as keywords
        return make(eta=self.eta, momentum=self.momentum)

    # thresholds -----------------------------------------------------------------------------
    @property
    def gd_edge(self) -> float:
        """The GD (heavy-ball) edge ``(2 + 2 beta) / eta``: the threshold of :attr:`rule`."""
        return self.rule.threshold()

    def edge(self, grad_norm: float) -> float:
        """The stability threshold of this method at gradient norm ``grad_norm`` (used by SAM only)."""
        if not self.perturbs:
            return self.gd_edge
        if self.normalized:
            return sam_edge(self.eta, self.rho, grad_norm, self.momentum)
        return usam_edge(self.eta, self.rho, self.momentum)

    # the step ------------------------------------------------------------------------------
    def perturbation_scale(self, grad_norm: float) -> float:
        """The factor ``s`` with ``e = s g``: ``rho / ||g||`` (SAM; 0 when ``g = 0``), ``rho``
        (USAM) or 0 (GD)."""
        if not self.perturbs:
            return 0.0
        if not self.normalized:
            return self.rho
        return self.rho / grad_norm if grad_norm > 0.0 else 0.0

    def perturbation(self, grad: Sequence[Tensor]) -> Params:
        """``e = s g`` (see :meth:`perturbation_scale`)."""
        scale = self.perturbation_scale(norm(grad))
        return tuple(scale * g for g in grad)

    def ascent_point(self, params: Sequence[Tensor], grad: Sequence[Tensor]) -> Params:
        """``w + e``: where SAM (or USAM) evaluates the gradient it steps along."""
        return sam_point(params, grad, self.rho, self.normalized)

    def direction(
        self, grad_fn: Callable[[Params], Params], params: Sequence[Tensor], grad: Sequence[Tensor]
    ) -> Params:
        """The gradient the method steps along: ``grad`` itself (GD, or ``rho = 0``) or
        ``grad_fn(w + e)``; ``grad`` is ``grad_fn(params)``."""
        return sam_gradient(grad_fn, params, grad, self.rho, self.normalized)

    def update(
        self, params: Sequence[Tensor], direction: Sequence[Tensor], velocity: Sequence[Tensor] | None = None
    ) -> tuple[Params, Params | None]:
        """Heavy-ball step ``v <- beta v + d; w <- w - eta v``; returns ``(w, v)`` (``v`` is None
        without momentum).  The step of :attr:`rule` with its state passed as a velocity
        (``None``: the initial state); a loop that keeps the rule's state calls ``rule.step``."""
        rule = self.rule
        state = rule.init(params) if velocity is None else {"velocity": tuple(velocity)}
        new, state = rule.step(params, direction, state)
        return new, state.get("velocity")


def edge_for(optimizer: str, eta: float, rho: float, grad_norm: float, momentum: float = 0.0) -> float:
    """``Method(optimizer, eta, rho, momentum).edge(grad_norm)``: the edge that applies to
    ``optimizer`` ("gd", "sam" or "usam"; ``rho`` must be 0 for "gd")."""
    return Method(optimizer, eta, rho, momentum).edge(grad_norm)
