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

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from samedge.core.optim import SAM, sam_gradient, sam_point
from samedge.core.params import Params, norm
from samedge.core.thresholds import sam_edge_from
from samedge.core.update_rules import UPDATE_RULES, UpdateRule

__all__ = ["Method", "METHOD_KINDS", "BASES", "edge_for"]


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
#: the update rules a method may step with (its ``base``), by their names in UPDATE_RULES
BASES: tuple[str, ...] = tuple(UPDATE_RULES)
# the settings each base does not use, refused unless they keep their defaults (value, why)
_UNUSED: dict[str, tuple[tuple[str, object, str], ...]] = {
    "sgd": (),
    "adam": (("momentum", 0.0, "its momentum is beta1"), ("dampening", 0.0, ""), ("nesterov", False, "")),
    "adamw": (("momentum", 0.0, "its momentum is beta1"), ("dampening", 0.0, ""), ("nesterov", False, "")),
    "rmsprop": (("dampening", 0.0, ""), ("nesterov", False, "")),
}


# torch.optim class -> (base, the group keys that give the method: lr first)
_TORCH_BASES: dict[type, tuple[str, tuple[str, ...]]] = {
    torch.optim.SGD: ("sgd", ("lr", "momentum", "dampening", "nesterov", "weight_decay")),
    torch.optim.Adam: ("adam", ("lr", "betas", "eps", "weight_decay")),
    torch.optim.AdamW: ("adamw", ("lr", "betas", "eps", "weight_decay")),
    torch.optim.RMSprop: ("rmsprop", ("lr", "alpha", "eps", "momentum", "weight_decay")),
}
# optimizer flags whose step samedge does not linearise, and why
_NOT_LINEARISED = {
    "amsgrad": "its denominator is a running maximum of v, not Adam's preconditioner",
    "maximize": "it ascends the loss; the edge is that of descent",
    "centered": "its preconditioner subtracts the squared mean gradient (not modelled)",
}


def _plain(value: object) -> object:
    """A group's setting as a hashable Python value (a tensor lr or betas as floats)."""
    if isinstance(value, Tensor):
        return float(value)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Method:
    """``kind`` ("gd", "sam" or "usam": the perturbation), step ``eta`` > 0, radius ``rho`` >= 0
    (0 for GD), and the update rule ``base`` ("sgd", "adam", "adamw", "rmsprop") with its
    hyperparameters named as ``torch.optim`` names them: ``momentum`` (sgd, rmsprop),
    ``dampening``, ``nesterov`` (sgd), ``weight_decay`` (coupled for sgd, adam, rmsprop; decoupled
    for adamw), ``beta1``, ``beta2`` (adam, adamw), ``eps`` (adam, adamw, rmsprop), ``alpha``
    (rmsprop).  ``rho = 0`` with SAM or USAM is GD in all but name."""

    kind: str
    eta: float
    rho: float = 0.0
    momentum: float = 0.0
    base: str = "sgd"
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    alpha: float = 0.99

    #: the base optimizer's settings beyond eta, rho and momentum (as RunConfig and the CLI name them)
    HYPERPARAMETERS: ClassVar[tuple[str, ...]] = (
        "base",
        "dampening",
        "nesterov",
        "weight_decay",
        "beta1",
        "beta2",
        "eps",
        "alpha",
    )

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
        if self.base not in UPDATE_RULES:
            raise ValueError(f"unknown base {self.base!r}; choose one of {', '.join(BASES)}")
        for key, default, why in _UNUSED[self.base]:
            if getattr(self, key) != default:
                raise ValueError(
                    f"{key} is not a setting of base {self.base!r}{f' ({why})' if why else ''}; "
                    f"got {getattr(self, key)!r}"
                )
        for key in ("dampening", "weight_decay", "beta1", "beta2", "eps", "alpha"):
            object.__setattr__(self, key, _number(key, getattr(self, key)))
        self.rule  # the rule checks its own hyperparameters  # noqa: B018

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> Method:
        """The method a ``torch.optim`` optimizer (``SGD``, ``Adam``, ``AdamW``, ``RMSprop``) or a
        ``samedge.SAM`` over one of them (or with its own heavy-ball update) runs, from its
        hyperparameters.  Refused, with the reason, where the step cannot be linearised as samedge
        models it: another optimizer class, ``amsgrad``, ``maximize``, ``centered``, a tensor
        ``betas``, or hyperparameters that differ between param groups."""
        sam = isinstance(optimizer, SAM)
        inner = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
        name = type(inner).__name__
        keys: tuple[str, ...]
        if inner is None:
            base, keys = "sgd", ("lr", "momentum")
        elif type(inner) in _TORCH_BASES:
            base, keys = _TORCH_BASES[type(inner)]
        else:
            raise ValueError(
                f"samedge knows the edges of SGD, Adam, AdamW and RMSprop (and SAM over them), not of {name}; "
                "pass method=Method(...) for the edge you mean"
            )
        groups = optimizer.param_groups
        for flag, why in _NOT_LINEARISED.items():
            if any(group.get(flag) for group in groups):
                raise ValueError(f"{name} with {flag}=True cannot be linearised by samedge: {why}")
        if base == "adam" and any(group.get("decoupled_weight_decay") for group in groups):
            base = "adamw"
        watched = (*keys, "rho", "normalized")
        settings = {tuple(_plain(group.get(key)) for key in watched) for group in groups}
        if len(settings) != 1:
            raise ValueError(
                f"the optimizer's param groups differ in {', '.join(watched[:-1])}: one edge does not apply"
            )
        values: dict[str, Any] = dict(zip(watched, settings.pop()))
        if values["lr"] is None:
            raise ValueError(f"{name} has no lr: no edge")
        hyper: dict[str, Any] = {}
        for key in keys[1:]:
            if values[key] is None:
                continue
            if key == "betas":
                hyper["beta1"], hyper["beta2"] = (float(b) for b in values[key])
            else:
                hyper[key] = values[key]
        kind = ("sam" if values["normalized"] else "usam") if sam else "gd"
        return cls(kind, float(values["lr"]), float(values["rho"] or 0.0) if sam else 0.0, base=base, **hyper)

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
        """The update rule that turns the method's direction into a step: ``UPDATE_RULES[base]``
        with this method's hyperparameters (those the rule takes)."""
        cls = UPDATE_RULES[self.base]
        make: Callable[..., UpdateRule] = cls  # a rule takes its hyperparameters as keywords
        return make(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]

    @property
    def preconditioned(self) -> bool:
        """Whether the base preconditions (adam, adamw, rmsprop): its edge is on the preconditioned
        operator ``P^-1/2 (H + s H^2 + lambda I) P^-1/2``, not on the Hessian."""
        return self.rule.preconditioned

    # thresholds -----------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """The base's threshold ``c`` on its curvature operator (:meth:`UpdateRule.threshold`)."""
        return self.rule.threshold()

    @property
    def gd_edge(self) -> float:
        """The edge without SAM's perturbation: on the Hessian for sgd (``c - weight_decay``; the
        heavy-ball ``(2 + 2 beta) / eta`` with momentum alone), on the preconditioned Hessian
        (``c``) for a preconditioned base."""
        rule = self.rule
        if rule.preconditioned:
            return rule.threshold()
        decay = rule.coupled_decay()
        return rule.threshold() if decay == 0.0 else max(rule.threshold() - decay, 0.0)

    def edge(self, grad_norm: float) -> float:
        """The stability threshold of this method at gradient norm ``grad_norm`` (used by SAM only).

        sgd: the largest Hessian eigenvalue ``h`` with ``h (1 + s h) + weight_decay <= c``
        (``s`` = :meth:`perturbation_scale`), closed form.  A preconditioned base: ``c``, the
        threshold on the top eigenvalue of ``P^-1/2 (H + s H^2 + lambda I) P^-1/2`` (the
        effective sharpness), which does not reduce to the Hessian's eigenvalues."""
        if self.preconditioned:
            return self.threshold
        c = self.gd_edge
        if not self.perturbs:
            return c
        if self.normalized:
            return sam_edge_from(c, self.rho, grad_norm)
        return sam_edge_from(c, self.rho, 1.0)

    def curvature_scale(self, grad_norm: float) -> float:
        """``s`` in the linearised direction's Jacobian ``H + s H^2``: ``rho / ||g||`` (SAM, with
        ``||g||`` held fixed), ``rho`` (USAM), 0 (GD)."""
        return self.perturbation_scale(grad_norm)

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
