"""The training objective as pure functions of the parameters: loss, gradient and exact HVP.

An :class:`Objective` is a model (used only as a function through ``torch.func.functional_call``),
a loss and a data set split into chunks.  Every quantity is the size-weighted sum over chunks,

    L(w) = sum_c (n_c / N) L_c(w),

so the result is the full-batch value while peak memory is set by one chunk.  A minibatch is
simply an objective with one chunk.

Hessian-vector products are exact (no finite differences), by one of two routes:

* ``"double-backward"`` (default): backward through the autograd graph of the chunk's gradient.
  Works for every module that supports ``create_graph=True``; measured the fastest on CPU
  (benchmarks/RESULTS.md).
* ``"forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad``.

Reverse-over-forward (reverse mode of a forward-mode directional derivative) needs fewer FLOPs
on paper (it skips the primal weight gradients: ~2.1 gradients per HVP for an MLP against ~2.5),
but it was not faster in PyTorch 2.13, and there it fails through ``F.cross_entropy`` and gives
silently wrong products through ``F.layer_norm``; so it is not offered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from samedge.core.losses import LossFn, count_correct
from samedge.core.params import Params

__all__ = ["Objective", "Evaluation", "HVP_MODES"]

HVP_MODES = ("double-backward", "forward-over-reverse")


@dataclass(frozen=True)
class Evaluation:
    """Loss, accuracy (fraction of correct argmax predictions; NaN when the targets are not class
    labels) and, if asked for, gradient."""

    loss: float
    accuracy: float
    grad: Params | None = None


class Objective:
    """Full-batch (chunked) loss of ``model`` on ``chunks`` as a function of a parameter tuple."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        chunks: Sequence[tuple[Tensor, Tensor]],
        hvp_mode: str = "double-backward",
    ):
        if not chunks:
            raise ValueError("an objective needs at least one chunk of data")
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"unknown hvp_mode {hvp_mode!r}; choose one of {', '.join(HVP_MODES)}")
        self.model = model
        self.loss_fn = loss_fn
        self.chunks = list(chunks)
        self.names = tuple(name for name, _ in model.named_parameters())
        counts = [int(y.numel()) for _, y in self.chunks]
        total = sum(counts)
        self.weights = [n / total for n in counts]
        self.num_targets = total
        self.hvp_mode = hvp_mode

    @classmethod
    def from_tensors(
        cls, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, chunk_size: int | None = None, **kw
    ) -> Objective:
        """Split ``(x, y)`` along the first axis into chunks of at most ``chunk_size`` examples."""
        if chunk_size is None or chunk_size >= len(x):
            return cls(model, loss_fn, [(x, y)], **kw)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return cls(model, loss_fn, list(zip(x.split(chunk_size), y.split(chunk_size))), **kw)

    def parameters(self) -> Params:
        """The model's current parameters, detached (the starting point of a run)."""
        return tuple(p.detach().clone() for p in self.model.parameters())

    def outputs(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, dict(zip(self.names, params)), (x,))

    def _chunk_loss(self, params: Sequence[Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, int | None]:
        out = self.outputs(params, x)
        return self.loss_fn(out, y), count_correct(out, y)

    def _accuracy(self, correct: int | None) -> float:
        return math.nan if correct is None else correct / self.num_targets

    def evaluate(self, params: Sequence[Tensor]) -> Evaluation:
        """Loss and accuracy, no gradient."""
        loss = 0.0
        correct: int | None = 0
        with torch.no_grad():
            for (x, y), w in zip(self.chunks, self.weights):
                chunk_loss, chunk_correct = self._chunk_loss(params, x, y)
                loss += w * float(chunk_loss)
                correct = None if chunk_correct is None or correct is None else correct + chunk_correct
        return Evaluation(loss, self._accuracy(correct))

    def loss_and_grad(self, params: Sequence[Tensor]) -> Evaluation:
        """Loss, accuracy and gradient ``(dL/dw)`` at ``params``."""
        grad = [torch.zeros_like(p) for p in params]
        loss = 0.0
        correct: int | None = 0
        for (x, y), w in zip(self.chunks, self.weights):
            leaves = [p.detach().requires_grad_(True) for p in params]
            chunk_loss, chunk_correct = self._chunk_loss(leaves, x, y)
            chunk_grad = torch.autograd.grad(chunk_loss, leaves)
            for acc, g in zip(grad, chunk_grad):
                acc.add_(g, alpha=w)
            loss += w * float(chunk_loss.detach())
            correct = None if chunk_correct is None or correct is None else correct + chunk_correct
        return Evaluation(loss, self._accuracy(correct), tuple(grad))

    def grad(self, params: Sequence[Tensor]) -> Params:
        grad = self.loss_and_grad(params).grad
        assert grad is not None  # loss_and_grad always sets it
        return grad

    def hvp(self, params: Sequence[Tensor], vector: Sequence[Tensor]) -> Params:
        """Exact Hessian-vector product ``H(params) @ vector``."""
        out = [torch.zeros_like(p) for p in params]
        for (x, y), w in zip(self.chunks, self.weights):
            chunk_hv = self._hvp_routes[self.hvp_mode](self, params, vector, x, y)
            for acc, h in zip(out, chunk_hv):
                acc.add_(h, alpha=w)
        return tuple(out)

    def finite_difference_hvp(self, params: Sequence[Tensor], vector: Sequence[Tensor], eps: float = 1e-3) -> Params:
        """Central difference ``(grad(w + eps v) - grad(w - eps v)) / (2 eps)``: the HVP of Long &
        Bartlett's code (two gradients, error O(eps^2)); kept as a baseline for benchmarks."""
        plus = self.grad(tuple(p + eps * v for p, v in zip(params, vector)))
        minus = self.grad(tuple(p - eps * v for p, v in zip(params, vector)))
        return tuple((a - b) / (2 * eps) for a, b in zip(plus, minus))

    def _hvp_double_backward(self, params, vector, x, y):
        leaves = [p.detach().requires_grad_(True) for p in params]
        chunk_loss = self.loss_fn(self.outputs(leaves, x), y)
        g = torch.autograd.grad(chunk_loss, leaves, create_graph=True)
        return torch.autograd.grad(g, leaves, grad_outputs=tuple(vector))

    def _hvp_forward_over_reverse(self, params, vector, x, y):
        def loss_of(p):
            return self.loss_fn(self.outputs(p, x), y)

        return torch.func.jvp(torch.func.grad(loss_of), (tuple(params),), (tuple(vector),))[1]

    _hvp_routes = {
        "double-backward": _hvp_double_backward,
        "forward-over-reverse": _hvp_forward_over_reverse,
    }
