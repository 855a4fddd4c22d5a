"""Convolutional network of the paper's CIFAR-10 experiment.

The architecture follows the paper's Flax code:

* ``blocks`` blocks; block ``i`` has ``layers_per_block`` layers ``Conv 3x3 ('SAME' padding,
  stride 1, channel_multiplier * 2**i channels) -> ReLU -> LayerNorm`` and ends with a 2x2 max
  pool of stride 2;
* flatten and one dense layer to ``num_classes`` logits.

Flax's ``nn.LayerNorm`` normalizes the last axis, which in Flax's NHWC layout is the channel axis:
each pixel's channel vector is normalized on its own (eps 1e-6, learnable scale starting at 1 and
offset starting at 0).  :class:`ChannelLayerNorm` does exactly that on PyTorch's NCHW layout.

Initialization: conv and dense weights Glorot-normal (truncated, as JAX's; :func:`init_glorot_`),
biases zero.  Every operation used (conv2d, relu, max_pool2d, linear and the written-out LayerNorm)
has exact derivatives of every order in both of samedge's HVP modes; ``F.layer_norm`` is avoided
because its forward-mode formula gives silently wrong second derivatives in torch 2.13 (found with
reverse-over-forward HVPs, which samedge therefore does not offer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from samedge.core.validation import positive_int
from samedge.models.init import init_glorot_

__all__ = ["CNN", "ChannelLayerNorm", "FLAX_LAYERNORM_EPS"]

FLAX_LAYERNORM_EPS = 1e-6


class ChannelLayerNorm(nn.Module):
    """LayerNorm of an ``(N, C, H, W)`` tensor over the channel dimension (dim 1) only, with a
    per-channel scale and offset: Flax's ``nn.LayerNorm()`` applied to NHWC activations."""

    def __init__(self, channels: int, eps: float = FLAX_LAYERNORM_EPS):
        super().__init__()
        self.channels = positive_int("channels", channels)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(self.channels))
        self.bias = nn.Parameter(torch.zeros(self.channels))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        # Written out rather than ``F.layer_norm`` on ``x.movedim(1, -1)``: F.layer_norm's
        # forward-mode derivative is not correctly differentiable in reverse mode in torch 2.13
        # (see samedge.models.transformer.LayerNorm); plain operations are exact in every mode.  Two-pass variance; Flax's default
        # ``E[x^2] - E[x]^2`` is the same quantity up to rounding.
        centered = x - x.mean(dim=1, keepdim=True)
        var = (centered * centered).mean(dim=1, keepdim=True)
        shape = (1, self.channels) + (1,) * (x.dim() - 2)
        return centered * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps:g}"


class CNN(nn.Module):
    """``blocks`` x (``layers_per_block`` x [Conv3x3 -> ReLU -> LayerNorm(channels)] -> MaxPool2x2),
    then flatten and a dense layer.  Block ``i`` has ``channel_multiplier * 2**i`` channels.

    Inputs are ``(N, *in_shape)`` with ``in_shape = (channels, height, width)``; height and width
    must be divisible by ``2**blocks``.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        blocks: int = 2,
        layers_per_block: int = 1,
        channel_multiplier: int = 16,
    ):
        super().__init__()
        in_shape = tuple(in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"in_shape must be (channels, height, width), got {in_shape!r}")
        c, h, w = (positive_int(f"in_shape[{i}]", v) for i, v in enumerate(in_shape))
        self.in_shape = (c, h, w)
        self.num_classes = positive_int("num_classes", num_classes)
        self.blocks = positive_int("blocks", blocks)
        self.layers_per_block = positive_int("layers_per_block", layers_per_block)
        self.channel_multiplier = positive_int("channel_multiplier", channel_multiplier)
        scale = 2**self.blocks
        if h % scale or w % scale:
            raise ValueError(
                f"input height and width ({h}x{w}) must be divisible by 2**blocks = {scale} "
                f"(each of the {self.blocks} blocks halves them with a 2x2 max pool)"
            )

        layers: list[nn.Module] = []
        channels = c
        for i in range(self.blocks):
            out = self.channel_multiplier * 2**i
            for _ in range(self.layers_per_block):
                layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.ReLU(), ChannelLayerNorm(out)]
                channels = out
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        # Flax flattens NHWC activations; flattening NCHW instead only permutes the inputs of the
        # dense layer (same function class, same Glorot init distribution, which depends on fans only).
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels * (h // scale) * (w // scale), self.num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, ChannelLayerNorm):
                m.reset_parameters()
        init_glorot_(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"expected inputs of shape (batch, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}"
            )
        return self.head(self.flatten(self.features(x)))

    @staticmethod
    def count_parameters(
        in_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        blocks: int = 2,
        layers_per_block: int = 1,
        channel_multiplier: int = 16,
    ) -> int:
        """Number of parameters, by formula: with ``c_i = channel_multiplier * 2**i``, each conv
        layer of block ``i`` has ``9 c_in c_i + c_i`` (``c_in`` the previous layer's channels,
        ``in_shape[0]`` for the first) and its LayerNorm ``2 c_i``; the dense layer has
        ``c_last (H / 2**blocks) (W / 2**blocks) num_classes + num_classes``."""
        c, h, w = in_shape
        total, channels = 0, c
        for i in range(blocks):
            out = channel_multiplier * 2**i
            for _ in range(layers_per_block):
                total += 9 * channels * out + out + 2 * out
                channels = out
        return total + channels * (h // 2**blocks) * (w // 2**blocks) * num_classes + num_classes
