"""Minibatches as a pure function of (seed, step), for any task trained with ``batch_size``.

Because nothing but the step number decides a batch, a run resumed at step ``s`` sees exactly the
batches it would have seen, with no sampler state in the checkpoint.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import Tensor

__all__ = ["MinibatchSampler", "fixed_sample", "probe_batches"]


def fixed_sample(n: int, k: int, seed: int) -> Tensor:
    """``k`` distinct indices out of ``n`` (sorted), the same for every ``(n, k, seed)``: a fixed
    evaluation batch.  Drawn from a generator of its own, so it does not move the minibatch stream."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    idx = np.sort(np.random.default_rng([seed, 0x5EED]).choice(n, size=k, replace=False))
    return torch.from_numpy(idx.astype(np.int64))


def probe_batches(n: int, batch_size: int, count: int, seed: int, step: int) -> list[Tensor]:
    """``count`` minibatches of ``batch_size`` distinct indices out of ``n`` (each sorted) for a
    reading at ``step``: a pure function of ``(seed, step)`` from a generator of their own (the
    training stream does not move), so a resumed run draws the same batches."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    rng = np.random.default_rng([seed, 0xBA7C5, step])
    return [
        torch.from_numpy(np.sort(rng.choice(n, size=batch_size, replace=False)).astype(np.int64)) for _ in range(count)
    ]


class MinibatchSampler:
    """Seeded minibatches of ``batch_size`` out of ``n`` examples, as a pure function of the step.

    The stream of indices is the concatenation of epoch permutations, epoch ``e`` being
    ``np.random.default_rng([seed, e]).permutation(n)``, and step ``s`` takes the stream's entries
    ``s * batch_size .. (s + 1) * batch_size - 1``.  Batches therefore **wrap across epochs**
    (nothing is dropped; when ``batch_size`` does not divide ``n``, one batch per epoch boundary
    mixes the end of one permutation with the start of the next, so it may hold one example twice;
    every example is used equally often).  Step ``s`` lies in epoch ``s * batch_size // n`` (its
    first index).  Because a batch depends only on ``(seed, step)``, a run resumed at step ``s``
    repeats the original exactly.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        n, batch_size, seed = operator.index(n), operator.index(batch_size), operator.index(seed)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be in [1, {n}] (the number of examples), got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._cache: dict[int, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"MinibatchSampler(n={self.n}, batch_size={self.batch_size}, seed={self.seed})"

    @property
    def steps_per_epoch(self) -> float:
        """``n / batch_size`` (not an integer when batches wrap)."""
        return self.n / self.batch_size

    def epoch(self, step: int) -> int:
        """The epoch that step ``step``'s first index comes from."""
        return self._check_step(step) * self.batch_size // self.n

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the ``n`` examples."""
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        perm = self._cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = perm
        return perm

    def batch_indices(self, step: int) -> Tensor:
        """Indices (int64 tensor of length ``batch_size``) of the examples of step ``step``."""
        start = self._check_step(step) * self.batch_size
        stop = start + self.batch_size
        first, last = start // self.n, (stop - 1) // self.n  # last <= first + 1 since batch_size <= n
        lo = start - first * self.n
        if first == last:
            idx = self.permutation(first)[lo : lo + self.batch_size]
        else:
            idx = np.concatenate([self.permutation(first)[lo:], self.permutation(last)[: stop - last * self.n]])
        return torch.from_numpy(idx.astype(np.int64, copy=True))

    @staticmethod
    def _check_step(step: int) -> int:
        step = operator.index(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step
