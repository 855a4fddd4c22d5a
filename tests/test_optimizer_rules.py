"""The update rules of the bases (sgd with dampening/nesterov/weight decay, adam, adamw, rmsprop)
against torch.optim step for step, their state through state_dict, and their preconditioners."""

import math

import pytest
import torch
from helpers import grad_at, small_problem

from samedge.core import UPDATE_RULES
from samedge.core.update_rules.adam import Adam
from samedge.core.update_rules.adamw import AdamW
from samedge.core.update_rules.rmsprop import RMSprop
from samedge.core.update_rules.sgd import HeavyBallSGD

pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [
    ("sgd", dict(momentum=0.9, dampening=0.5), torch.optim.SGD, dict(momentum=0.9, dampening=0.5)),
    ("sgd", dict(momentum=0.9, nesterov=True), torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
    (
        "sgd",
        dict(momentum=0.5, weight_decay=0.1, dampening=0.1),
        torch.optim.SGD,
        dict(momentum=0.5, weight_decay=0.1, dampening=0.1),
    ),
    ("sgd", dict(weight_decay=0.05), torch.optim.SGD, dict(weight_decay=0.05)),
    (
        "sgd",
        dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
        torch.optim.SGD,
        dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    ),
    ("adam", dict(), torch.optim.Adam, dict()),
    (
        "adam",
        dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01),
        torch.optim.Adam,
        dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01),
    ),
    ("adam", dict(beta1=0.0, beta2=0.9), torch.optim.Adam, dict(betas=(0.0, 0.9))),
    ("adamw", dict(), torch.optim.AdamW, dict()),
    (
        "adamw",
        dict(beta1=0.95, weight_decay=0.1, eps=1e-7),
        torch.optim.AdamW,
        dict(betas=(0.95, 0.999), weight_decay=0.1, eps=1e-7),
    ),
    ("rmsprop", dict(), torch.optim.RMSprop, dict()),
    (
        "rmsprop",
        dict(alpha=0.9, momentum=0.9, eps=1e-6, weight_decay=0.01),
        torch.optim.RMSprop,
        dict(alpha=0.9, momentum=0.9, eps=1e-6, weight_decay=0.01),
    ),
]


@pytest.mark.parametrize("name, ours, torch_class, theirs", CASES)
def test_each_rule_equals_torch_optim_over_20_steps(name, ours, torch_class, theirs):
    model, x, y = small_problem()
    lr = 0.05 if name == "sgd" else 0.01
    rule = UPDATE_RULES[name](eta=lr, **ours)
    params = tuple(p.detach().clone() for p in model.parameters())
    state = rule.init(params)
    opt = torch_class(model.parameters(), lr=lr, **theirs)
    for _ in range(20):
        params, state = rule.step(params, grad_at(model, params, x, y), state)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    for a, b in zip(params, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    # the moments the preconditioner is built from are torch's
    key = {"adam": "exp_avg_sq", "adamw": "exp_avg_sq", "rmsprop": "square_avg"}.get(name)
    if key:
        for v, p in zip(state[key], model.parameters()):
            torch.testing.assert_close(v, opt.state[p][key], rtol=1e-5, atol=1e-9)
        assert state["step"] == 20 == int(opt.state[next(model.parameters())]["step"])


def test_the_registry_holds_every_base():
    assert list(UPDATE_RULES) == ["sgd", "adam", "adamw", "rmsprop"]
    assert all(UPDATE_RULES[name].name == name for name in UPDATE_RULES)
    assert not HeavyBallSGD.preconditioned and Adam.preconditioned and AdamW.preconditioned and RMSprop.preconditioned


def test_adam_preconditioner_makes_the_step_eta_P_inverse_m():
    """``w' = w - eta P^-1 m'`` with P from the state after the step (same t, same v)."""
    model, x, y = small_problem(3)
    rule = Adam(eta=0.01, beta1=0.9, beta2=0.99, eps=1e-6)
    params = tuple(p.detach().clone() for p in model.parameters())
    state = rule.init(params)
    assert rule.preconditioner(state) is None  # no step yet: no preconditioner
    for _ in range(5):
        new, state = rule.step(params, grad_at(model, params, x, y), state)
        P = rule.preconditioner(state)
        t = state["step"]
        for w, w2, m, v, p in zip(params, new, state["exp_avg"], state["exp_avg_sq"], P):
            expected = (1 - 0.9**t) * (torch.sqrt(v.double() / (1 - 0.99**t)) + 1e-6)
            torch.testing.assert_close(p.double(), expected)
            torch.testing.assert_close(w2.double(), w.double() - 0.01 * m.double() / p.double(), rtol=1e-5, atol=1e-7)
        params = new
    rms = RMSprop(eta=0.01, alpha=0.9)
    st = rms.step(params, grad_at(model, params, x, y), rms.init(params))[1]
    torch.testing.assert_close(rms.preconditioner(st)[0], st["square_avg"][0].sqrt() + 1e-8)


def test_rule_thresholds_are_the_closed_forms():
    assert HeavyBallSGD(eta=0.01, momentum=0.9, dampening=0.5).threshold() == pytest.approx(3.8 / (0.01 * 0.5))
    assert HeavyBallSGD(eta=0.01, momentum=0.9, nesterov=True).threshold() == pytest.approx(3.8 / (0.01 * 2.8))
    assert HeavyBallSGD(eta=0.01, momentum=0.9, weight_decay=0.1).coupled_decay() == 0.1
    assert Adam(eta=0.002).threshold() == pytest.approx(19000.0)
    assert Adam(eta=0.01, beta1=0.8).threshold() == pytest.approx(3.6 / (0.2 * 0.01))
    assert AdamW(eta=0.01, weight_decay=0.1).threshold() == pytest.approx(3.8 / 0.1 / 0.01 * (1 - 0.0005))
    assert AdamW(eta=0.01).coupled_decay() == 0.0 and Adam(eta=0.1, weight_decay=0.2).coupled_decay() == 0.2
    assert RMSprop(eta=0.1, momentum=0.5).threshold() == pytest.approx(30.0)


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("sgd", dict(nesterov=True), "nesterov needs momentum > 0"),
        ("sgd", dict(momentum=0.9, nesterov=True, dampening=0.1), "nesterov needs momentum > 0 and dampening 0"),
        ("sgd", dict(dampening=1.0), "dampening must be in"),
        ("sgd", dict(weight_decay=-1.0), "weight_decay must be >= 0"),
        ("adam", dict(beta1=1.0), "beta1 must be in"),
        ("adam", dict(eps=0.0), "eps must be > 0"),
        ("adamw", dict(beta2=math.nan), "beta2 must be a finite number"),
        ("rmsprop", dict(alpha=1.5), "alpha must be in"),
    ],
)
def test_rules_refuse_bad_hyperparameters(name, bad, message):
    with pytest.raises(ValueError, match=message):
        UPDATE_RULES[name](eta=0.1, **bad)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_state_round_trips_through_state_dict(name):
    model, x, y = small_problem(4)
    rule = UPDATE_RULES[name](eta=0.01, **({"momentum": 0.9, "dampening": 0.3} if name == "sgd" else {}))
    params = tuple(p.detach().clone() for p in model.parameters())
    state = rule.init(params)
    for _ in range(3):
        params, state = rule.step(params, grad_at(model, params, x, y), state)
    loaded = rule.load_state_dict(rule.state_dict(state), params)
    a, _ = rule.step(params, grad_at(model, params, x, y), state)
    b, _ = rule.step(params, grad_at(model, params, x, y), loaded)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
