"""Per-block masses, Rayleigh shares and block eigenvalues, and batch sharpness, against dense
float64 Hessians."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from samedge.core.blocks import group_blocks, interlacing_holds, module_blocks, parse_groups
from samedge.core.losses import cross_entropy
from samedge.core.method import Method
from samedge.core.objective import Objective
from samedge.core.optim import sam_gradient
from samedge.core.params import flatten
from samedge.core.thresholds import sam_edge
from samedge.core.tracker import SharpnessTracker
from samedge.models import MLP

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


def _model(seed=0):
    torch.manual_seed(seed)
    return MLP((5,), 3, width=6, depth=3, activation="tanh").double()


def _data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _dense(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(w):
        tensors, at = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            tensors[n] = w[at : at + k].reshape(s)
            at += k
        return cross_entropy(functional_call(model, tensors, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, flat), torch.autograd.functional.jacobian(loss_of, flat)


def test_block_masses_shares_and_eigenvalues_match_the_dense_hessian():
    model, (x, y) = _model(), _data()
    H, _ = _dense(model, x, y)
    evals, evecs = torch.linalg.eigh(H)
    v = evecs[:, -1]
    tracker = SharpnessTracker(model, cross_entropy, (x, y), tol=1e-10, max_iter=200)
    m = tracker.measure(eta=0.1, optimizer="gd", by_module=True, block_sharpness=True)
    assert m.blocks is not None and len(m.blocks) == 3  # net.1, net.3, net.5 (the Sequential looked through)
    names = [n for n, _ in model.named_parameters()]
    blocks = module_blocks(model, names, [p.numel() for p in model.parameters()])
    assert [b.name for b in blocks] == [r.name for r in m.blocks]
    assert sum(r.mass for r in m.blocks) == pytest.approx(1.0, abs=1e-12)
    assert sum(r.rayleigh_share for r in m.blocks) == pytest.approx(1.0, abs=1e-12)
    for b, r in zip(blocks, m.blocks):
        assert r.params == b.size
        assert r.mass == pytest.approx(float(b.take(v) @ b.take(v)), abs=1e-8)
        assert r.rayleigh_share == pytest.approx(r.mass, abs=1e-7)  # an eigenvector: share = mass
        idx = torch.cat([torch.arange(a, c) for a, c in b.ranges])
        top_bb = float(torch.linalg.eigvalsh(H[idx][:, idx])[-1])
        assert r.sharpness == pytest.approx(top_bb, rel=1e-8)
        assert r.sharpness <= float(evals[-1]) + 1e-10  # Cauchy interlacing
        assert interlacing_holds(r.sharpness, m.sharpness, 0.0)
        assert r.hvps > 0 and r.converged


def test_rayleigh_share_of_an_unconverged_vector_uses_the_solvers_product():
    """A loose tolerance: the Ritz vector is no eigenvector, and its shares are v[B]^T (H v)[B] / v^T H v
    with the solver's H v (no extra HVP), which the dense Hessian reproduces."""
    model, (x, y) = _model(), _data()
    H, _ = _dense(model, x, y)
    tracker = SharpnessTracker(model, cross_entropy, (x, y), tol=0.3, max_iter=3)
    m = tracker.measure(eta=0.1, optimizer="gd", by_module=True)
    v = tracker.solver.last.eigenvectors[0].double()
    v = v / v.norm()
    hv = H @ v
    blocks = module_blocks(model, [n for n, _ in model.named_parameters()], [p.numel() for p in model.parameters()])
    for b, r in zip(blocks, m.blocks):
        assert r.rayleigh_share == pytest.approx(float(b.take(v) @ b.take(hv)) / float(v @ hv), abs=1e-9)
    assert sum(r.rayleigh_share for r in m.blocks) == pytest.approx(1.0, abs=1e-12)


def test_groups_by_tensor_name_and_prefix_with_the_rest_as_other():
    model, (x, y) = _model(), _data()
    tracker = SharpnessTracker(model, cross_entropy, (x, y), tol=1e-8)
    first = model.net[1].weight
    m = tracker.measure(eta=0.1, optimizer="gd", groups={"in_w": [first], "out": ["net.5"]})
    assert [r.name for r in m.blocks] == ["in_w", "out", "other"]
    assert [r.params for r in m.blocks] == [30, 21, 6 + 42]
    assert sum(r.mass for r in m.blocks) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="matches no parameter"):
        tracker.measure(eta=0.1, optimizer="gd", groups={"x": ["nothing"]})
    with pytest.raises(ValueError, match="in groups"):
        group_blocks({"a": ["net.1"], "b": ["net.1.weight"]}, ["net.1.weight"], [3])


def test_parse_groups():
    assert parse_groups("embed=tok, pos ; attn=blocks.0.attn") == {"embed": ["tok", "pos"], "attn": ["blocks.0.attn"]}
    for bad in ("embed", "=a", "a=", "a=x;a=y", " ; "):
        with pytest.raises(ValueError):
            parse_groups(bad)


def test_leaves_and_modules_on_a_nested_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Parameter(torch.zeros(3))
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)) for _ in range(2)])
            self.head = nn.Linear(2, 1)

    net = Net()
    names = [n for n, _ in net.named_parameters()]
    sizes = [p.numel() for p in net.parameters()]
    # a Sequential inside a ModuleList is looked through too: each Linear is a block
    assert [b.name for b in module_blocks(net, names, sizes)] == [
        "emb",
        "blocks.0.0",
        "blocks.0.1",
        "blocks.1.0",
        "blocks.1.1",
        "head",
    ]
    assert [b.name for b in module_blocks(net, names, sizes, by="leaves")][0] == "emb"


def _batches(k=5, n=6):
    return [_data(n, seed=10 + i) for i in range(k)]


def test_batch_sharpness_equals_its_definition():
    model = _model()
    batches = _batches()
    q, qs = [], []
    params = tuple(p.detach() for p in model.parameters())
    eta, rho = 0.1, 0.05
    for x, y in batches:
        H, g = _dense(model, x, y)
        q.append(float(g @ H @ g / (g @ g)))
        obj = Objective.from_tensors(model, cross_entropy, x, y)
        d = flatten(sam_gradient(obj.grad, params, obj.grad(params), rho))
        qs.append(float(d @ H @ d / (g @ d)))
    tracker = SharpnessTracker(model, cross_entropy, _data())
    est = tracker.batch_sharpness(batches, eta=eta, rho=rho, optimizer="sam")
    assert est.per_batch == pytest.approx(q, rel=1e-10)
    assert est.value == pytest.approx(np.mean(q), rel=1e-10)
    assert est.stderr == pytest.approx(np.std(q, ddof=1) / math.sqrt(len(q)), rel=1e-8)
    assert est.per_batch_step == pytest.approx(qs, rel=1e-10)
    assert est.hvps == 2 * len(batches) and est.gradients == 2 * len(batches)
    gd = tracker.batch_sharpness(batches, eta=eta, optimizer="gd")
    assert gd.per_batch_step == gd.per_batch and gd.hvps == len(batches)
    assert gd.edge == pytest.approx(2 / eta)


def test_step_sharpness_decides_whether_a_sam_step_lowers_a_noisy_quadratic():
    """On L_B(w) = 1/2 (w - c_B)^T A_B (w - c_B) the SAM step lowers L_B iff d^T A d / g^T d < 2/eta;
    along an eigenvector it is lambda (1 + rho lambda / ||g||), at 2/eta exactly at the SAM-edge."""
    gen = torch.Generator().manual_seed(0)
    eta, rho = 0.1, 0.05
    for _trial in range(40):
        Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
        A = Q @ torch.diag(torch.rand(4, generator=gen, dtype=torch.float64) * 30) @ Q.T
        c, w = torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)

        def loss(u, A=A, c=c):
            return 0.5 * (u - c) @ A @ (u - c)

        g = A @ (w - c)
        d = A @ (w + rho * g / g.norm() - c)
        step = float(d @ A @ d / (g @ d))
        assert (loss(w - eta * d) < loss(w)) == (step < 2 / eta)
    lam, gnorm = 12.0, 0.7
    u = torch.tensor([1.0, 0.0], dtype=torch.float64)
    A = torch.diag(torch.tensor([lam, 1.0], dtype=torch.float64))
    g = gnorm * u
    d = A @ (u * (gnorm / lam) + rho * u)  # the gradient at w + rho g/||g|| with w - c = g / lam
    assert float(d @ A @ d / (g @ d)) == pytest.approx(lam * (1 + rho * lam / gnorm))
    edge = sam_edge(eta, rho, gnorm)
    assert edge * (1 + rho * edge / gnorm) == pytest.approx(2 / eta)
    assert Method("sam", eta, rho).edge(gnorm) == pytest.approx(edge)
