"""The training objective as pure functions of the parameters: loss, gradient and exact HVP.

An :class:`Objective` is a model (used only as a function through ``torch.func.functional_call``),
a loss and a data set split into chunks.  Every quantity is the size-weighted sum over chunks,

    L(w) = sum_c (n_c / N) L_c(w),

so the result is the full-batch value while peak memory is set by one chunk.  A minibatch is
simply an objective with one chunk.  A loss that is not a mean over its targets (class weights,
``ignore_index``; any ``torch.nn`` loss module) is summed over chunks and divided by its own
global normaliser instead (:mod:`samedge.core.losses`).

What is differentiated: exactly the model's parameters with ``requires_grad=True`` (frozen ones
enter the function at their current values); a parameter the loss does not use has a zero
gradient and zero Hessian rows (:attr:`Objective.unused` names them after a gradient).

A defined function for stateful and random layers: the model is only ever called through
``functional_call`` with copies of its buffers, so BatchNorm's running statistics are never
updated; every chunk is evaluated under the random seed ``hash((seed, chunk))`` with the global
random state saved and restored, so dropout draws the same masks in every loss, gradient and HVP
of the objective and the caller's random stream is untouched.  ``mode="eval"`` or ``"train"``
sets the modules' training flags during each evaluation (restored afterwards); the default uses
them as they are.  BatchNorm in train mode normalises by the statistics of each chunk: with
several chunks that is not the full-batch function, and a warning says so.

Hessian-vector products are exact (no finite differences), by one of two routes:

* ``"double-backward"`` (default): backward through the autograd graph of the chunk's gradient.
  Works for every module that supports ``create_graph=True``; measured the fastest on CPU
  (benchmarks/RESULTS.md).
* ``"forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad``.

Graph reuse (double-backward): within one eigen-solve the weights do not change, so the first HVP
at given parameters builds each chunk's gradient graph (forward, then backward with
``create_graph=True``) and keeps it; every further HVP at the *same* parameter tensors (same
objects, unmodified: their version counters are checked) is one backward pass through the kept
graph.  Measured on the MNIST default's MLP: 1.5 gradients per HVP instead of 2.7
(benchmarks/RESULTS.md).  The graph holds the chunk's saved activations and first-backward
intermediates; the bytes are counted while it is built (``saved_tensors_hooks``) and shown in
:attr:`Objective.hvp_graph_bytes`.  Chunks are kept in order while the running total stays within
``hvp_graph_budget`` bytes (default 1 GiB; 0 turns reuse off); a chunk past the budget is rebuilt
at every product, as before, so a chunked objective holds at most the budget (plus one chunk
being rebuilt).  :meth:`Objective.release_hvp_graph` frees the graphs (the eigen-solver calls it
at the end of each reading, so training never holds them); new parameters free them too.

Reverse-over-forward (reverse mode of a forward-mode directional derivative) needs fewer FLOPs
on paper (it skips the primal weight gradients: ~2.1 gradients per HVP for an MLP against ~2.5),
but it was not faster in PyTorch 2.13, and there it fails through ``F.cross_entropy`` and gives
silently wrong products through ``F.layer_norm``; so it is not offered.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from samedge.core.losses import LossFn, SummedLoss, count_correct, summed_loss
from samedge.core.operator import LinearOperator
from samedge.core.params import Params, flatten, unflatten

__all__ = ["Objective", "Evaluation", "HVP_MODES", "MODES", "frozen_rng"]

HVP_MODES = ("double-backward", "forward-over-reverse")
#: training flags during an evaluation: None keeps the modules' own
MODES = (None, "train", "eval")


@dataclass(frozen=True)
class Evaluation:
    """Loss, accuracy (fraction of correct argmax predictions; NaN when the targets are not class
    labels) and, if asked for, gradient."""

    loss: float
    accuracy: float
    grad: Params | None = None


@contextmanager
def frozen_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the global CPU (and ``device``'s CUDA) generator seeded by ``seed``, and
    restore the caller's random state afterwards."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@contextmanager
def _training_flags(model: nn.Module, mode: str | None) -> Iterator[None]:
    if mode is None:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _chunk_seed(seed: int, index: int) -> int:
    return hash((seed, index)) & (2**63 - 1)


class Objective:
    """Full-batch (chunked) loss of ``model`` on ``chunks`` as a function of a parameter tuple.

    ``parameter_names`` (default: every parameter with ``requires_grad=True``, in the order of
    ``model.named_parameters()``) are the coordinates; ``seed`` fixes the random numbers of
    layers such as dropout (change it to draw new ones); ``mode`` is None, ``"train"`` or
    ``"eval"`` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        chunks: Sequence[tuple[Any, Tensor]],
        hvp_mode: str = "double-backward",
        *,
        parameter_names: Sequence[str] | None = None,
        mode: str | None = None,
        seed: int = 0,
        hvp_graph_budget: int = 1 << 30,
    ):
        if not chunks:
            raise ValueError("an objective needs at least one chunk of data")
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"unknown hvp_mode {hvp_mode!r}; choose one of {', '.join(HVP_MODES)}")
        if mode not in MODES:
            raise ValueError(f"mode must be None, 'train' or 'eval', got {mode!r}")
        named = dict(model.named_parameters())
        if parameter_names is None:
            parameter_names = [name for name, p in named.items() if p.requires_grad]
            if not parameter_names:
                raise ValueError("the model has no trainable parameters (every one has requires_grad=False)")
        unknown = [name for name in parameter_names if name not in named]
        if unknown:
            raise ValueError(f"parameter_names {unknown} are not parameters of the model")
        if not parameter_names:
            raise ValueError("parameter_names is empty")
        self.model = model
        self.loss_fn = loss_fn
        self.chunks = list(chunks)
        self.names = tuple(parameter_names)
        self._named = named
        self._has_buffers = any(True for _ in model.buffers())
        self.mode = mode
        self.seed = seed
        # several chunks: a loss with its own normaliser is summed (None: a mean over targets)
        self.summed: SummedLoss | None = summed_loss(loss_fn) if len(self.chunks) > 1 else None
        counts = [int(y.numel()) for _, y in self.chunks]
        total = sum(counts)
        self.weights = [n / total for n in counts]
        self.num_targets = total
        self.hvp_mode = hvp_mode
        if hvp_graph_budget < 0:
            raise ValueError(f"hvp_graph_budget must be >= 0 bytes, got {hvp_graph_budget}")
        self.hvp_graph_budget = int(hvp_graph_budget)
        # graph reuse: the parameter tensors (and their versions) the kept graphs belong to, and
        # per kept chunk (leaves, gradient outputs with their indices, count)
        self._graph_key: tuple[tuple[Tensor, int], ...] | None = None
        self._graphs: dict[int, tuple[list[Tensor], list[int], tuple[Tensor, ...], float]] = {}
        #: bytes held by the kept gradient graphs (saved tensors, counted once per storage)
        self.hvp_graph_bytes = 0
        #: parameters whose gradient was None in every chunk of the last gradient
        self.unused: tuple[str, ...] = ()
        if len(self.chunks) > 1 and self._batchnorm_in_train_mode():
            warnings.warn(
                f"BatchNorm in train mode normalises each of the {len(self.chunks)} chunks by its own batch "
                "statistics: the measured loss is the combination of the chunks' losses, not the full-batch "
                "loss; use one chunk or mode='eval' for a function of the whole batch",
                stacklevel=3,
            )

    def _batchnorm_in_train_mode(self) -> bool:
        return any(
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (self.mode == "train" or (self.mode is None and m.training))
            for m in self.model.modules()
        )

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

    def restricted(self, parameter_names: Sequence[str]) -> Objective:
        """The same objective over fewer coordinates (the others at the model's values)."""
        return Objective(
            self.model,
            self.loss_fn,
            self.chunks,
            self.hvp_mode,
            parameter_names=parameter_names,
            mode=self.mode,
            seed=self.seed,
            hvp_graph_budget=self.hvp_graph_budget,
        )

    def parameters(self) -> Params:
        """The model's current (differentiated) parameters, detached (the starting point of a run)."""
        return tuple(self._named[name].detach().clone() for name in self.names)

    def outputs(self, params: Sequence[Tensor], x: Any) -> Any:
        tensors = dict(zip(self.names, params))
        if self._has_buffers:  # copies: BatchNorm's running statistics in the model stay as they are
            tensors.update((name, b.clone()) for name, b in self.model.named_buffers())
        return functional_call(self.model, tensors, (x,))

    @contextmanager
    def _context(self, index: int, x: Any) -> Iterator[None]:
        """Chunk ``index`` is evaluated with the objective's training flags and random seed."""
        device = x.device if isinstance(x, Tensor) else self._named[self.names[0]].device
        with _training_flags(self.model, self.mode), frozen_rng(_chunk_seed(self.seed, index), device):
            yield

    def _chunk_value(self, out: Any, y: Tensor) -> tuple[Tensor, float]:
        """The chunk's term: its summed loss and count (summed loss), or its mean loss and weight."""
        if self.summed is not None:
            return self.summed.split(out, y)
        value = self.loss_fn(out, y)
        if not isinstance(value, Tensor) or value.numel() != 1:
            what = type(value).__name__ if not isinstance(value, Tensor) else f"a tensor of shape {tuple(value.shape)}"
            raise TypeError(f"the loss function must return a scalar tensor computed from the outputs, got {what}")
        return value, 1.0

    def _finish(self, count: float) -> float:
        """What the accumulated terms are divided by: the global normaliser of a summed loss."""
        if self.summed is None or not self.summed.normalized:
            return 1.0
        return count

    def _weight(self, index: int) -> float:
        return 1.0 if self.summed is not None else self.weights[index]

    def _accuracy(self, correct: int | None) -> float:
        return math.nan if correct is None else correct / self.num_targets

    def evaluate(self, params: Sequence[Tensor]) -> Evaluation:
        """Loss and accuracy, no gradient."""
        loss, count = 0.0, 0.0
        correct: int | None = 0
        with torch.no_grad():
            for i, (x, y) in enumerate(self.chunks):
                with self._context(i, x):
                    out = self.outputs(params, x)
                    value, n = self._chunk_value(out, y)
                chunk_correct = count_correct(out, y)
                loss += self._weight(i) * float(value)
                count += n
                correct = None if chunk_correct is None or correct is None else correct + chunk_correct
        return Evaluation(loss / self._finish(count), self._accuracy(correct))

    def loss_and_grad(self, params: Sequence[Tensor]) -> Evaluation:
        """Loss, accuracy and gradient ``(dL/dw)`` at ``params``."""
        grad = [torch.zeros_like(p) for p in params]
        used = [False] * len(grad)
        loss, count = 0.0, 0.0
        correct: int | None = 0
        for i, (x, y) in enumerate(self.chunks):
            leaves = [p.detach().requires_grad_(True) for p in params]
            with self._context(i, x):
                out = self.outputs(leaves, x)
                value, n = self._chunk_value(out, y)
                chunk_grad = torch.autograd.grad(value, leaves, allow_unused=True)
            w = self._weight(i)
            for j, (acc, g) in enumerate(zip(grad, chunk_grad)):
                if g is not None:
                    acc.add_(g, alpha=w)
                    used[j] = True
            chunk_correct = count_correct(out, y)
            loss += w * float(value.detach())
            count += n
            correct = None if chunk_correct is None or correct is None else correct + chunk_correct
        self.unused = tuple(name for name, u in zip(self.names, used) if not u)
        scale = self._finish(count)
        if scale != 1.0:
            for acc in grad:
                acc.div_(scale)
        return Evaluation(loss / scale, self._accuracy(correct), tuple(grad))

    def grad(self, params: Sequence[Tensor]) -> Params:
        grad = self.loss_and_grad(params).grad
        assert grad is not None  # loss_and_grad always sets it
        return grad

    def hvp(self, params: Sequence[Tensor], vector: Sequence[Tensor]) -> Params:
        """Exact Hessian-vector product ``H(params) @ vector``.

        With ``hvp_mode="double-backward"``, repeated products at the same parameter tensors
        reuse the gradient graphs kept by the first one (see the module docstring)."""
        reuse = self.hvp_mode == "double-backward" and self.hvp_graph_budget > 0
        if reuse:
            self._check_graph_key(params)
        out = [torch.zeros_like(p) for p in params]
        count = 0.0
        for i, (x, y) in enumerate(self.chunks):
            if reuse:
                chunk_hv, n = self._hvp_reused(i, params, vector, x, y)
            else:
                with self._context(i, x):
                    chunk_hv, n = self._hvp_routes[self.hvp_mode](self, params, vector, x, y)
            w = self._weight(i)
            for acc, h in zip(out, chunk_hv):
                if h is not None:
                    acc.add_(h, alpha=w)
            count += n
        scale = self._finish(count)
        if scale != 1.0:
            for acc in out:
                acc.div_(scale)
        return tuple(out)

    def hvp_operator(self, params: Sequence[Tensor]) -> LinearOperator:
        """``v -> H(params) v`` on flat vectors (of the parameters' total size, dtype and device),
        for an eigen-solver: every product after the first reuses the kept gradient graphs.  Call
        :meth:`release_hvp_graph` when done."""
        like = tuple(params)

        def matvec(v: Tensor) -> Tensor:
            return flatten(self.hvp(like, unflatten(v, like)))

        return LinearOperator(matvec, sum(p.numel() for p in like), dtype=like[0].dtype, device=like[0].device)

    def release_hvp_graph(self) -> None:
        """Free the gradient graphs kept for repeated HVPs."""
        self._graph_key = None
        self._graphs = {}
        self.hvp_graph_bytes = 0

    def _check_graph_key(self, params: Sequence[Tensor]) -> None:
        key = self._graph_key
        if (
            key is None
            or len(key) != len(params)
            or any(p is not q or p._version != version for (q, version), p in zip(key, params))
        ):
            self.release_hvp_graph()
            self._graph_key = tuple((p, p._version) for p in params)

    def _hvp_reused(self, index: int, params, vector, x, y):
        kept = self._graphs.get(index)
        if kept is None:
            storages: dict[int, int] = {}

            def pack(t: Tensor) -> Tensor:
                try:
                    storage = t.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
                except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
                    pass
                # Kept detached: a saved output held as itself (with its grad_fn, which holds the
                # saved tensor) is a reference cycle through C++ that Python's collector cannot
                # see, and every graph built here leaked (~0.4 GB per CIFAR-10 run in one process).
                # Unpacking restores the autograd metadata, so double backward is unchanged.
                return t.detach()

            leaves = [p.detach().requires_grad_(True) for p in params]
            with self._context(index, x), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                value, n = self._chunk_value(self.outputs(leaves, x), y)
                g = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
            used = [j for j, gj in enumerate(g) if gj is not None and gj.requires_grad]
            kept = (leaves, used, tuple(g[j] for j in used), n)
            held = sum(storages.values())
            if self.hvp_graph_bytes + held <= self.hvp_graph_budget:
                self._graphs[index] = kept
                self.hvp_graph_bytes += held
        leaves, used, outs, n = kept
        if not used:
            return [None] * len(leaves), n
        # the backward pass of a product draws no random numbers (dropout's masks are saved)
        hv = torch.autograd.grad(
            outs, leaves, grad_outputs=[vector[j] for j in used], retain_graph=True, allow_unused=True
        )
        return hv, n

    def finite_difference_hvp(self, params: Sequence[Tensor], vector: Sequence[Tensor], eps: float = 1e-3) -> Params:
        """Central difference ``(grad(w + eps v) - grad(w - eps v)) / (2 eps)``: the HVP of Long &
        Bartlett's code (two gradients, error O(eps^2)); kept as a baseline for benchmarks."""
        plus = self.grad(tuple(p + eps * v for p, v in zip(params, vector)))
        minus = self.grad(tuple(p - eps * v for p, v in zip(params, vector)))
        return tuple((a - b) / (2 * eps) for a, b in zip(plus, minus))

    def _hvp_double_backward(self, params, vector, x, y):
        leaves = [p.detach().requires_grad_(True) for p in params]
        value, n = self._chunk_value(self.outputs(leaves, x), y)
        g = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
        # unused parameters, or ones the gradient does not depend on: their products are zero
        pairs = [(gi, vi) for gi, vi in zip(g, vector) if gi is not None and gi.requires_grad]
        if not pairs:
            return [None] * len(leaves), n
        outs, vs = zip(*pairs)
        return torch.autograd.grad(outs, leaves, grad_outputs=vs, allow_unused=True), n

    def _hvp_forward_over_reverse(self, params, vector, x, y):
        counts: list[float] = []

        def loss_of(p):
            value, n = self._chunk_value(self.outputs(p, x), y)
            counts.append(n)
            return value

        hv = torch.func.jvp(torch.func.grad(loss_of), (tuple(params),), (tuple(vector),))[1]
        return hv, counts[-1]

    _hvp_routes = {
        "double-backward": _hvp_double_backward,
        "forward-over-reverse": _hvp_forward_over_reverse,
    }
