"""SharpnessTracker.measure(optimizer=opt) for torch.optim SGD (nesterov, dampening, weight decay),
Adam, AdamW, RMSprop and SAM over them: the preconditioned and effective sharpness against dense
Hessians and the optimizer's own state."""

import math

import pytest
import torch

from samedge import SAM, SharpnessTracker
from samedge.core.method import Method

pytestmark = pytest.mark.usefixtures("one_thread")


def problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    x, y = torch.randn(24, 4, dtype=torch.float64), torch.randn(24, 2, dtype=torch.float64)
    return model, x, y


def loss_fn(out, y):
    return ((out - y) ** 2).mean()


def dense(model, x, y):
    """Gradient and Hessian of the loss in the flat parameters (independent of samedge)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            parts[n] = flat[i : i + k].view(s)
            i += k
        return loss_fn(torch.func.functional_call(model, parts, (x,)), y)

    g = torch.autograd.functional.jacobian(f, flat0)
    return g, torch.autograd.functional.hessian(f, flat0)


def top(matrix):
    return float(torch.linalg.eigvalsh((matrix + matrix.T) / 2)[-1])


def train(opt, model, x, y, steps=30, sam=False):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if sam:
            opt.step(lambda: loss_fn(model(x), y).backward())
        else:
            opt.step()


def tracker_for(model, x, y):
    return SharpnessTracker(model, loss_fn, (x, y), tol=1e-9, max_iter=200)


def adam_p(opt, model, beta1, beta2, eps):
    parts = []
    for p in model.parameters():
        st = opt.state[p]
        t = int(st["step"])
        parts.append((1 - beta1**t) * (torch.sqrt(st["exp_avg_sq"] / (1 - beta2**t)) + eps).reshape(-1))
    return torch.cat(parts)


def test_a_users_adamw_loop_gets_its_preconditioned_sharpness_against_its_edge():
    model, x, y = problem()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    train(opt, model, x, y)
    m = tracker_for(model, x, y).measure(optimizer=opt)
    _, H = dense(model, x, y)
    r = adam_p(opt, model, 0.9, 0.99, 1e-6).rsqrt()
    expected = top(r[:, None] * H * r[None, :])
    assert m.preconditioned_sharpness == pytest.approx(expected, rel=1e-6)
    assert m.sharpness == pytest.approx(top(H), rel=1e-6)
    edge = (2 + 1.8) / (0.1 * 0.01) * (1 - 0.01 * 0.1 / 2)  # AdamW: Adam's edge times 1 - eta lambda / 2
    assert m.edge == pytest.approx(edge) and m.gd_edge == pytest.approx(edge)
    assert m.sharpness_over_edge == pytest.approx(expected / edge, rel=1e-6)
    assert m.effective_sharpness is None and m.preconditioned_hvps > 0


def test_sam_over_adam_compares_the_effective_operator_with_two_hvps_per_product():
    model, x, y = problem(1)
    opt = SAM(model.parameters(), torch.optim.Adam, lr=0.01, rho=0.05, weight_decay=0.01)
    train(opt, model, x, y, sam=True)
    m = tracker_for(model, x, y).measure(optimizer=opt)
    g, H = dense(model, x, y)
    s = 0.05 / float(g.norm())
    r = adam_p(opt.base_optimizer, model, 0.9, 0.999, 1e-8).rsqrt()
    J = H + s * H @ H + 0.01 * torch.eye(len(g), dtype=H.dtype)
    assert m.effective_sharpness == pytest.approx(top(r[:, None] * J * r[None, :]), rel=1e-6)
    P = r[:, None] * (H + 0.01 * torch.eye(len(g), dtype=H.dtype)) * r[None, :]
    assert m.preconditioned_sharpness == pytest.approx(top(P), rel=1e-6)
    assert m.edge == pytest.approx(38 / 0.01)
    assert m.sharpness_over_edge == pytest.approx(m.effective_sharpness / m.edge)
    assert m.effective_hvps % 2 == 0 and m.effective_hvps > 0


def test_rmsprop_preconditioner_is_sqrt_v_plus_eps():
    model, x, y = problem(2)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.001, momentum=0.5, alpha=0.9)
    train(opt, model, x, y, steps=10)
    m = tracker_for(model, x, y).measure(optimizer=opt)
    _, H = dense(model, x, y)
    P = torch.cat([(opt.state[p]["square_avg"].sqrt() + 1e-8).reshape(-1) for p in model.parameters()])
    r = P.rsqrt()
    assert m.preconditioned_sharpness == pytest.approx(top(r[:, None] * H * r[None, :]), rel=1e-6)
    assert m.edge == pytest.approx(3.0 / 0.001)


def test_sgd_nesterov_with_weight_decay_and_sam_over_it():
    model, x, y = problem(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)
    train(opt, model, x, y, steps=5)
    tracker = tracker_for(model, x, y)
    m = tracker.measure(optimizer=opt)
    _, H = dense(model, x, y)
    c = 3.8 / (0.05 * 2.8)
    assert m.edge == pytest.approx(c - 0.1)  # on H: top eigenvalue of H + lambda I below c
    assert m.sharpness_over_edge == pytest.approx(top(H) / (c - 0.1), rel=1e-6)
    assert m.preconditioned_sharpness is None
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.05, rho=0.1, momentum=0.9, dampening=0.5)
    g, _ = dense(model, x, y)
    m = tracker.measure(optimizer=sam)
    c = 3.8 / (0.05 * 0.5)
    lam = m.edge
    assert lam * (1 + 0.1 * lam / float(g.norm())) == pytest.approx(c)


def test_before_the_first_step_there_is_no_preconditioner():
    model, x, y = problem(4)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    m = tracker_for(model, x, y).measure(optimizer=opt)
    assert math.isnan(m.preconditioned_sharpness) and math.isnan(m.sharpness_over_edge)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: torch.optim.Adam(p, amsgrad=True), "amsgrad=True cannot be linearised"),
        (lambda p: torch.optim.RMSprop(p, centered=True), "centered=True cannot be linearised"),
        (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "maximize=True cannot be linearised"),
        (lambda p: torch.optim.LBFGS(p), "not of LBFGS"),
        (lambda p: torch.optim.Adagrad(p), "not of Adagrad"),
    ],
)
def test_what_cannot_be_linearised_is_refused_with_the_reason(make, message):
    model, x, y = problem()
    with pytest.raises(ValueError, match=message):
        tracker_for(model, x, y).measure(optimizer=make(model.parameters()))


def test_groups_with_different_betas_are_refused():
    model, x, y = problem()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = torch.optim.Adam([{"params": first}, {"params": second, "betas": (0.8, 0.999)}], lr=0.01)
    with pytest.raises(ValueError, match="param groups differ"):
        Method.from_optimizer(opt)
