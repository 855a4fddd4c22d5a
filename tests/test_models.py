"""MLP architecture and the JAX-style truncated Glorot-normal initialization."""

import math

import pytest
import torch
from torch import nn

from samedge.models import MLP, glorot_normal_, init_glorot_
from samedge.models.mlp import ACTIVATIONS

TRUNC = 0.87962566103423978


def expected_params(in_features, classes, width, depth):
    sizes = [in_features] + [width] * (depth - 1) + [classes]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


@pytest.mark.parametrize(
    "in_shape,classes,width,depth",
    [
        ((5,), 3, 7, 1),
        ((5,), 3, 7, 2),
        ((5,), 3, 7, 3),
        ((1, 28, 28), 10, 32, 4),
        ((2, 3), 4, 1, 5),
    ],
)
def test_parameter_count_and_shapes(in_shape, classes, width, depth):
    model = MLP(in_shape, classes, width=width, depth=depth)
    d = math.prod(in_shape)
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_params(d, classes, width, depth)
    # closed form: d w + w + (depth - 2)(w^2 + w) + w c + c for depth >= 2; d c + c for depth 1
    if depth == 1:
        assert n == d * classes + classes
    else:
        assert n == d * width + width + (depth - 2) * (width * width + width) + width * classes + classes
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == depth
    assert linears[0].in_features == d and linears[-1].out_features == classes
    out = model(torch.randn(4, *in_shape))
    assert out.shape == (4, classes)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activations_between_layers_only(activation):
    model = MLP((6,), 3, width=5, depth=3, activation=activation)
    layers = list(model.net)
    assert isinstance(layers[0], nn.Flatten)
    kinds = [type(m) for m in layers[1:]]
    act = ACTIVATIONS[activation]
    assert kinds == [nn.Linear, act, nn.Linear, act, nn.Linear]
    # the forward pass is exactly that composition
    x = torch.randn(2, 6, dtype=torch.float32)
    h = x
    for m in layers[1:]:
        h = m(h)
    assert torch.equal(model(x), h)


def test_forward_by_hand_relu():
    model = MLP((2,), 1, width=2, depth=2, activation="relu").double()
    with torch.no_grad():
        model.net[1].weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5]]))
        model.net[1].bias.copy_(torch.tensor([0.0, -1.0]))
        model.net[3].weight.copy_(torch.tensor([[3.0, -2.0]]))
        model.net[3].bias.copy_(torch.tensor([0.5]))
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    # hidden = relu((1 - 2, 2 + 1 - 1)) = (0, 2); out = 3*0 - 2*2 + 0.5
    with torch.no_grad():
        assert float(model(x)) == -3.5


def test_zero_biases_and_truncation():
    torch.manual_seed(0)
    model = MLP((20,), 10, width=64, depth=4)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            fan_in, fan_out = m.in_features, m.out_features
            std = math.sqrt(2 / (fan_in + fan_out)) / TRUNC
            assert m.weight.abs().max() <= 2 * std
            assert m.weight.abs().max() > 1.5 * std  # and it is a normal, not squeezed


def test_glorot_std_on_large_layer():
    torch.manual_seed(1)
    layer = nn.Linear(600, 400)
    glorot_normal_(layer.weight)
    w = layer.weight.detach().double()
    target = math.sqrt(2 / (600 + 400))
    # 240000 samples: the sample std is within ~0.3% of the target
    assert float(w.std()) == pytest.approx(target, rel=0.01)
    assert abs(float(w.mean())) < 0.01 * target
    assert float(w.abs().max()) <= 2 * target / TRUNC
    # truncated at two (scaled) standard deviations: the max is close to the bound
    assert float(w.abs().max()) > 0.99 * 2 * target / TRUNC
    # pytorch's untruncated xavier_normal_ has the same std but exceeds the bound
    x = torch.empty(400, 600)
    nn.init.xavier_normal_(x)
    assert float(x.std()) == pytest.approx(target, rel=0.01)
    assert float(x.abs().max()) > 2 * target / TRUNC


def test_truncated_std_constant():
    # std of a standard normal truncated to [-2, 2]: sqrt(1 - 4 phi(2) / (2 Phi(2) - 1))
    phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
    mass = math.erf(2 / math.sqrt(2))
    assert math.sqrt(1 - 4 * phi2 / mass) == pytest.approx(TRUNC, rel=1e-14)


def test_init_glorot_on_conv_and_fans():
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 32, kernel_size=3, bias=True).requires_grad_(False)
    nn.init.constant_(conv.bias, 1.0)
    init_glorot_(conv)
    assert torch.count_nonzero(conv.bias) == 0
    fan_in, fan_out = 16 * 9, 32 * 9
    target = math.sqrt(2 / (fan_in + fan_out))
    assert float(conv.weight.std()) == pytest.approx(target, rel=0.03)
    assert float(conv.weight.abs().max()) <= 2 * target / TRUNC


def test_init_is_seeded():
    torch.manual_seed(3)
    a = MLP((5,), 3, width=7, depth=3)
    torch.manual_seed(3)
    b = MLP((5,), 3, width=7, depth=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(depth=0), "depth"),
        (dict(depth=-1), "depth"),
        (dict(width=0), "width"),
        (dict(width=-3), "width"),
        (dict(activation="sigmoid"), "activation"),
    ],
)
def test_bad_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        MLP((5,), 3, **kw)
