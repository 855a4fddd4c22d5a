"""Update rules: the registry, heavy-ball SGD against torch.optim.SGD and Method.update, and the
rule's state through a checkpoint (today's format and the velocity of an earlier samedge)."""

import pytest
import torch
from helpers import as_earlier_samedge, grad_at, small_problem

from samedge.core import UPDATE_RULES, HeavyBallSGD, Method, UpdateRule
from samedge.core.optim import heavy_ball_update
from samedge.experiment.store.checkpoint import (
    CHECKPOINT_NAME,
    TrainState,
    content_digest,
    load_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_registry_holds_sgd():
    assert "sgd" in UPDATE_RULES and list(UPDATE_RULES)[0] == "sgd"
    assert UPDATE_RULES["sgd"] is HeavyBallSGD and issubclass(HeavyBallSGD, UpdateRule)
    assert dict(UPDATE_RULES)["sgd"] is HeavyBallSGD
    assert all(UPDATE_RULES[name].name == name for name in UPDATE_RULES)
    with pytest.raises(KeyError, match="unknown update rule .lbfgs.; known: sgd, adam"):
        UPDATE_RULES["lbfgs"]


def test_heavy_ball_sgd_knows_its_edge_state_and_preconditioner():
    rule = HeavyBallSGD(eta=0.05, momentum=0.9)
    assert rule.threshold() == Method("gd", 0.05, momentum=0.9).gd_edge == pytest.approx((2 + 1.8) / 0.05)
    assert HeavyBallSGD(eta=0.1).threshold() == 20.0
    params = (torch.ones(2, 3), torch.ones(3))
    state = rule.init(params)
    assert set(state) == {"velocity"} and all(
        torch.equal(v, torch.zeros_like(p)) for v, p in zip(state["velocity"], params)
    )
    assert rule.preconditioner(state) is None
    assert HeavyBallSGD(eta=0.1).init(params) == {}
    for bad in (dict(eta=0.0), dict(eta=float("nan")), dict(eta=0.1, momentum=1.0), dict(eta=0.1, momentum=-0.1)):
        with pytest.raises(ValueError):
            HeavyBallSGD(**bad)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_heavy_ball_sgd_equals_torch_sgd_over_20_steps(momentum):
    model, x, y = small_problem()
    rule = Method("gd", 0.1, momentum=momentum).rule
    assert rule == HeavyBallSGD(eta=0.1, momentum=momentum)
    params = tuple(p.detach().clone() for p in model.parameters())
    state = rule.init(params)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    for _ in range(20):
        params, state = rule.step(params, grad_at(model, params, x, y), state)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    for ours, theirs in zip(params, model.parameters()):
        torch.testing.assert_close(ours, theirs.detach())
    if momentum:
        for v, p in zip(state["velocity"], model.parameters()):
            torch.testing.assert_close(v, opt.state[p]["momentum_buffer"])


def test_the_step_is_pure_and_is_heavy_ball_update():
    model, x, y = small_problem(1)
    params = tuple(p.detach().clone() for p in model.parameters())
    d = grad_at(model, params, x, y)
    rule = HeavyBallSGD(eta=0.1, momentum=0.9)
    state = {"velocity": tuple(torch.full_like(p, 0.5) for p in params)}
    kept = [t.clone() for t in (*params, *d, *state["velocity"])]
    new, new_state = rule.step(params, d, state)
    assert all(torch.equal(a, b) for a, b in zip((*params, *d, *state["velocity"]), kept))
    expected, velocity = heavy_ball_update(params, d, 0.1, state["velocity"], 0.9)
    assert all(torch.equal(a, b) for a, b in zip(new, expected))
    assert all(torch.equal(a, b) for a, b in zip(new_state["velocity"], velocity))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_method_update_keeps_its_velocity_api(momentum):
    """``Method.update(params, direction, velocity)``: the rule's step with its state as a velocity."""
    model, x, y = small_problem(2)
    method = Method("sam", 0.1, 0.05, momentum)
    params, velocity = tuple(p.detach().clone() for p in model.parameters()), None
    ours, state = params, method.rule.init(params)
    for _ in range(3):
        d = grad_at(model, params, x, y)
        params, velocity = method.update(params, d, velocity)
        expected, _ = heavy_ball_update(ours, d, 0.1, state.get("velocity"), momentum)
        ours, state = method.rule.step(ours, d, state)
        assert all(torch.equal(a, b) for a, b in zip(params, ours))
        assert all(torch.equal(a, b) for a, b in zip(params, expected))
        assert (velocity is None) == (momentum == 0.0)


def test_load_state_dict_checks_and_places():
    rule = HeavyBallSGD(eta=0.1, momentum=0.9)
    params = (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    saved = {"velocity": [torch.ones(2, 3), torch.ones(3)]}  # float32, as a checkpoint might hold
    state = rule.load_state_dict(saved, params)
    assert isinstance(state["velocity"], tuple) and all(v.dtype == torch.float64 for v in state["velocity"])
    assert rule.load_state_dict(None, params)["velocity"][0].abs().sum() == 0  # None: the initial state
    with pytest.raises(ValueError, match="does not match the parameters' shapes"):
        rule.load_state_dict({"velocity": [torch.ones(3, 2), torch.ones(3)]}, params)
    with pytest.raises(ValueError, match="state has"):
        rule.load_state_dict({}, params)
    with pytest.raises(ValueError, match="state has"):
        HeavyBallSGD(eta=0.1).load_state_dict(saved, params)


CONFIG = {"task": "toy", "eta": 0.1, "momentum": 0.9}


def train_state(params, rule_state, rule="sgd"):
    return TrainState(
        step=7,
        params=params,
        rule_state=rule_state,
        rule=rule,
        solver={"previous": None},
        perturbed_solver=None,
        elapsed=1.5,
    )


def test_the_rules_state_round_trips_through_the_checkpoint(tmp_path):
    model, x, y = small_problem(3)
    rule = HeavyBallSGD(eta=0.1, momentum=0.9)
    params = tuple(p.detach().clone() for p in model.parameters())
    state = rule.init(params)
    for _ in range(3):
        params, state = rule.step(params, grad_at(model, params, x, y), state)
    save_checkpoint(tmp_path, CONFIG, train_state(params, rule.state_dict(state)))
    payload = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert payload["format"] == 3 and payload["rule"] == "sgd" and "velocity" not in payload
    loaded = load_checkpoint(tmp_path, CONFIG, params)
    assert loaded.rule == "sgd" and loaded.step == 7
    restored = rule.load_state_dict(loaded.rule_state, loaded.params)
    assert all(torch.equal(a, b) for a, b in zip(restored["velocity"], state["velocity"]))
    # and the run continues as if it had never stopped
    d = grad_at(model, params, x, y)
    assert all(
        torch.equal(a, b) for a, b in zip(rule.step(params, d, state)[0], rule.step(loaded.params, d, restored)[0])
    )


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("stepped", [True, False])
def test_a_velocity_checkpoint_of_an_earlier_samedge_loads_as_sgd_state(tmp_path, fmt, stepped):
    """Formats 1 and 2 held a heavy-ball ``velocity`` (None before the first step): it is read as
    the state of the ``"sgd"`` rule."""
    rule = HeavyBallSGD(eta=0.1, momentum=0.9)
    params = (torch.randn(2, 3), torch.randn(3))
    state = {"velocity": (torch.randn(2, 3), torch.randn(3))} if stepped else rule.init(params)
    save_checkpoint(tmp_path, CONFIG, train_state(params, rule.state_dict(state)))
    path = tmp_path / CHECKPOINT_NAME
    payload = as_earlier_samedge(torch.load(path, weights_only=True))
    if not stepped:
        payload["velocity"] = None
    del payload["digest"]
    payload["format"] = fmt
    if fmt == 2:
        payload["digest"] = content_digest(payload)
    else:
        del payload["metrics"]
    torch.save(payload, path)
    loaded = load_checkpoint(tmp_path, CONFIG, params)
    assert loaded.rule == "sgd"
    assert (loaded.rule_state is None) == (not stepped)
    restored = rule.load_state_dict(loaded.rule_state, loaded.params)
    assert all(torch.equal(a, b) for a, b in zip(restored["velocity"], state["velocity"]))
