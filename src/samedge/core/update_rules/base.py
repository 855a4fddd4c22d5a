"""The :class:`UpdateRule` base type: an optimizer's step, with the state it owns.

An update rule turns the direction a method steps along (the gradient, or SAM's gradient at the
ascent point) into new parameters.  It owns its state (heavy-ball's velocity; Adam's moments and
step count) and knows what the edge of stability is measured against: the diagonal
preconditioner of an adaptive rule and the threshold of its step.  Rules are pure: :meth:`step`
returns new parameters and a new state and never changes its inputs, so a state once returned may
be kept (a checkpoint at a step boundary holds references, not copies).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor

from samedge.core.params import Params

__all__ = ["UpdateRule", "RuleState", "check_hyperparameter"]

#: A rule's state: named entries, each a tuple of tensors shaped like the parameters (a velocity,
#: a moment), a single tensor or a Python number (a step count).  ``{}`` for a stateless rule.
RuleState = dict[str, Any]


class UpdateRule(ABC):
    """An optimizer's update ``(w, d, state) -> (w', state')``, its state and its edge.

    A subclass sets :attr:`name` (its key in :data:`~samedge.core.update_rules.UPDATE_RULES`),
    takes its hyperparameters as keyword arguments (``eta`` first) and implements :meth:`init`,
    :meth:`step` and :meth:`threshold`; an adaptive rule also :meth:`preconditioner`.  The default
    :meth:`state_dict` and :meth:`load_state_dict` save and restore any state of the
    :data:`RuleState` form.
    """

    name: ClassVar[str]
    #: whether the edge is measured on a preconditioned Hessian (:meth:`preconditioner`)
    preconditioned: ClassVar[bool] = False

    @abstractmethod
    def init(self, params: Sequence[Tensor]) -> RuleState:
        """The state before the first step at ``params`` (zeros where a buffer is kept)."""

    @abstractmethod
    def step(self, params: Sequence[Tensor], direction: Sequence[Tensor], state: RuleState) -> tuple[Params, RuleState]:
        """One update along ``direction``: ``(new_params, new_state)``; ``params``, ``direction``
        and ``state`` are left as they were."""

    def preconditioner(self, state: RuleState) -> Params | None:
        """The diagonal ``P`` (one tensor per parameter) of an adaptive rule in ``state``: its edge
        is measured on the preconditioned Hessian ``P^-1/2 H P^-1/2`` against :meth:`threshold`.
        None (the default): ``P = I``, the Hessian itself."""
        return None

    @abstractmethod
    def threshold(self) -> float:
        """The edge of stability of this rule's step: the largest eigenvalue of its curvature
        operator ``P^-1/2 (J + coupled_decay I) P^-1/2`` (``J`` the Jacobian of the direction, the
        Hessian without SAM's perturbation; ``P = I`` without a preconditioner) at which the
        linearised step is stable on a quadratic."""

    def coupled_decay(self) -> float:
        """The weight decay the rule adds to the direction (``d + lambda w``, coupled L2 decay, as
        ``torch.optim.SGD``/``Adam``/``RMSprop`` apply it): it shifts the curvature operator by
        ``lambda I``.  0 without one, and for decoupled decay (AdamW), which :meth:`threshold`
        accounts for instead."""
        return 0.0

    def state_dict(self, state: RuleState) -> dict[str, Any]:
        """``state`` in a form a checkpoint saves (tensor tuples as lists).  The tensors are
        referenced, not copied: cheap at every step boundary, and safe because rules are pure."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in state.items()}

    def load_state_dict(self, saved: Mapping[str, Any] | None, params: Sequence[Tensor]) -> RuleState:
        """The state saved by :meth:`state_dict`, checked against :meth:`init` at ``params`` (the
        same entries, tensors of the same shapes) and placed on their devices and dtypes.
        ``saved = None`` is the initial state.  :class:`ValueError` says what does not match."""
        fresh = self.init(params)
        if saved is None:
            return fresh
        if set(saved) != set(fresh):
            raise ValueError(
                f"the {self.name!r} rule's state has {sorted(fresh) or 'no entries'}, the saved one "
                f"{sorted(saved) or 'none'}"
            )
        state: RuleState = {}
        for key, like in fresh.items():
            value = saved[key]
            if isinstance(like, tuple):
                if (
                    not isinstance(value, (list, tuple))
                    or len(value) != len(like)
                    or any(not isinstance(t, Tensor) or t.shape != q.shape for t, q in zip(value, like))
                ):
                    raise ValueError(
                        f"the saved {key!r} of the {self.name!r} rule does not match the parameters' shapes"
                    )
                state[key] = tuple(t.to(device=q.device, dtype=q.dtype) for t, q in zip(value, like))
            elif isinstance(like, Tensor):
                if not isinstance(value, Tensor) or value.shape != like.shape:
                    raise ValueError(
                        f"the saved {key!r} of the {self.name!r} rule is not a tensor of shape {tuple(like.shape)}"
                    )
                state[key] = value.to(device=like.device, dtype=like.dtype)
            else:
                if isinstance(value, (Tensor, list, tuple, dict)):
                    raise ValueError(
                        f"the saved {key!r} of the {self.name!r} rule should be a number, got {type(value).__name__}"
                    )
                state[key] = value
        return state


def check_hyperparameter(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float, refused with :class:`ValueError` (naming ``name``) unless it is a finite
    number in the range ``low .. high`` (each end closed unless ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        what = (
            f"> {low:g}"
            if high == math.inf and low_open
            else f">= {low:g}"
            if high == math.inf
            else f"in {lo}{low:g}, {high:g}{hi}"
        )
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value
