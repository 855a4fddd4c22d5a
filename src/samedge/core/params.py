"""Parameters as tuples of tensors, and the few vector operations the core needs on them.

The functional core passes parameters as a ``tuple[Tensor, ...]`` in the order of
``model.named_parameters()``; the eigen-solvers work on one flat vector.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

Params = tuple[Tensor, ...]

__all__ = ["Params", "flatten", "unflatten", "dot", "norm", "add_scaled", "detach_params"]


def detach_params(params: Iterable[Tensor]) -> Params:
    """A detached copy of ``params`` (the model's tensors are never aliased by the core)."""
    return tuple(p.detach().clone() for p in params)


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> Params:
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[offset : offset + n].view_as(t))
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, parameters have {offset}")
    return tuple(out)


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def norm(a: Sequence[Tensor]) -> float:
    return dot(a, a) ** 0.5


def add_scaled(a: Sequence[Tensor], b: Sequence[Tensor], scale: float) -> Params:
    """``a + scale * b``, elementwise over the tuple (``torch.add(..., alpha=)``: the same rounding
    as ``Tensor.add_(b, alpha=scale)`` in optimizers)."""
    return tuple(torch.add(x, y, alpha=scale) for x, y in zip(a, b))
