"""Models of the paper's experiments, initialized as its code does (Glorot-normal, zero biases)."""

from samedge.models.init import glorot_normal_, init_glorot_
from samedge.models.mlp import MLP

__all__ = ["MLP", "glorot_normal_", "init_glorot_"]
