"""Per-chunk losses, and how a loss is split into chunks that add up to the full-batch loss.

Targets are integer class labels of shape ``outputs.shape[:-1]`` (one label per example for
classifiers, one per position for language models).

``squared_error`` is the loss of Long & Bartlett's code: ``(outputs - onehot(labels))**2``
averaged over examples *and* outputs (no factor 1/2), so its Hessian, and hence the sharpness,
is on that scale.

Chunks.  A full-batch loss computed in chunks must use the loss's own global normaliser.  A loss
is split as follows (:func:`summed_loss`):

* a :class:`SummedLoss`: as the user defines it, ``(chunk sum, chunk count)``;
* a ``torch.nn`` loss module (``nn.CrossEntropyLoss(weight=..., ignore_index=...,
  label_smoothing=...)``, ``nn.MSELoss()``, ...): the sum of its ``reduction="none"`` values
  over the chunk, divided at the end by the global normaliser that its ``reduction="mean"`` uses
  (the summed class weights of the non-ignored targets for cross-entropy and NLL, the batch size
  for ``KLDivLoss(reduction="batchmean")``, the number of loss elements otherwise), or by 1 for
  ``reduction="sum"``;
* any other callable: taken to be a *mean over the elements of the targets* (as
  ``squared_error``, ``cross_entropy`` and unweighted torch losses are); chunks are weighted by
  their number of target elements.  A loss that is not such a mean (class weights, ignored
  targets) must be passed as a torch.nn module or a :class:`SummedLoss`, or used in one chunk.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Any, Tensor], Tensor]

__all__ = [
    "LossFn",
    "squared_error",
    "cross_entropy",
    "LOSSES",
    "get_loss",
    "count_correct",
    "SummedLoss",
    "summed_loss",
]


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


def count_correct(outputs: Any, labels: Tensor) -> int | None:
    """Number of correct argmax predictions, or None when the targets are not class labels or
    the outputs are not one tensor (a tuple or dict is the user's loss's business)."""
    if not isinstance(outputs, Tensor) or labels.is_floating_point() or labels.shape != outputs.shape[:-1]:
        return None
    return int((outputs.argmax(dim=-1) == labels).sum())


class SummedLoss:
    """A loss that can be split into chunks: ``fn(outputs, targets) -> (total, count)`` gives a
    chunk's summed loss and its share of the global normaliser; the full-batch loss is
    ``sum(total) / sum(count)`` over the chunks (``normalized=False``: ``sum(total)``).

    Example, a class-weighted cross-entropy written by hand::

        SummedLoss(lambda out, y: (F.cross_entropy(out, y, weight=w, reduction="sum"), w[y].sum()))

    Called directly it returns the loss of one batch, ``total / count``.
    """

    def __init__(self, fn: Callable[[Any, Tensor], tuple[Tensor, Tensor | float]], normalized: bool = True):
        if not callable(fn):
            raise ValueError(f"SummedLoss needs a callable (outputs, targets) -> (total, count), got {fn!r}")
        self.fn = fn
        self.normalized = normalized

    def split(self, outputs: Any, targets: Tensor) -> tuple[Tensor, float]:
        total, count = self.fn(outputs, targets)
        if not isinstance(total, Tensor) or total.numel() != 1:
            raise ValueError("a SummedLoss must return (total, count) with total a scalar tensor")
        return total.reshape(()), float(count)

    def __call__(self, outputs: Any, targets: Tensor) -> Tensor:
        total, count = self.split(outputs, targets)
        return total / count if self.normalized else total


def _class_index_count(module: nn.Module, targets: Tensor) -> Tensor:
    """The normaliser of ``reduction="mean"`` for cross-entropy / NLL with class-index targets:
    the summed class weights of the targets that are not ``ignore_index``."""
    kept = targets[targets != module.ignore_index]
    weight = getattr(module, "weight", None)
    return kept.new_tensor(kept.numel()) if weight is None else weight[kept].sum()


def _torch_loss(module: nn.modules.loss._Loss) -> SummedLoss:
    reduction = module.reduction
    name = type(module).__name__
    if reduction == "none":
        raise ValueError(f"loss_fn {name}(reduction='none') returns one value per element; a scalar loss is needed")
    if isinstance(module, nn.CTCLoss) and reduction == "mean":
        raise ValueError(
            "CTCLoss(reduction='mean') divides each loss by its target length before averaging and cannot "
            "be split into chunks; use chunk_size=None or a SummedLoss"
        )
    per_element = copy.copy(module)  # shares weights and buffers; only the reduction differs
    per_element.reduction = "none"

    def split(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | float]:
        values = per_element(outputs, targets)
        total = values.sum()
        if reduction == "sum":
            return total, 1.0
        if isinstance(module, (nn.CrossEntropyLoss, nn.NLLLoss)) and not targets.is_floating_point():
            return total, _class_index_count(module, targets)
        if isinstance(module, nn.KLDivLoss) and reduction == "batchmean":
            return total, outputs.shape[0]
        return total, values.numel()

    return SummedLoss(split, normalized=reduction != "sum")


def summed_loss(loss_fn: Callable) -> SummedLoss | None:
    """``loss_fn`` as a :class:`SummedLoss` for chunked sums, or None for a plain callable (a mean
    over the target elements; see the module docstring)."""
    if isinstance(loss_fn, SummedLoss):
        return loss_fn
    if isinstance(loss_fn, nn.modules.loss._Loss):
        return _torch_loss(loss_fn)
    return None
