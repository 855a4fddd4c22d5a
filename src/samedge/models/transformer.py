"""Decoder-only Transformer of the paper's tiny-Shakespeare experiment.

The architecture follows Haiku's ``examples/transformer`` (the paper's code):

* token embedding plus a learned position embedding;
* ``layers`` pre-LayerNorm blocks, ``x = x + Attn(LN(x))`` then ``x = x + MLP(LN(x))``, with causal
  multi-head attention (``heads`` heads of ``key_size`` for queries, keys and values, projections
  with biases, like ``hk.MultiHeadAttention``) and an MLP ``Linear(d, mlp_ratio d) -> GELU ->
  Linear(mlp_ratio d, d)``; GELU is the tanh approximation, the default of ``jax.nn.gelu``;
* a final LayerNorm (eps 1e-5, as ``hk.LayerNorm``) and an untied output ``Linear`` to the
  vocabulary.  No dropout.

Attention is written out as ``softmax(Q K^T / sqrt(key_size) + causal mask) V`` with plain tensor
operations.  ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` are deliberately not
used: their fused CPU/GPU kernels have no double backward, and samedge takes exact Hessian-vector
products by differentiating the gradient (or with forward-mode AD through it).  The softmax and
the LayerNorms are written out too, because PyTorch 2.13's own forward-mode formulas for them are
not correctly differentiable (see :func:`_softmax` and :class:`LayerNorm`); plain operations give
exact HVPs whatever the autodiff route.

Initialization: embeddings (token and position) are truncated normal with stddev 0.02 cut at two
standard deviations, exactly ``hk.initializers.TruncatedNormal(0.02)`` of the Haiku example.  Every
``Linear`` is Glorot-normal with zero bias (:func:`init_glorot_`, as samedge's other models);
Haiku's example instead uses ``VarianceScaling(2 / layers)`` in the blocks and Haiku's default
``TruncatedNormal(1 / sqrt(fan_in))`` for the output layer.  LayerNorms start at scale 1, offset 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from samedge.core.validation import positive_int
from samedge.models.init import init_glorot_

__all__ = ["Transformer", "CausalSelfAttention", "Block", "LayerNorm", "EMBED_STD"]

EMBED_STD = 0.02


def _softmax(scores: Tensor) -> Tensor:
    """Softmax over the last axis, written out (see the module docstring).

    ``torch.softmax`` is avoided because its forward-mode derivative modifies a tensor that
    reverse mode saved, so reverse-over-forward differentiation fails (pytorch/pytorch#162350,
    torch 2.13).
    The row maximum is subtracted for stability and detached: softmax does not depend on the
    shift, so every derivative is still exact.  Masked scores are -inf and get weight exactly 0.
    """
    shift = scores.amax(dim=-1, keepdim=True).detach()
    e = torch.exp(scores - shift)
    return e / e.sum(dim=-1, keepdim=True)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last axis (same parameters and defaults), written out.

    ``F.layer_norm``'s forward-mode derivative is not differentiable correctly in reverse mode:
    reverse-over-forward second derivatives through it come out silently wrong in torch 2.13 (compare
    pytorch/pytorch#196700, a wrong nested JVP).  These plain operations have exact derivatives
    of every order and mode.
    """

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__(d_model, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        centered = x - x.mean(dim=-1, keepdim=True)
        var = (centered * centered).mean(dim=-1, keepdim=True)
        return centered * torch.rsqrt(var + self.eps) * self.weight + self.bias


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention over sequences of at most ``seq_len`` positions."""

    causal: Tensor  # (seq_len, seq_len) lower-triangular mask, a buffer

    def __init__(self, d_model: int, heads: int, key_size: int, seq_len: int):
        super().__init__()
        self.heads, self.key_size = heads, key_size
        inner = heads * key_size
        self.query = nn.Linear(d_model, inner)
        self.key = nn.Linear(d_model, inner)
        self.value = nn.Linear(d_model, inner)
        self.out = nn.Linear(inner, d_model)
        # True where position i may attend to position j (j <= i)
        self.register_buffer("causal", torch.ones(seq_len, seq_len, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h, k = self.heads, self.key_size
        q = self.query(x).view(b, t, h, k).transpose(1, 2)  # (b, h, t, k)
        kk = self.key(x).view(b, t, h, k).transpose(1, 2)
        v = self.value(x).view(b, t, h, k).transpose(1, 2)
        scores = torch.matmul(q, kk.transpose(-2, -1)) / math.sqrt(k)  # (b, h, t, t)
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        weights = _softmax(scores)
        attended = torch.matmul(weights, v).transpose(1, 2).reshape(b, t, h * k)
        return self.out(attended)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block."""

    def __init__(self, d_model: int, heads: int, key_size: int, seq_len: int, mlp_ratio: int):
        super().__init__()
        self.ln_attn = LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, key_size, seq_len)
        self.ln_mlp = LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * d_model, d_model),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class Transformer(nn.Module):
    """Character-level decoder-only language model.

    Input: int64 token ids of shape ``(B, T)`` with ``1 <= T <= seq_len``.  Output: logits of
    shape ``(B, T, vocab_size)``; position ``t`` depends only on tokens ``0..t``.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        layers: int = 2,
        heads: int = 4,
        d_model: int = 64,
        key_size: int = 16,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        self.vocab_size = positive_int("vocab_size", vocab_size)
        self.seq_len = positive_int("seq_len", seq_len)
        self.layers = positive_int("layers", layers)
        self.heads = positive_int("heads", heads)
        self.d_model = positive_int("d_model", d_model)
        self.key_size = positive_int("key_size", key_size)
        self.mlp_ratio = positive_int("mlp_ratio", mlp_ratio)

        self.token_embedding = nn.Embedding(self.vocab_size, self.d_model)
        self.position_embedding = nn.Parameter(torch.empty(self.seq_len, self.d_model))
        self.blocks = nn.ModuleList(
            Block(self.d_model, self.heads, self.key_size, self.seq_len, self.mlp_ratio) for _ in range(self.layers)
        )
        self.ln_final = LayerNorm(self.d_model)
        self.head = nn.Linear(self.d_model, self.vocab_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.token_embedding.weight, self.position_embedding):
            nn.init.trunc_normal_(w, mean=0.0, std=EMBED_STD, a=-2 * EMBED_STD, b=2 * EMBED_STD)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        init_glorot_(self)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, time), got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"expected integer token ids, got dtype {tokens.dtype}")
        t = tokens.shape[1]
        if not 1 <= t <= self.seq_len:
            raise ValueError(f"sequence length must be in [1, {self.seq_len}], got {t}")
        x = self.token_embedding(tokens) + self.position_embedding[:t]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))

    @staticmethod
    def count_parameters(
        vocab_size: int,
        seq_len: int,
        layers: int = 2,
        heads: int = 4,
        d_model: int = 64,
        key_size: int = 16,
        mlp_ratio: int = 4,
    ) -> int:
        """Number of parameters, by formula::

        V d + S d                                   token and position embeddings
        + L [ 2d                                    LayerNorm before attention
              + 3 (d H K + H K) + (H K d + d)       Q, K, V and output projections
              + 2d                                  LayerNorm before the MLP
              + (d r d + r d) + (r d d + d) ]       MLP
        + 2d + (d V + V)                            final LayerNorm and output layer
        """
        d, hk, rd = d_model, heads * key_size, mlp_ratio * d_model
        per_layer = 2 * d + 3 * (d * hk + hk) + (hk * d + d) + 2 * d + (d * rd + rd) + (rd * d + d)
        return vocab_size * d + seq_len * d + layers * per_layer + 2 * d + d * vocab_size + vocab_size
