"""Per-chunk losses: mean over the chunk, with the count that weights the chunk in a full-batch sum.

Targets are integer class labels of shape ``outputs.shape[:-1]`` (one label per example for
classifiers, one per position for language models).

``squared_error`` is the loss of Long & Bartlett's code: ``(outputs - onehot(labels))**2``
averaged over examples *and* outputs (no factor 1/2), so its Hessian, and hence the sharpness,
is on that scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["LossFn", "squared_error", "cross_entropy", "LOSSES", "get_loss", "count_correct"]


def squared_error(outputs: Tensor, labels: Tensor) -> Tensor:
    onehot = F.one_hot(labels, num_classes=outputs.shape[-1]).to(outputs.dtype)
    return ((outputs - onehot) ** 2).mean()


def cross_entropy(outputs: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), labels.reshape(-1))


LOSSES: dict[str, LossFn] = {"mse": squared_error, "xent": cross_entropy}


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None


def count_correct(outputs: Tensor, labels: Tensor) -> int | None:
    """Number of correct argmax predictions, or None when the targets are not class labels."""
    if labels.is_floating_point() or labels.shape != outputs.shape[:-1]:
        return None
    return int((outputs.argmax(dim=-1) == labels).sum())
