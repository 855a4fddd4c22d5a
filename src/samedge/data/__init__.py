"""Data sets as tensors in memory, with the paper's preprocessing.

Every loader returns a :class:`Split`: training and test inputs and integer labels (torch
tensors), plus a one-line ``source`` that says where the data came from (it goes into
``config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from samedge.errors import DataError

__all__ = ["Split", "DataError", "center_images", "int64_tensor"]


@dataclass(frozen=True)
class Split:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)


def center_images(train: np.ndarray, test: np.ndarray, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The paper's preprocessing: ``x / 256`` minus the per-pixel mean of the *training* images
    (applied to both splits).  Inputs are uint8 arrays of any image shape."""
    train = train.astype(np.float64) / 256.0
    test = test.astype(np.float64) / 256.0
    mean = train.mean(axis=0, keepdims=True)
    return torch.as_tensor(train - mean, dtype=dtype), torch.as_tensor(test - mean, dtype=dtype)


def int64_tensor(a: np.ndarray) -> Tensor:
    """Labels or character ids as a contiguous int64 tensor (sharing memory where it can)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
