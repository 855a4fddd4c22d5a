"""Glorot-normal initialization as in JAX/Flax (the paper's code).

``jax.nn.initializers.glorot_normal`` is a *truncated* normal (at two standard deviations) with
variance ``2 / (fan_in + fan_out)``, the truncation compensated by dividing the standard deviation
by 0.87962566103423978.  PyTorch's ``xavier_normal_`` is untruncated; this matches JAX instead.
Fans are PyTorch's (for a conv: channels times kernel size), which equal Flax's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["glorot_normal_", "init_glorot_"]

_TRUNCATED_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


@torch.no_grad()
def glorot_normal_(weight: Tensor) -> Tensor:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    std = math.sqrt(2.0 / (fan_in + fan_out)) / _TRUNCATED_STD
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


@torch.no_grad()
def init_glorot_(module: nn.Module) -> nn.Module:
    """Glorot-normal weights and zero biases for every Linear and Conv layer in ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            glorot_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module
