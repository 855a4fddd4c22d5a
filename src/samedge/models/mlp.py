"""Fully connected network of the paper's MNIST experiment."""

from __future__ import annotations

import math

from torch import Tensor, nn

from samedge.models.init import init_glorot_

__all__ = ["MLP", "ACTIVATIONS"]

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU, "softplus": nn.Softplus}


class MLP(nn.Module):
    """``depth`` dense layers (so ``depth - 1`` hidden layers of ``width`` units), activation
    between them, none after the last.  Inputs of any shape are flattened."""

    def __init__(
        self, in_shape: tuple[int, ...], num_classes: int, width: int = 256, depth: int = 4, activation: str = "relu"
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        sizes = [math.prod(in_shape)] + [width] * (depth - 1) + [num_classes]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < depth - 1:
                layers.append(ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)
        init_glorot_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
