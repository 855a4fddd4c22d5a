"""The full-batch objective sharded over the processes of a ``torch.distributed`` group.

DistributedDataParallel cannot serve here: it has no double backward, and HVPs need one.  So
each process holds an :class:`~samedge.core.objective.Objective` over its own slice of the
training set (slices may be unequal), and :class:`ShardedObjective` turns its values into
full-batch ones:

    L(w) = sum_r (n_r / N) L_r(w),      N = sum_r n_r  (one all-reduce of the counts, once),

where ``L_r`` is rank ``r``'s local objective (itself a weighted sum over its chunks) and ``n_r``
its number of targets.  Each gradient and each HVP is scaled by ``n_r / N``, flattened and summed
with **one** all-reduce, so every rank gets the same full-batch vector; loss and accuracy are
reduced the same way in float64.  Everything else (Lanczos, the optimizer step) runs replicated
on every rank from the same seeds, so every rank holds the same parameters and takes the same
decisions.

The wrapper uses only the local objective's public interface (``evaluate``, ``loss_and_grad``,
``hvp``, ``parameters`` and its target count), so it does not depend on how the local sum is
formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from samedge.core.objective import Evaluation, Objective
from samedge.core.params import Params, flatten, unflatten

__all__ = ["ShardedObjective", "shard_bounds", "all_reduce_bytes"]


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous slice of ``n`` items over ``world_size``
    ranks; the first ``n % world_size`` slices have one item more (``numpy.array_split``'s rule)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce_bytes(params: Sequence[Tensor]) -> int:
    """Bytes each rank contributes to the all-reduce of one gradient or HVP (the flattened
    vector; a ring all-reduce sends and receives about twice this per rank)."""
    return sum(p.numel() * p.element_size() for p in params)


def _count_targets(objective: Any) -> int:
    count = getattr(objective, "num_targets", None)
    if count is None:  # an objective that does not say: its chunks' targets
        count = sum(int(y.numel()) for _, y in objective.chunks)
    return int(count)


class ShardedObjective(Objective):
    """Full-batch loss, gradient and exact HVP over all ranks of ``group`` (default: the default
    process group), from ``local``, this rank's objective over its own shard.

    Collective: every rank must call the same methods in the same order (as a replicated
    optimizer loop does).  ``local_count`` is this shard's weight in the global sum (default: its
    number of targets).

    It is an :class:`Objective` wherever one is expected (the runner, the eigen-solvers,
    :func:`~samedge.core.measurements.measure`): it overrides every method that sums over data
    and hands any other attribute (``model``, ``loss_fn``, ``names``, ...) to ``local``; it never
    runs ``Objective.__init__``, so it does not depend on how the local objective is built.
    """

    def __init__(self, local: Objective, group: Any = None, local_count: int | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("ShardedObjective needs an initialized torch.distributed process group")
        self.local = local
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        count = _count_targets(local) if local_count is None else int(local_count)
        if count < 0:
            raise ValueError(f"local_count must be >= 0, got {count}")
        self._device = local.parameters()[0].device
        counts = torch.zeros(self.world_size, dtype=torch.float64, device=self._device)
        counts[self.rank] = count
        self._all_reduce(counts)
        self.counts = tuple(int(c) for c in counts.tolist())
        self.num_targets = sum(self.counts)
        if self.num_targets == 0:
            raise ValueError("the shards of a ShardedObjective hold no targets at all")
        self.weight = count / self.num_targets  # this shard's share of the full-batch sum
        self.reductions = 0  # all-reduces made, for benchmarks
        self.reduced_bytes = 0

    def __getattr__(self, name: str) -> Any:  # only for attributes not set here: the local objective's
        if name == "local":  # not yet set (during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.local, name)

    def parameters(self) -> Params:
        return self.local.parameters()

    def _all_reduce(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def _reduce_vector(self, parts: Sequence[Tensor]) -> Params:
        flat = flatten(parts).mul(self.weight)
        self.reductions += 1
        self.reduced_bytes += flat.numel() * flat.element_size()
        return unflatten(self._all_reduce(flat), parts)

    def _reduce_scalars(self, ev: Evaluation) -> tuple[float, float]:
        # float64 on every backend; accuracy is a fraction of this shard's targets, so it is
        # weighted like the loss (NaN, for targets that are not labels, stays NaN)
        both = torch.tensor([ev.loss * self.weight, ev.accuracy * self.weight], dtype=torch.float64)
        loss, accuracy = self._all_reduce(both.to(self._device)).tolist()
        return loss, accuracy

    def evaluate(self, params: Sequence[Tensor]) -> Evaluation:
        loss, accuracy = self._reduce_scalars(self.local.evaluate(params))
        return Evaluation(loss, accuracy)

    def loss_and_grad(self, params: Sequence[Tensor]) -> Evaluation:
        ev = self.local.loss_and_grad(params)
        assert ev.grad is not None
        grad = self._reduce_vector(ev.grad)
        loss, accuracy = self._reduce_scalars(ev)
        return Evaluation(loss, accuracy, grad)

    def grad(self, params: Sequence[Tensor]) -> Params:
        grad = self.local.grad(params)
        return self._reduce_vector(grad)

    def hvp(self, params: Sequence[Tensor], vector: Sequence[Tensor]) -> Params:
        # the local objective keeps its gradient graph between products at the same parameters;
        # hvp_operator (inherited) goes through this method, so each product is one all-reduce
        return self._reduce_vector(self.local.hvp(params, vector))

    def release_hvp_graph(self) -> None:
        self.local.release_hvp_graph()

    def finite_difference_hvp(self, params: Sequence[Tensor], vector: Sequence[Tensor], eps: float = 1e-3) -> Params:
        plus = self.grad(tuple(p + eps * v for p, v in zip(params, vector)))
        minus = self.grad(tuple(p - eps * v for p, v in zip(params, vector)))
        return tuple((a - b) / (2 * eps) for a, b in zip(plus, minus))

    def __repr__(self) -> str:
        return f"ShardedObjective(rank {self.rank} of {self.world_size}, {self.counts} targets)"
