"""Models of the paper's experiments, initialized as its code does (Glorot-normal, zero biases)."""

from .init import glorot_normal_, init_glorot_
from .mlp import MLP

__all__ = ["MLP", "glorot_normal_", "init_glorot_"]
