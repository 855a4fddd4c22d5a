"""Adam as ``torch.optim.Adam`` steps (coupled L2 ``weight_decay``), and its preconditioner.

At step ``t`` (counted from 1) with direction ``d``: ``g = d + lambda w``,
``m <- beta1 m + (1 - beta1) g``, ``v <- beta2 v + (1 - beta2) g^2`` and
``w <- w - eta/(1 - beta1^t) * m / (sqrt(v)/sqrt(1 - beta2^t) + eps)``: that is
``w <- w - eta P^-1 m`` with the diagonal ``P = (1 - beta1^t) (sqrt(v_hat) + eps)``,
``v_hat = v / (1 - beta2^t)``.

The edge: with ``P`` held fixed and ``u = m / (1 - beta1)``, the step is ``u' = beta1 u + g``,
``w' = w - eta (1 - beta1) P^-1 u'``: heavy-ball momentum ``beta1`` with step ``eta (1 - beta1)``
on ``P^-1 (J + lambda I)``, similar to the symmetric ``P^-1/2 (J + lambda I) P^-1/2``.  So it is
stable while that operator's top eigenvalue is below ``(2 + 2 beta1) / ((1 - beta1) eta)``
(Cohen et al. 2022; 38/eta at beta1 = 0.9).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from samedge.core.params import Params, add_scaled
from samedge.core.update_rules.base import RuleState, UpdateRule, check_hyperparameter

__all__ = ["Adam", "adam_threshold"]


def adam_threshold(eta: float, beta1: float) -> float:
    """``(2 + 2 beta1) / ((1 - beta1) eta)``: Adam's edge on the preconditioned curvature."""
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * eta)


@dataclass(frozen=True)
class Adam(UpdateRule):
    """Adam with step ``eta``, ``beta1``, ``beta2`` in [0, 1), ``eps`` > 0 and coupled
    ``weight_decay`` >= 0, step for step as ``torch.optim.Adam`` (``amsgrad`` and ``maximize``
    are not rules samedge linearises).  State: ``exp_avg``, ``exp_avg_sq`` and ``step``."""

    name: ClassVar[str] = "adam"
    preconditioned: ClassVar[bool] = True
    eta: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "eta", check_hyperparameter("eta", self.eta, 0.0, low_open=True))
        for key in ("beta1", "beta2"):
            object.__setattr__(self, key, check_hyperparameter(key, getattr(self, key), 0.0, 1.0, high_open=True))
        object.__setattr__(self, "eps", check_hyperparameter("eps", self.eps, 0.0, low_open=True))
        object.__setattr__(self, "weight_decay", check_hyperparameter("weight_decay", self.weight_decay, 0.0))

    def init(self, params: Sequence[Tensor]) -> RuleState:
        return {
            "exp_avg": tuple(torch.zeros_like(p) for p in params),
            "exp_avg_sq": tuple(torch.zeros_like(p) for p in params),
            "step": 0,
        }

    def _decayed(self, params: Sequence[Tensor], direction: Sequence[Tensor]) -> Params:
        """The gradient the moments see: ``d + weight_decay w`` (coupled decay)."""
        if self.weight_decay == 0.0:
            return tuple(direction)
        return add_scaled(direction, params, self.weight_decay)

    def _moments_step(
        self, params: Sequence[Tensor], g: Sequence[Tensor], state: RuleState
    ) -> tuple[Params, RuleState]:
        """The moments' update with ``g`` and the step ``params - eta P^-1 m`` (torch's arithmetic)."""
        t = state["step"] + 1
        exp_avg = tuple(torch.lerp(m, x, 1.0 - self.beta1) for m, x in zip(state["exp_avg"], g))
        exp_avg_sq = tuple(
            torch.addcmul(v * self.beta2, x, x, value=1.0 - self.beta2) for v, x in zip(state["exp_avg_sq"], g)
        )
        step_size = self.eta / (1.0 - self.beta1**t)
        bias2_sqrt = (1.0 - self.beta2**t) ** 0.5
        new = tuple(
            torch.addcdiv(p, m, (v.sqrt() / bias2_sqrt).add_(self.eps), value=-step_size)
            for p, m, v in zip(params, exp_avg, exp_avg_sq)
        )
        return new, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": t}

    def step(self, params: Sequence[Tensor], direction: Sequence[Tensor], state: RuleState) -> tuple[Params, RuleState]:
        return self._moments_step(params, self._decayed(params, direction), state)

    def preconditioner(self, state: RuleState) -> Params | None:
        """``P = (1 - beta1^t) (sqrt(v / (1 - beta2^t)) + eps)`` of the last step taken (``t`` =
        ``state["step"]``); None before the first step, when Adam has no preconditioner yet."""
        t = state["step"]
        if t == 0:
            return None
        bias1, bias2_sqrt = 1.0 - self.beta1**t, math.sqrt(1.0 - self.beta2**t)
        return tuple(bias1 * ((v.sqrt() / bias2_sqrt) + self.eps) for v in state["exp_avg_sq"])

    def threshold(self) -> float:
        return adam_threshold(self.eta, self.beta1)

    def coupled_decay(self) -> float:
        return self.weight_decay
