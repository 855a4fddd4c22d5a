"""Batch sharpness: the curvature each minibatch's loss has along the step taken on it.

For minibatch SGD the quantity that settles at ``2/eta`` is not the full-batch ``lambda_1`` but
(Andreyev & Beneventano, "Edge of stochastic stability", 2024)

    batch_sharpness = E_B[ g_B^T H_B g_B / ||g_B||^2 ]

with ``g_B`` and ``H_B`` the gradient and Hessian of minibatch ``B``'s loss.  Its reason: on a
quadratic, the step ``w - eta g_B`` changes ``L_B`` by ``-eta ||g_B||^2 + eta^2/2 g_B^T H_B g_B``,
so it lowers the batch's own loss iff ``g_B^T H_B g_B / ||g_B||^2 < 2/eta``.

The same argument for a method that steps along ``d_B`` (SAM: ``d_B = grad L_B(w + rho g_B /
||g_B||)``; USAM: ``grad L_B(w + rho g_B)``; GD: ``d_B = g_B``): the step ``w - eta d_B`` changes
``L_B`` by ``-eta g_B^T d_B + eta^2/2 d_B^T H_B d_B`` (exact on a quadratic), so it lowers the
batch's loss iff

    step_sharpness_B = d_B^T H_B d_B / g_B^T d_B < 2/eta.

The *batch step sharpness* ``E_B[step_sharpness_B]`` is the SAM analogue of batch sharpness,
compared with ``2/eta`` for every method (it equals batch sharpness for GD).  Along an eigenvector
(``g_B = c u``, ``H_B u = lambda u``) and on a quadratic ``d_B = (1 + rho lambda/||g_B||) g_B`` for
SAM, and the condition reads ``lambda (1 + rho lambda / ||g_B||) < 2/eta``, i.e. ``lambda`` below
the SAM-edge ``(||g|| / 2 rho)(sqrt(1 + 8 rho / (eta ||g||)) - 1)``: the step sharpness at ``2/eta``
is the batch version of the SAM-edge.  Where ``g_B^T d_B <= 0`` (SAM's perturbed gradient turns
against the batch's own, as at a Transformer's initialization) the step raises the batch's loss to
first order at every ``eta``: that batch's step sharpness is ``inf`` (and so is the mean).  Beyond
quadratics the change in loss is exact to second order only.

Cost per batch: one gradient and one HVP (with the gradient's graph); a perturbing method adds
one gradient (at the perturbed point) and one HVP (on the kept graph).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from samedge.core.method import Method
from samedge.core.objective import Objective
from samedge.core.params import flatten

__all__ = ["BatchSharpness", "batch_sharpness"]


@dataclass(frozen=True)
class BatchSharpness:
    """Mean over batches (and standard error of the mean) of ``g^T H g / ||g||^2`` (``value``) and of
    ``d^T H d / g^T d`` (``step_value``, the method's own step ``d``); ``edge`` is the mean of the
    method's edge at each batch's ``||g_B||`` (``2/eta`` for GD)."""

    value: float
    stderr: float
    step_value: float
    step_stderr: float
    edge: float
    batches: int
    hvps: int
    gradients: int
    per_batch: tuple[float, ...]
    per_batch_step: tuple[float, ...]


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.double(), b.double()))


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def batch_sharpness(
    objectives: Iterable[Objective], params: Sequence[Tensor], method: Method | None = None
) -> BatchSharpness:
    """Batch sharpness and batch step sharpness of ``method`` (default GD at ``eta = 1``: only
    ``value`` is meaningful then) over ``objectives`` (one per minibatch) at ``params``."""
    params = tuple(params)
    q: list[float] = []
    qs: list[float] = []
    edges: list[float] = []
    hvps = gradients = 0
    for objective in objectives:
        ev = objective.loss_and_grad(params)
        assert ev.grad is not None
        gradients += 1
        g = ev.grad
        try:
            hg = objective.hvp(params, g)
            hvps += 1
            gf, hgf = flatten(g), flatten(hg)
            gg = _dot(gf, gf)
            q.append(_dot(gf, hgf) / gg if gg > 0 else math.nan)
            if method is not None and method.perturbs:
                d = method.direction(objective.grad, params, g)
                gradients += 1
                hd = objective.hvp(params, d)
                hvps += 1
                df = flatten(d)
                gd = _dot(gf, df)
                # g^T d <= 0: the step does not descend the batch's loss; no step size makes it lower it
                qs.append(_dot(df, flatten(hd)) / gd if gd > 0 else math.inf)
            else:
                qs.append(q[-1])
        finally:
            objective.release_hvp_graph()
        if method is not None:
            edges.append(method.edge(math.sqrt(gg)))
    value, stderr = _mean_stderr(q)
    step_value, step_stderr = _mean_stderr(qs)
    return BatchSharpness(
        value,
        stderr,
        step_value,
        step_stderr,
        float(np.mean(edges)) if edges else math.nan,
        len(q),
        hvps,
        gradients,
        tuple(q),
        tuple(qs),
    )
