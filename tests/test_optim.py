"""SAM / USAM / GD steps: hand computations, the functional path against the SAM optimizer, SGD."""

import math

import pytest
import torch

from samedge.core.losses import cross_entropy, squared_error
from samedge.core.objective import Objective
from samedge.core.optim import SAM, heavy_ball_update, perturbation, sam_gradient
from samedge.core.params import norm
from samedge.models import MLP

pytestmark = pytest.mark.usefixtures("one_thread")


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# L(a, b) = 1.5 a^2 + b^2 at (a, b) = (1, 2): g = (3 a, 2 b) = (3, 4), ||g|| = 5.
W = (t(1.0), t(2.0))


def grad_fn(params):
    a, b = params
    return (3 * a, 2 * b)


def assert_tuple_close(got, expected, atol=1e-15):
    assert len(got) == len(expected)
    for x, y in zip(got, expected):
        assert torch.allclose(x, torch.as_tensor(y, dtype=torch.float64).reshape(x.shape), rtol=0, atol=atol), (x, y)


def test_perturbation_by_hand():
    g = grad_fn(W)
    assert_tuple_close(g, [3.0, 4.0])
    # SAM: rho g / ||g|| = 0.5 (3, 4) / 5
    assert_tuple_close(perturbation(g, 0.5), [0.3, 0.4])
    assert norm(perturbation(g, 0.5)) == pytest.approx(0.5, rel=1e-15)
    # USAM: rho g
    assert_tuple_close(perturbation(g, 0.5, normalized=False), [1.5, 2.0])


def test_sam_gradient_by_hand():
    g = grad_fn(W)
    # SAM: w + e = (1.3, 2.4): grad = (3.9, 4.8)
    assert_tuple_close(sam_gradient(grad_fn, W, g, 0.5), [3.9, 4.8])
    # USAM: w + e = (2.5, 4.0): grad = (7.5, 8.0)
    assert_tuple_close(sam_gradient(grad_fn, W, g, 0.5, normalized=False), [7.5, 8.0])


def test_sam_step_by_hand():
    g = grad_fn(W)
    d = sam_gradient(grad_fn, W, g, 0.5)
    new, velocity = heavy_ball_update(W, d, 0.1)
    assert velocity is None
    assert_tuple_close(new, [1 - 0.39, 2 - 0.48])
    d = sam_gradient(grad_fn, W, g, 0.5, normalized=False)
    new, _ = heavy_ball_update(W, d, 0.1)
    assert_tuple_close(new, [1 - 0.75, 2 - 0.8])


def test_heavy_ball_by_hand():
    d = (t(3.9), t(4.8))
    # v = 0.9 (1, -1) + (3.9, 4.8) = (4.8, 3.9); w = (1, 2) - 0.1 v
    new, v = heavy_ball_update(W, d, 0.1, velocity=(t(1.0), t(-1.0)), momentum=0.9)
    assert_tuple_close(v, [4.8, 3.9])
    assert_tuple_close(new, [0.52, 1.61])
    # first momentum step: velocity starts at zero, so v = d
    new, v = heavy_ball_update(W, d, 0.1, momentum=0.9)
    assert_tuple_close(v, [3.9, 4.8])
    assert_tuple_close(new, [1 - 0.39, 2 - 0.48])
    # two steps by hand: v2 = 0.9 d + d2
    d2 = (t(1.0), t(2.0))
    new2, v2 = heavy_ball_update(new, d2, 0.1, velocity=v, momentum=0.9)
    assert_tuple_close(v2, [0.9 * 3.9 + 1.0, 0.9 * 4.8 + 2.0])
    assert_tuple_close(new2, [1 - 0.39 - 0.1 * 4.51, 2 - 0.48 - 0.1 * 6.32])


def test_inputs_not_modified():
    w = tuple(x.clone() for x in W)
    g = grad_fn(w)
    d = sam_gradient(grad_fn, w, g, 0.5)
    heavy_ball_update(w, d, 0.1, velocity=(t(1.0), t(1.0)), momentum=0.5)
    assert all(torch.equal(a, b) for a, b in zip(w, W))


def test_zero_gradient_gives_zero_perturbation():
    zero = (torch.zeros(3, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
    for normalized in (True, False):
        e = perturbation(zero, 0.5, normalized=normalized)
        assert all(x.shape == z.shape and torch.equal(x, z) for x, z in zip(e, zero))
    # SAM's gradient at a stationary point is the gradient there (evaluated at w itself)
    calls = []

    def fn(params):
        calls.append(params)
        return tuple(p * 0 + 7.0 for p in params)

    params = (torch.ones(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))
    out = sam_gradient(fn, params, zero, 0.5)
    assert len(calls) == 1 and all(torch.equal(c, p) for c, p in zip(calls[0], params))
    assert all(torch.all(o == 7.0) for o in out)


def test_rho_zero_skips_second_gradient():
    calls = []

    def fn(params):
        calls.append(1)
        return grad_fn(params)

    g = grad_fn(W)
    out = sam_gradient(fn, W, g, 0.0)
    assert calls == []
    assert all(torch.equal(a, b) for a, b in zip(out, g))


def test_sam_gradient_nonquadratic_by_hand():
    # L(a) = a^3 / 3 (one parameter): g = a^2; at a = 2, g = 4, e = rho sign(g) = rho
    params = (t(2.0),)

    def fn(p):
        return (p[0] ** 2,)

    out = sam_gradient(fn, params, fn(params), 0.25)
    assert float(out[0]) == pytest.approx(2.25**2, rel=1e-15)
    out = sam_gradient(fn, params, fn(params), 0.25, normalized=False)  # e = 0.25 * 4 = 1
    assert float(out[0]) == pytest.approx(9.0, rel=1e-15)


# --- the SAM optimizer against the functional path -------------------------------------------


def tiny_problem(seed=0, loss=squared_error):
    torch.manual_seed(seed)
    model = MLP((3,), 2, width=4, depth=2, activation="tanh").double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=g)
    return model, x, y, loss


def run_optimizer(model, x, y, loss, steps, **kw):
    opt = SAM(model.parameters(), **kw)
    calls, norms = [0], []

    def closure():
        calls[0] += 1
        opt.zero_grad()
        value = loss(model(x), y)
        value.backward()
        return value

    for _ in range(steps):
        opt.step(closure)
        norms.append(opt.last_grad_norm)
    return [p.detach().clone() for p in model.parameters()], norms, calls[0]


def run_functional(model, x, y, loss, steps, lr, rho, normalized=True, momentum=0.0):
    obj = Objective.from_tensors(model, loss, x, y)
    params = obj.parameters()
    velocity, norms = None, []
    for _ in range(steps):
        g = obj.grad(params)
        norms.append(norm(g))
        d = sam_gradient(obj.grad, params, g, rho, normalized)
        params, velocity = heavy_ball_update(params, d, lr, velocity, momentum)
    return list(params), norms


SETTINGS = [
    dict(lr=0.3, rho=0.05),
    dict(lr=0.3, rho=0.5, normalized=False),
    dict(lr=0.3, rho=0.1, momentum=0.9),
    dict(lr=0.3, rho=0.2, normalized=False, momentum=0.5),
    dict(lr=0.3, rho=0.0),
    dict(lr=0.3, rho=0.0, momentum=0.9),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("loss", [squared_error, cross_entropy], ids=["mse", "xent"])
def test_sam_optimizer_equals_functional_path(kw, loss):
    steps = 5
    model, x, y, loss = tiny_problem(loss=loss)
    start = [p.detach().clone() for p in model.parameters()]
    functional, f_norms = run_functional(model, x, y, loss, steps, **kw)
    # the functional path never touches the model
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))
    got, o_norms, calls = run_optimizer(model, x, y, loss, steps, **kw)
    assert calls == steps * (2 if kw["rho"] > 0 else 1)
    # the same arithmetic in the same order: bitwise equal
    for a, b in zip(got, functional):
        assert torch.equal(a, b)
    assert o_norms == f_norms
    # and the run moved the parameters
    assert max(float((a - s).abs().max()) for a, s in zip(got, start)) > 1e-3


def test_last_grad_norm_is_gradient_norm_at_w():
    model, x, y, loss = tiny_problem()
    loss(model(x), y).backward()
    expected = math.sqrt(sum(float((p.grad**2).sum()) for p in model.parameters()))
    model.zero_grad()
    opt = SAM(model.parameters(), lr=0.1, rho=0.05)
    assert opt.last_grad_norm is None

    def closure():
        opt.zero_grad()
        value = loss(model(x), y)
        value.backward()
        return value

    returned = opt.step(closure)
    assert opt.last_grad_norm == pytest.approx(expected, rel=1e-14)
    # step returns the loss at w (not at w + e)
    model2, _, _, _ = tiny_problem()
    with torch.no_grad():
        assert float(returned) == pytest.approx(float(loss(model2(x), y)), rel=1e-14)


def quadratic_closure(opt, a, b):
    """The closure of L = 1.5 a^2 + b^2 (gradient (3a, 2b))."""

    def closure():
        opt.zero_grad()
        value = (1.5 * a**2 + b**2).sum()
        value.backward()
        return value

    return closure


def test_sam_step_by_hand_on_parameters():
    a = torch.nn.Parameter(t(1.0))
    b = torch.nn.Parameter(t(2.0))
    opt = SAM([a, b], lr=0.1, rho=0.5)

    opt.step(quadratic_closure(opt, a, b))
    assert opt.last_grad_norm == pytest.approx(5.0, rel=1e-15)
    assert float(a.detach()) == pytest.approx(0.61, rel=1e-14)
    assert float(b.detach()) == pytest.approx(1.52, rel=1e-14)


def test_grad_norm_over_all_parameter_groups():
    a = torch.nn.Parameter(t(1.0))
    b = torch.nn.Parameter(t(2.0))
    opt = SAM([{"params": [a]}, {"params": [b], "lr": 0.2}], lr=0.1, rho=0.5)

    opt.step(quadratic_closure(opt, a, b))
    # e = 0.5 (3, 4) / 5 over both groups: grads at w + e = (3.9, 4.8); lrs 0.1 and 0.2
    assert opt.last_grad_norm == pytest.approx(5.0, rel=1e-15)
    assert float(a.detach()) == pytest.approx(1 - 0.39, rel=1e-14)
    assert float(b.detach()) == pytest.approx(2 - 0.96, rel=1e-14)


def test_zero_gradient_sam_optimizer_does_not_move():
    p = torch.nn.Parameter(t(1.0, -2.0))
    opt = SAM([p], lr=0.1, rho=0.5)

    def closure():
        opt.zero_grad()
        value = (0.0 * p).sum()
        value.backward()
        return value

    opt.step(closure)
    assert opt.last_grad_norm == 0.0
    assert torch.equal(p.detach(), t(1.0, -2.0))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("loss", [squared_error, cross_entropy], ids=["mse", "xent"])
def test_rho_zero_equals_sgd_bitwise(momentum, loss):
    steps = 6
    model_a, x, y, loss = tiny_problem(loss=loss)
    model_b, _, _, _ = tiny_problem(loss=loss)
    sam = SAM(model_a.parameters(), lr=0.3, rho=0.0, momentum=momentum)
    sgd = torch.optim.SGD(model_b.parameters(), lr=0.3, momentum=momentum, dampening=0.0)
    for _ in range(steps):

        def closure_a():
            sam.zero_grad()
            value = loss(model_a(x), y)
            value.backward()
            return value

        sam.step(closure_a)
        sgd.zero_grad()
        loss(model_b(x), y).backward()
        sgd.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    start, _, _, _ = tiny_problem()
    assert any(not torch.equal(a, s) for a, s in zip(model_a.parameters(), start.parameters()))


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-0.1), "lr"),
        (dict(lr=math.nan), "lr"),
        (dict(lr=0.1, rho=-0.01), "rho"),
        (dict(lr=0.1, rho=math.nan), "rho"),
        (dict(lr=0.1, momentum=1.0), "momentum"),
        (dict(lr=0.1, momentum=-0.1), "momentum"),
        (dict(lr=0.1, momentum=math.nan), "momentum"),
    ],
)
def test_bad_hyperparameters(kw, name):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=name):
        SAM([p], **kw)


def test_step_needs_closure():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="closure"):
        SAM([p], lr=0.1).step(None)
