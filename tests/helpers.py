"""Small helpers shared by the tests that compare run directories."""

import csv


def rows_without_time(path):
    """The rows of a ``metrics.csv`` as dicts of strings, without the wall-clock column."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("elapsed_s")
    return rows


def as_earlier_samedge(payload):
    """A checkpoint's payload with the update rule's state written as formats 1 and 2 of an earlier
    samedge held it: heavy-ball SGD's ``velocity`` (None without momentum) instead of ``rule`` and
    ``rule_state``.  The caller sets ``format`` and removes what that format lacked."""
    assert payload.pop("rule") == "sgd"
    state = payload.pop("rule_state")
    payload["velocity"] = state.get("velocity") if state else None
    return payload


def small_problem(seed=0):
    """A small tanh MLP with random regression data (the update-rule tests' model)."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    return model, x, y


def grad_at(model, params, x, y):
    """The mean squared error's gradient of ``model`` at ``params`` (a functional call)."""
    import torch

    names = [name for name, _ in model.named_parameters()]
    leaves = [p.detach().requires_grad_() for p in params]
    out = torch.func.functional_call(model, dict(zip(names, leaves)), (x,))
    return torch.autograd.grad(((out - y) ** 2).mean(), leaves)
