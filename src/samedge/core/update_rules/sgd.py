"""Heavy-ball SGD: ``v <- beta v + d; w <- w - eta v`` (plain ``w - eta d`` without momentum)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from samedge.core.optim import heavy_ball_update
from samedge.core.params import Params
from samedge.core.thresholds import momentum_edge
from samedge.core.update_rules.base import RuleState, UpdateRule

__all__ = ["HeavyBallSGD"]


@dataclass(frozen=True)
class HeavyBallSGD(UpdateRule):
    """SGD with step ``eta`` > 0 and heavy-ball ``momentum`` in [0, 1), the arithmetic of
    :func:`~samedge.core.optim.heavy_ball_update` (and of ``torch.optim.SGD(momentum=beta)``).

    State: ``{"velocity": v}`` with momentum (zeros before the first step), ``{}`` without.
    Edge: ``(2 + 2 beta) / eta`` on the Hessian itself (no preconditioner)."""

    name: ClassVar[str] = "sgd"
    eta: float
    momentum: float = 0.0

    def __post_init__(self) -> None:
        for key in ("eta", "momentum"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value!r}")
            object.__setattr__(self, key, float(value))
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")

    def init(self, params: Sequence[Tensor]) -> RuleState:
        if self.momentum == 0.0:
            return {}
        return {"velocity": tuple(torch.zeros_like(p) for p in params)}

    def step(self, params: Sequence[Tensor], direction: Sequence[Tensor], state: RuleState) -> tuple[Params, RuleState]:
        new, velocity = heavy_ball_update(params, direction, self.eta, state.get("velocity"), self.momentum)
        return new, ({} if velocity is None else {"velocity": velocity})

    def threshold(self) -> float:
        return momentum_edge(self.eta, self.momentum)
