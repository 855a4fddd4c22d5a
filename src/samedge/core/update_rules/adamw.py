"""AdamW as ``torch.optim.AdamW`` steps: Adam with decoupled weight decay.

The step is ``w <- (1 - eta lambda) w`` and then Adam's ``w <- w - eta P^-1 m`` with moments of
the direction alone.  Its edge, with ``P`` fixed and ``q = 1 - eta lambda``: along an eigenvector
of ``K = P^-1/2 J P^-1/2`` with eigenvalue ``k`` and ``a = eta (1 - beta1) k``, the pair
(position, scaled momentum) evolves by ``[[q - a, -beta1], [a, beta1]]``, whose characteristic
polynomial ``z^2 - (q - a + beta1) z + beta1 q`` has a root at ``z = -1`` when
``a = (1 + beta1)(1 + q)``, i.e. at ``k = (2 + 2 beta1)/((1 - beta1) eta) * (1 - eta lambda / 2)``:
the decoupled decay lowers Adam's edge by the factor ``1 - eta lambda / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from samedge.core.params import Params
from samedge.core.update_rules.adam import Adam, adam_threshold
from samedge.core.update_rules.base import RuleState

__all__ = ["AdamW", "adamw_threshold"]


def adamw_threshold(eta: float, beta1: float, weight_decay: float) -> float:
    """``(2 + 2 beta1) / ((1 - beta1) eta) * (1 - eta weight_decay / 2)``."""
    return adam_threshold(eta, beta1) * (1.0 - eta * weight_decay / 2.0)


@dataclass(frozen=True)
class AdamW(Adam):
    """AdamW (decoupled ``weight_decay``, default 0.01 as torch's), step for step as
    ``torch.optim.AdamW``.  Same state and preconditioner as :class:`Adam`."""

    name: ClassVar[str] = "adamw"
    weight_decay: float = 0.01

    def step(self, params: Sequence[Tensor], direction: Sequence[Tensor], state: RuleState) -> tuple[Params, RuleState]:
        if self.weight_decay != 0.0:
            params = tuple(p * (1.0 - self.eta * self.weight_decay) for p in params)
        return self._moments_step(params, tuple(direction), state)

    def threshold(self) -> float:
        return adamw_threshold(self.eta, self.beta1, self.weight_decay)

    def coupled_decay(self) -> float:
        return 0.0
