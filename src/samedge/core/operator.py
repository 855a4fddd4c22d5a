"""A symmetric linear operator given only by its product with a vector: what the solvers take.

:class:`LinearOperator` carries the product function with the size (``dim``), ``dtype`` and
``device`` of the vectors it acts on, and counts the products it takes (``matvecs``).  The
eigen-solvers (:mod:`samedge.core.eigen`) and the trace and density estimators
(:mod:`samedge.core.spectrum`) take one; :meth:`samedge.core.objective.Objective.hvp_operator`
returns the Hessian's.  They also accept a plain callable with its ``dim`` (and ``dtype``,
``device``), which :func:`as_operator` wraps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor

#: a product ``v -> A v`` on flat tensors of shape ``(dim,)``
Matvec = Callable[[Tensor], Tensor]

__all__ = ["Matvec", "LinearOperator", "as_operator"]


class LinearOperator:
    """The symmetric operator ``v -> matvec(v)`` on vectors of shape ``(dim,)``, ``dtype`` and
    ``device``.  Calling it (or :meth:`matvec`) takes one product and adds one to ``matvecs``."""

    def __init__(
        self, matvec: Matvec, dim: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.function = matvec
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        #: products taken so far
        self.matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def matvec(self, v: Tensor) -> Tensor:
        """``A v``, counted."""
        self.matvecs += 1
        return self.function(v)

    __call__ = matvec

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """The same operator for SciPy (``scipy.sparse.linalg.eigsh`` and friends): float64 NumPy
        vectors in and out, each converted to ``dtype`` on ``device`` for the product (counted)."""

        def apply(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.ascontiguousarray(x).ravel(), dtype=self.dtype, device=self.device)
            return self.matvec(v).double().cpu().numpy()

        return scipy.sparse.linalg.LinearOperator(self.shape, matvec=apply, rmatvec=apply, dtype=np.float64)

    def __repr__(self) -> str:
        return f"LinearOperator(dim={self.dim}, dtype={self.dtype}, device={self.device}, matvecs={self.matvecs})"


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def as_operator(
    operator: LinearOperator | Matvec,
    dim: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LinearOperator:
    """``operator`` itself when it is a :class:`LinearOperator` (``dim``, ``dtype`` and ``device``,
    where given, must agree with it); otherwise the callable wrapped with ``dim`` (required),
    ``dtype`` (default float32) and ``device`` (default CPU)."""
    if isinstance(operator, LinearOperator):
        if dim is not None and dim != operator.dim:
            raise ValueError(f"dim {dim} does not match the operator's ({operator.dim})")
        if dtype is not None and dtype != operator.dtype:
            raise ValueError(f"dtype {dtype} does not match the operator's ({operator.dtype})")
        if device is not None and not _same_device(torch.device(device), operator.device):
            raise ValueError(f"device {device} does not match the operator's ({operator.device})")
        return operator
    if not callable(operator):
        raise TypeError(f"expected a LinearOperator or a callable, got {type(operator).__name__}")
    if dim is None:
        raise TypeError("dim is required with a plain matvec callable")
    return LinearOperator(
        operator, dim, dtype=torch.float32 if dtype is None else dtype, device="cpu" if device is None else device
    )
