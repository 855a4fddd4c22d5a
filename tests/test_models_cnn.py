import math

import pytest
import torch
from torch import nn

from samedge.core.losses import cross_entropy, squared_error
from samedge.core.objective import HVP_MODES, Objective
from samedge.models.cnn import CNN, ChannelLayerNorm


def _cnn(seed: int = 0, **kw) -> CNN:
    torch.manual_seed(seed)
    return CNN(**kw)


@pytest.mark.parametrize(
    "kw,in_shape",
    [
        ({}, (3, 32, 32)),
        ({"blocks": 3, "layers_per_block": 2, "channel_multiplier": 4}, (3, 32, 32)),
        ({"in_shape": (1, 16, 8), "num_classes": 7, "blocks": 1}, (1, 16, 8)),
    ],
)
def test_output_shape(kw, in_shape):
    model = _cnn(**kw)
    out = model(torch.randn(5, *in_shape))
    assert out.shape == (5, kw.get("num_classes", 10))


def test_parameter_count_by_hand():
    model = _cnn()
    conv1 = 3 * 16 * 9 + 16
    ln1 = 2 * 16
    conv2 = 16 * 32 * 9 + 32
    ln2 = 2 * 32
    dense = (32 * 8 * 8) * 10 + 10
    expected = conv1 + ln1 + conv2 + ln2 + dense
    assert expected == 25674
    assert sum(p.numel() for p in model.parameters()) == expected == CNN.count_parameters()


@pytest.mark.parametrize(
    "kw",
    [
        {"blocks": 1},
        {"blocks": 3, "layers_per_block": 2, "channel_multiplier": 8},
        {"in_shape": (1, 28, 28), "num_classes": 3, "blocks": 2, "layers_per_block": 3, "channel_multiplier": 5},
    ],
)
def test_parameter_count_formula(kw):
    model = _cnn(**kw)
    assert sum(p.numel() for p in model.parameters()) == CNN.count_parameters(**kw)


def test_architecture_order():
    model = _cnn(blocks=2, layers_per_block=2, channel_multiplier=4)
    kinds = [type(m).__name__ for m in model.features]
    block = ["Conv2d", "ReLU", "ChannelLayerNorm"] * 2 + ["MaxPool2d"]
    assert kinds == block * 2
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs)
    assert model.head.in_features == 8 * 8 * 8


def test_channel_layernorm_statistics():
    torch.manual_seed(0)
    ln = ChannelLayerNorm(6)
    assert ln.eps == 1e-6
    x = torch.randn(4, 6, 5, 7, dtype=torch.float64) * 3 + 2
    y = ln.double()(x)
    assert torch.allclose(y.mean(dim=1), torch.zeros(4, 5, 7, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(y.var(dim=1, unbiased=False), torch.ones(4, 5, 7, dtype=torch.float64), atol=1e-5)
    ref = (x - x.mean(dim=1, keepdim=True)) / torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + 1e-6)
    assert torch.allclose(y, ref, atol=1e-12)
    flax_like = nn.functional.layer_norm(x.movedim(1, -1), (6,), eps=1e-6).movedim(-1, 1)  # NHWC, last axis
    assert torch.allclose(y, flax_like, atol=1e-12)
    with torch.no_grad():
        ln.weight.copy_(torch.arange(1.0, 7.0))
        ln.bias.copy_(torch.arange(6.0) / 10)
    y = ln(x)
    assert torch.allclose(
        y, ref * torch.arange(1.0, 7.0)[:, None, None] + (torch.arange(6.0) / 10)[:, None, None], atol=1e-12
    )


def test_layernorm_over_channels_in_model_at_init():
    model = _cnn().double()
    outputs = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: outputs.append((i[0], o)))
        for m in model.modules()
        if isinstance(m, ChannelLayerNorm)
    ]
    model(torch.randn(3, 3, 32, 32, dtype=torch.float64))
    for h in hooks:
        h.remove()
    assert len(outputs) == 2
    for inp, out in outputs:
        assert out.shape == inp.shape
        assert out.mean(dim=1).abs().max() < 1e-10
        live = inp.var(dim=1, unbiased=False) > 1e-3  # positions where ReLU left some signal
        assert live.float().mean() > 0.9
        assert torch.allclose(out.var(dim=1, unbiased=False)[live], torch.ones_like(out[:, 0][live]), atol=1e-3)
        # not normalized over space: per-channel spatial means are far from zero
        assert out.mean(dim=(2, 3)).abs().max() > 0.05


def test_initialization():
    model = _cnn(channel_multiplier=32)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.all(m.bias == 0)
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
            std = math.sqrt(2.0 / (fan_in + fan_out))
            w = m.weight.detach()
            assert w.std().item() == pytest.approx(std, rel=0.1 if w.numel() < 5000 else 0.05)
            assert w.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-6  # truncated at 2 sigma
        if isinstance(m, ChannelLayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_nchw_flatten_is_a_permutation_of_flax_nhwc():
    model = _cnn(channel_multiplier=4).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    feats = model.features(x)  # (N, C, H, W)
    c, h, w = feats.shape[1:]
    # a Flax dense kernel acts on NHWC-flattened features; rearrange ours to that order
    w_flax = model.head.weight.detach().reshape(-1, c, h, w).permute(0, 2, 3, 1).reshape(-1, c * h * w)
    flax_out = feats.permute(0, 2, 3, 1).reshape(2, -1) @ w_flax.T + model.head.bias
    assert torch.allclose(model(x), flax_out, atol=1e-12)


def test_double_backward():
    model = _cnn(channel_multiplier=4).double()
    params = list(model.parameters())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([3, 9])
    loss = cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(g, params, grad_outputs=v)
    assert all(h.shape == p.shape and torch.isfinite(h).all() for h, p in zip(hv, params))
    ln_weight = model.features[2].weight
    assert any(h.abs().sum() > 0 for h, p in zip(hv, params) if p is ln_weight)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.slow
def test_hvp_modes_agree():
    """Double backward and forward-over-reverse give the same HVP through the CNN (its LayerNorm
    is written out: F.layer_norm's forward-mode derivative is wrong in torch 2.13)."""
    model = _cnn(seed=1, in_shape=(3, 8, 8), channel_multiplier=4, layers_per_block=2).double()
    torch.manual_seed(2)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (3,))
    objective = Objective.from_tensors(model, squared_error, x, y, chunk_size=2)
    params = objective.parameters()
    v = tuple(torch.randn_like(p) for p in params)
    ref = _flat(objective.hvp(params, v))
    assert torch.isfinite(ref).all() and ref.norm() > 0
    for mode in HVP_MODES[1:]:
        objective.hvp_mode = mode
        torch.testing.assert_close(_flat(objective.hvp(params, v)), ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


@pytest.mark.parametrize("loss_fn", [cross_entropy, squared_error])
def test_hvp_matches_finite_differences(loss_fn):
    """Small network and input so that a perturbation of 1e-6 crosses no ReLU kink or max-pool
    switch (with many units, finite differences of a ReLU network's gradient do not converge to
    the HVP: the kinks crossed contribute O(1) however small the step)."""
    model = _cnn(seed=0, in_shape=(3, 8, 8), channel_multiplier=4, layers_per_block=2).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (3,))
    objective = Objective.from_tensors(model, loss_fn, x, y, chunk_size=2)
    params = objective.parameters()
    v = tuple(torch.randn_like(p) for p in params)
    hv = _flat(objective.hvp(params, v))
    fd = _flat(objective.finite_difference_hvp(params, v, eps=1e-6))
    assert ((hv - fd).norm() / hv.norm()).item() < 1e-4


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"blocks": 0}, "blocks must be >= 1"),
        ({"layers_per_block": 0}, "layers_per_block must be >= 1"),
        ({"channel_multiplier": 0}, "channel_multiplier must be >= 1"),
        ({"num_classes": 0}, "num_classes must be >= 1"),
        ({"blocks": 1.5}, "blocks must be a positive integer"),
        ({"blocks": True}, "blocks must be a positive integer"),
        ({"in_shape": (3, 30, 30)}, "divisible by 2\\*\\*blocks = 4"),
        ({"in_shape": (3, 32, 32), "blocks": 6}, "divisible by 2\\*\\*blocks = 64"),
        ({"in_shape": (32, 32)}, "in_shape must be \\(channels, height, width\\)"),
        ({"in_shape": (0, 32, 32)}, "in_shape\\[0\\] must be >= 1"),
    ],
)
def test_invalid_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        CNN(**kw)


def test_wrong_input_shape():
    model = _cnn()
    with pytest.raises(ValueError, match="expected inputs of shape"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="expected inputs of shape"):
        model(torch.randn(3, 32, 32))
