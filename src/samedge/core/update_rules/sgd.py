"""SGD as ``torch.optim.SGD`` steps: heavy-ball momentum, dampening, Nesterov and coupled weight decay.

With direction ``d`` (the gradient, or SAM's) and weight decay ``lambda``: ``g = d + lambda w``;
with momentum ``beta`` the buffer is ``g`` at the first step and ``beta v + (1 - dampening) g``
after it; the step is ``w - eta v`` (heavy ball) or ``w - eta (g + beta v)`` (Nesterov); plain
``w - eta g`` without momentum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from samedge.core.optim import heavy_ball_update
from samedge.core.params import Params, add_scaled
from samedge.core.update_rules.base import RuleState, UpdateRule, check_hyperparameter

__all__ = ["HeavyBallSGD", "sgd_threshold"]


def sgd_threshold(eta: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    """The edge of ``torch.optim.SGD``'s step on the top eigenvalue ``a`` of ``H + lambda I``.

    Along an eigendirection the linearised step with buffer ``v`` is ``v' = beta v + (1 - d) a w``
    and ``w' = w - eta v'`` (heavy ball): the characteristic polynomial
    ``z^2 - (1 + beta - eta (1 - d) a) z + beta`` has a root at ``z = -1`` when
    ``a = (2 + 2 beta) / (eta (1 - d))``.  Nesterov (``d = 0``): ``w' = w - eta (a w + beta v')``
    gives ``z^2 - (1 + beta - eta a (1 + beta)) z + beta - eta a beta``, with a root at ``-1``
    when ``a = (2 + 2 beta) / (eta (1 + 2 beta))``.  Without momentum dampening does nothing: ``2 / eta``."""
    if momentum == 0.0:
        return 2.0 / eta
    if nesterov:
        return (2.0 + 2.0 * momentum) / (eta * (1.0 + 2.0 * momentum))
    return (2.0 + 2.0 * momentum) / (eta * (1.0 - dampening))


@dataclass(frozen=True)
class HeavyBallSGD(UpdateRule):
    """SGD with step ``eta`` > 0, ``momentum`` in [0, 1), ``dampening`` in [0, 1), ``nesterov``
    and coupled ``weight_decay`` >= 0: the arithmetic of ``torch.optim.SGD`` with the same names
    (momentum alone: :func:`~samedge.core.optim.heavy_ball_update`, bit for bit as before).

    State: ``{"velocity": v}`` with momentum (zeros before the first step; with dampening also
    ``"step"``, since the first buffer is undamped), ``{}`` without.  Edge:
    :func:`sgd_threshold` on ``H + weight_decay I`` (no preconditioner)."""

    name: ClassVar[str] = "sgd"
    eta: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "eta", check_hyperparameter("eta", self.eta, 0.0, low_open=True))
        object.__setattr__(self, "momentum", check_hyperparameter("momentum", self.momentum, 0.0, 1.0, high_open=True))
        object.__setattr__(
            self, "dampening", check_hyperparameter("dampening", self.dampening, 0.0, 1.0, high_open=True)
        )
        object.__setattr__(self, "weight_decay", check_hyperparameter("weight_decay", self.weight_decay, 0.0))
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be true or false, got {self.nesterov!r}")
        if self.nesterov and (self.momentum == 0.0 or self.dampening != 0.0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0 (as torch.optim.SGD)")

    @property
    def _plain(self) -> bool:
        return self.dampening == 0.0 and not self.nesterov and self.weight_decay == 0.0

    def init(self, params: Sequence[Tensor]) -> RuleState:
        if self.momentum == 0.0:
            return {}
        state: RuleState = {"velocity": tuple(torch.zeros_like(p) for p in params)}
        if self.dampening != 0.0:
            state["step"] = 0
        return state

    def step(self, params: Sequence[Tensor], direction: Sequence[Tensor], state: RuleState) -> tuple[Params, RuleState]:
        if self._plain:
            new, velocity = heavy_ball_update(params, direction, self.eta, state.get("velocity"), self.momentum)
            return new, ({} if velocity is None else {"velocity": velocity})
        g = tuple(direction)
        if self.weight_decay != 0.0:
            g = add_scaled(g, params, self.weight_decay)
        if self.momentum == 0.0:
            return add_scaled(params, g, -self.eta), {}
        beta = self.momentum
        if self.dampening != 0.0 and state["step"] == 0:
            velocity = tuple(x.clone() for x in g)  # torch's first buffer: the gradient, undamped
        else:
            velocity = tuple(torch.add(beta * v, x, alpha=1.0 - self.dampening) for v, x in zip(state["velocity"], g))
        new_state: RuleState = {"velocity": velocity}
        if self.dampening != 0.0:
            new_state["step"] = state["step"] + 1
        step = add_scaled(g, velocity, beta) if self.nesterov else velocity
        return add_scaled(params, step, -self.eta), new_state

    def threshold(self) -> float:
        return sgd_threshold(self.eta, self.momentum, self.dampening, self.nesterov)

    def coupled_decay(self) -> float:
        return self.weight_decay
