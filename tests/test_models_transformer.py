import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samedge.core.losses import cross_entropy
from samedge.models.transformer import EMBED_STD, Transformer


def _tokens(b, t, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


def _small(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=11, seq_len=8, layers=2, heads=2, d_model=12, key_size=5, mlp_ratio=4)
    args.update(kw)
    return Transformer(**args).to(dtype)


def test_output_shape_and_dtype():
    model = Transformer(65, 64)
    for t in (64, 1, 17):
        out = model(_tokens(3, t, 65))
        assert out.shape == (3, t, 65) and out.dtype == torch.float32
    assert model.double()(_tokens(2, 5, 65)).dtype == torch.float64


@pytest.mark.parametrize(
    "cfg",
    [
        dict(vocab_size=65, seq_len=64),  # the defaults: layers=2, heads=4, d_model=64, key_size=16, mlp_ratio=4
        dict(vocab_size=128, seq_len=256, layers=3, heads=2, d_model=24, key_size=5, mlp_ratio=2),
    ],
)
def test_parameter_count(cfg):
    full = dict(layers=2, heads=4, d_model=64, key_size=16, mlp_ratio=4) | cfg
    V, S, L, H, d, K, r = (
        full[k] for k in ("vocab_size", "seq_len", "layers", "heads", "d_model", "key_size", "mlp_ratio")
    )
    per_layer = (
        2 * d  # LayerNorm (scale, offset) before attention
        + 3 * (d * H * K + H * K)  # query, key, value projections with biases
        + (H * K * d + d)  # attention output projection
        + 2 * d  # LayerNorm before the MLP
        + (d * r * d + r * d)  # MLP up
        + (r * d * d + d)  # MLP down
    )
    expected = V * d + S * d + L * per_layer + 2 * d + (d * V + V)  # embeddings, blocks, final LN, output
    model = Transformer(**cfg)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert Transformer.count_parameters(**cfg) == expected
    if cfg == dict(vocab_size=65, seq_len=64):
        assert expected == 112_577


def test_mask_is_a_non_persistent_buffer():
    model = Transformer(10, 6, layers=1)
    assert not any("causal" in k for k in model.state_dict())
    assert len(list(model.parameters())) == len(model.state_dict())


def test_causal_mask_exact():
    model = _small(torch.float32)
    x = _tokens(4, 8, 11, seed=1)
    base = model(x)
    for t in (0, 3, 7):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 11
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"logits before position {t} changed"
        assert (out[:, t:] != base[:, t:]).flatten(2).any(-1).all(), f"logits from position {t} on did not all change"
    # a prefix gives the same logits as the full sequence at the prefix positions
    torch.testing.assert_close(model(x[:, :5]), base[:, :5], rtol=1e-6, atol=1e-6)


def test_init():
    torch.manual_seed(0)
    a = Transformer(65, 64)
    torch.manual_seed(0)
    b = Transformer(65, 64)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    for w in (a.token_embedding.weight, a.position_embedding):
        w = w.detach()
        assert float(w.abs().max()) <= 2 * EMBED_STD
        # truncated at two standard deviations: std = 0.02 * 0.8796
        assert abs(float(w.std()) - EMBED_STD * 0.8796) < 0.1 * EMBED_STD
    for m in a.modules():
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            glorot = math.sqrt(2.0 / (m.in_features + m.out_features))
            assert abs(float(m.weight.detach().std()) / glorot - 1) < 0.1
        elif isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.count_nonzero(m.bias) == 0


def _flat_grad(model, x, y, theta):
    nn.utils.vector_to_parameters(theta, model.parameters())
    loss = cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def test_double_backward_hvp_matches_finite_differences():
    model = _small(torch.float64)
    x, y = _tokens(3, 8, 11, seed=2), _tokens(3, 8, 11, seed=3)
    params = list(model.parameters())
    theta = nn.utils.parameters_to_vector(params).detach().clone()
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    v /= v.norm()  # unit direction, so that eps is the size of the step in parameter space

    loss = cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_g = torch.cat([g.reshape(-1) for g in grads])
    hv = torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat_g @ v, params)])
    assert torch.isfinite(hv).all() and hv.norm() > 0

    eps = 1e-5
    fd = (_flat_grad(model, x, y, theta + eps * v) - _flat_grad(model, x, y, theta - eps * v)) / (2 * eps)
    nn.utils.vector_to_parameters(theta, model.parameters())
    rel = float((hv - fd).norm() / hv.norm())
    assert rel < 1e-5, rel


def _manual_cross_entropy(outputs, labels):
    # A written-out cross-entropy, as an independent check of F.cross_entropy's HVPs.
    outputs, labels = outputs.reshape(-1, outputs.shape[-1]), labels.reshape(-1)
    shift = outputs.amax(-1, keepdim=True).detach()
    logsumexp = (outputs - shift).exp().sum(-1).log() + shift.squeeze(-1)
    return (logsumexp - outputs.gather(-1, labels[:, None]).squeeze(-1)).mean()


@pytest.mark.parametrize("loss_fn", [cross_entropy, _manual_cross_entropy])
def test_hvp_modes_agree_through_objective(loss_fn):
    from samedge.core.objective import Objective

    model = _small(torch.float64)
    x, y = _tokens(4, 8, 11, seed=5), _tokens(4, 8, 11, seed=6)
    modes = ["double-backward", "forward-over-reverse"]
    objs = {mode: Objective.from_tensors(model, loss_fn, x, y, chunk_size=3, hvp_mode=mode) for mode in modes}
    params = objs["double-backward"].parameters()
    g = torch.Generator().manual_seed(7)
    vec = tuple(torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params)
    ref = torch.cat([h.reshape(-1) for h in objs["double-backward"].hvp(params, vec)])
    if loss_fn is _manual_cross_entropy:
        torch.testing.assert_close(loss_fn(model(x), y), cross_entropy(model(x), y), rtol=1e-14, atol=0)
    assert torch.isfinite(ref).all() and ref.norm() > 0
    for mode in modes[1:]:
        other = torch.cat([h.reshape(-1) for h in objs[mode].hvp(params, vec)])
        torch.testing.assert_close(other, ref, rtol=1e-9, atol=1e-11)


def test_layer_norm_matches_torch():
    from samedge.models.transformer import LayerNorm

    torch.manual_seed(0)
    ours, ref = LayerNorm(7).double(), nn.LayerNorm(7).double()
    with torch.no_grad():
        for p in (*ours.parameters(), *ref.parameters()):
            p.normal_()  # same draws for weight and bias: reseed
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 7, dtype=torch.float64) * 5 + 3
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_attention_softmax_matches_torch():
    from samedge.models.transformer import _softmax

    s = torch.randn(3, 5, 5, dtype=torch.float64) * 30
    s = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(_softmax(s), torch.softmax(s, -1), rtol=1e-14, atol=1e-15)
    assert torch.equal(_softmax(s).triu(1), torch.zeros_like(s))


def test_no_fused_attention(monkeypatch):
    """The module never calls fused attention (its CPU kernels lack double backward)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("fused attention used")

    monkeypatch.setattr(F, "scaled_dot_product_attention", forbidden)
    monkeypatch.setattr(torch._C._nn, "scaled_dot_product_attention", forbidden, raising=False)
    monkeypatch.setattr(nn.MultiheadAttention, "forward", forbidden)
    model = _small(torch.float32)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    x, y = _tokens(2, 8, 11), _tokens(2, 8, 11, seed=9)
    params = list(model.parameters())
    grads = torch.autograd.grad(cross_entropy(model(x), y), params, create_graph=True)
    hv = torch.autograd.grad(grads, params, grad_outputs=[torch.ones_like(p) for p in params])
    assert all(torch.isfinite(h).all() for h in hv)


def test_learns_a_periodic_sequence():
    torch.manual_seed(0)
    model = Transformer(5, 16, layers=1, heads=2, d_model=16, key_size=8)
    seq = torch.arange(17) % 5
    x, y = seq[:-1].expand(4, -1), seq[1:].expand(4, -1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(vocab_size=0, seq_len=8),
        dict(vocab_size=10, seq_len=0),
        dict(vocab_size=10, seq_len=8, layers=0),
        dict(vocab_size=10, seq_len=8, heads=0),
        dict(vocab_size=10, seq_len=8, d_model=-1),
        dict(vocab_size=10, seq_len=8, key_size=0),
        dict(vocab_size=10, seq_len=8, mlp_ratio=0),
        dict(vocab_size=10.5, seq_len=8),
        dict(vocab_size=True, seq_len=8),
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Transformer(**kwargs)


def test_bad_inputs():
    model = Transformer(10, 6, layers=1)
    with pytest.raises(ValueError, match="sequence length"):
        model(_tokens(2, 7, 10))
    with pytest.raises(ValueError, match="shape"):
        model(_tokens(2, 6, 10)[0])
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(2, 6))
