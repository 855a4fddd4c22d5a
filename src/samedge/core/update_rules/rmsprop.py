"""RMSprop as ``torch.optim.RMSprop`` steps (not centered), and its preconditioner.

With direction ``d``: ``g = d + lambda w``, ``v <- alpha v + (1 - alpha) g^2``, ``P = sqrt(v) + eps``
(no bias correction); with ``momentum`` mu: ``b <- mu b + P^-1 g``, ``w <- w - eta b``; without:
``w <- w - eta P^-1 g``.  With ``P`` fixed this is heavy-ball momentum mu with step eta on
``P^-1 (J + lambda I)``: stable while the top eigenvalue of ``P^-1/2 (J + lambda I) P^-1/2`` is
below ``(2 + 2 mu) / eta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from samedge.core.params import Params, add_scaled
from samedge.core.update_rules.base import RuleState, UpdateRule, check_hyperparameter

__all__ = ["RMSprop"]


@dataclass(frozen=True)
class RMSprop(UpdateRule):
    """RMSprop with step ``eta``, smoothing ``alpha`` in [0, 1), ``eps`` > 0, ``momentum`` in
    [0, 1) and coupled ``weight_decay``, step for step as ``torch.optim.RMSprop`` (``centered``
    is not linearised).  State: ``square_avg``, ``step`` and, with momentum, ``momentum_buffer``."""

    name: ClassVar[str] = "rmsprop"
    preconditioned: ClassVar[bool] = True
    eta: float
    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "eta", check_hyperparameter("eta", self.eta, 0.0, low_open=True))
        object.__setattr__(self, "alpha", check_hyperparameter("alpha", self.alpha, 0.0, 1.0, high_open=True))
        object.__setattr__(self, "eps", check_hyperparameter("eps", self.eps, 0.0, low_open=True))
        object.__setattr__(self, "momentum", check_hyperparameter("momentum", self.momentum, 0.0, 1.0, high_open=True))
        object.__setattr__(self, "weight_decay", check_hyperparameter("weight_decay", self.weight_decay, 0.0))

    def init(self, params: Sequence[Tensor]) -> RuleState:
        state: RuleState = {"square_avg": tuple(torch.zeros_like(p) for p in params), "step": 0}
        if self.momentum != 0.0:
            state["momentum_buffer"] = tuple(torch.zeros_like(p) for p in params)
        return state

    def step(self, params: Sequence[Tensor], direction: Sequence[Tensor], state: RuleState) -> tuple[Params, RuleState]:
        g = tuple(direction) if self.weight_decay == 0.0 else add_scaled(direction, params, self.weight_decay)
        square_avg = tuple(
            torch.addcmul(v * self.alpha, x, x, value=1.0 - self.alpha) for v, x in zip(state["square_avg"], g)
        )
        avg = tuple(v.sqrt().add_(self.eps) for v in square_avg)
        new_state: RuleState = {"square_avg": square_avg, "step": state["step"] + 1}
        if self.momentum == 0.0:
            return tuple(torch.addcdiv(p, x, a, value=-self.eta) for p, x, a in zip(params, g, avg)), new_state
        buf = tuple(torch.addcdiv(b * self.momentum, x, a) for b, x, a in zip(state["momentum_buffer"], g, avg))
        new_state["momentum_buffer"] = buf
        return add_scaled(params, buf, -self.eta), new_state

    def preconditioner(self, state: RuleState) -> Params | None:
        """``P = sqrt(v) + eps`` of the last step taken; None before the first step."""
        if state["step"] == 0:
            return None
        return tuple(v.sqrt() + self.eps for v in state["square_avg"])

    def threshold(self) -> float:
        return (2.0 + 2.0 * self.momentum) / self.eta

    def coupled_decay(self) -> float:
        return self.weight_decay
