"""Objective (loss, gradient, exact HVP) and HessianEigensolver against dense autograd Hessians."""

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from samedge.core.curvature import METHODS, HessianEigensolver, hessian_eigenpairs
from samedge.core.losses import LOSSES, count_correct, cross_entropy, get_loss, squared_error
from samedge.core.objective import HVP_MODES, Objective
from samedge.core.params import flatten, unflatten
from samedge.models import MLP

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # torch.func's first call inside torch itself
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


N, IN, WIDTH, DEPTH, CLASSES = 10, 5, 7, 3, 3
NUM_PARAMS = IN * WIDTH + WIDTH + WIDTH * WIDTH + WIDTH + WIDTH * CLASSES + CLASSES  # 122
LOSS_FNS = {"mse": squared_error, "xent": cross_entropy}


def make_model(activation="tanh", seed=0):
    torch.manual_seed(seed)
    return MLP((IN,), CLASSES, width=WIDTH, depth=DEPTH, activation=activation).double()


def make_data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return x, y


def make_objective(loss="mse", activation="tanh", chunk_size=None, hvp_mode="double-backward"):
    x, y = make_data()
    return Objective.from_tensors(
        make_model(activation), LOSS_FNS[loss], x, y, chunk_size=chunk_size, hvp_mode=hvp_mode
    )


@functools.cache
def dense(loss="mse", activation="tanh"):
    """Gradient and Hessian of the full-batch loss as a function of the flat parameter vector."""
    model = make_model(activation)
    x, y = make_data()
    names = [n for n, _ in model.named_parameters()]
    shapes = tuple(p.detach().clone() for p in model.parameters())
    flat0 = flatten(shapes)

    def f(flat):
        params = unflatten(flat, shapes)
        return LOSS_FNS[loss](functional_call(model, dict(zip(names, params)), (x,)), y)

    H = torch.autograd.functional.hessian(f, flat0, vectorize=True)
    flat = flat0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(flat), flat)
    assert H.shape == (NUM_PARAMS, NUM_PARAMS)
    assert torch.allclose(H, H.T, atol=1e-12)
    return flat0, g, H


def random_vector(params, seed=2):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params)


def assert_close(a, b, rel):
    a, b = flatten(a) if isinstance(a, tuple) else a, flatten(b) if isinstance(b, tuple) else b
    err = float(torch.linalg.vector_norm(a - b))
    assert err <= rel * float(torch.linalg.vector_norm(b)), err


# --- losses by hand -------------------------------------------------------------------------


def test_squared_error_by_hand():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    total = 0.0
    for i in range(4):
        for c in range(3):
            target = 1.0 if labels[i] == c else 0.0
            total += (float(out[i, c]) - target) ** 2
    assert float(squared_error(out, labels)) == pytest.approx(total / 12, rel=1e-14)


def test_cross_entropy_by_hand_and_sequences():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)  # (batch, positions, classes)
    labels = torch.tensor([[0, 3, 1], [2, 2, 0]])
    total = 0.0
    for b in range(2):
        for t in range(3):
            logits = [float(v) for v in out[b, t]]
            total += math.log(sum(math.exp(v) for v in logits)) - logits[int(labels[b, t])]
    assert float(cross_entropy(out, labels)) == pytest.approx(total / 6, rel=1e-14)


def test_get_loss_and_count_correct():
    assert get_loss("mse") is squared_error
    assert get_loss("xent") is cross_entropy
    assert set(LOSSES) == {"mse", "xent"}
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")
    out = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]])
    assert count_correct(out, torch.tensor([1, 0, 0])) == 2
    assert count_correct(out, torch.zeros(3, 2)) is None  # float targets
    assert count_correct(out, torch.tensor([[1, 0, 0]])) is None  # wrong shape


# --- loss and gradient ----------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "xent"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_loss_and_grad_equal_autograd(loss, activation, chunk_size):
    obj = make_objective(loss, activation, chunk_size)
    x, y = make_data()
    model = make_model(activation)
    out = model(x)
    ref_loss = LOSS_FNS[loss](out, y)
    ref_loss.backward()
    ev = obj.loss_and_grad(obj.parameters())
    assert ev.loss == pytest.approx(float(ref_loss.detach()), rel=1e-13)
    assert ev.accuracy == float((out.argmax(-1) == y).sum()) / N
    for g, p in zip(ev.grad, model.parameters()):
        assert g.shape == p.shape and g.dtype == torch.float64
        assert torch.allclose(g, p.grad, rtol=1e-11, atol=1e-14)
    # evaluate gives the same loss and accuracy, without a gradient
    ev2 = obj.evaluate(obj.parameters())
    assert ev2.loss == pytest.approx(ev.loss, rel=1e-13)
    assert ev2.accuracy == ev.accuracy
    assert ev2.grad is None
    # grad() is loss_and_grad().grad
    assert all(torch.equal(a, b) for a, b in zip(obj.grad(obj.parameters()), ev.grad))


def test_loss_and_grad_at_other_params_does_not_touch_model():
    obj = make_objective("xent", chunk_size=4)
    params = obj.parameters()
    moved = tuple(p + 0.1 for p in params)
    before = [p.detach().clone() for p in obj.model.parameters()]
    flat0, _, _ = dense("xent")
    ev = obj.loss_and_grad(moved)
    assert all(torch.equal(a, b) for a, b in zip(before, obj.model.parameters()))
    assert all(p.grad is None for p in obj.model.parameters())
    # the gradient at the moved point by an independent route
    model = make_model()
    x, y = make_data()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    cross_entropy(model(x), y).backward()
    assert_close(ev.grad, tuple(p.grad for p in model.parameters()), 1e-12)


def test_grad_matches_dense():
    for loss in ("mse", "xent"):
        obj = make_objective(loss)
        _, g, _ = dense(loss)
        assert_close(flatten(obj.grad(obj.parameters())), g, 1e-12)


# --- Hessian-vector products ----------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "xent"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("hvp_mode", HVP_MODES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_hvp_equals_dense_hessian(loss, activation, hvp_mode, chunk_size):
    obj = make_objective(loss, activation, chunk_size, hvp_mode)
    _, _, H = dense(loss, activation)
    params = obj.parameters()
    for seed in (2, 3):
        v = random_vector(params, seed)
        hv = obj.hvp(params, v)
        assert all(h.shape == p.shape for h, p in zip(hv, params))
        assert_close(flatten(hv), H @ flatten(v), 1e-10)


def test_hvp_modes_agree_and_chunks_agree():
    params = make_objective("mse").parameters()
    v = random_vector(params)
    results = [
        make_objective("mse", chunk_size=cs, hvp_mode=m).hvp(params, v) for m in HVP_MODES for cs in (None, 3, 4, 1)
    ]
    for hv in results[1:]:
        assert_close(hv, results[0], 1e-12)


@pytest.mark.parametrize("loss", ["mse", "xent"])
def test_chunked_equals_unchunked(loss):
    whole = make_objective(loss)
    chunked = make_objective(loss, chunk_size=3)
    assert [len(x) for x, _ in chunked.chunks] == [3, 3, 3, 1]
    assert chunked.weights == pytest.approx([0.3, 0.3, 0.3, 0.1], rel=1e-15)
    assert len(whole.chunks) == 1
    params = whole.parameters()
    a, b = whole.loss_and_grad(params), chunked.loss_and_grad(params)
    assert b.loss == pytest.approx(a.loss, rel=1e-13)
    assert b.accuracy == a.accuracy
    assert_close(b.grad, a.grad, 1e-12)
    v = random_vector(params)
    assert_close(chunked.hvp(params, v), whole.hvp(params, v), 1e-12)
    assert chunked.evaluate(params).loss == pytest.approx(a.loss, rel=1e-13)


@pytest.mark.parametrize("loss", ["mse", "xent"])
def test_finite_difference_hvp_close_to_exact(loss):
    obj = make_objective(loss, "tanh")
    params = obj.parameters()
    v = random_vector(params)
    exact = obj.hvp(params, v)
    # default eps = 1e-3 (the paper's): error O(eps^2) relative
    assert_close(obj.finite_difference_hvp(params, v), exact, 1e-3)
    assert_close(obj.finite_difference_hvp(params, v, eps=1e-4), exact, 1e-5)

    # error is O(eps^2): a smaller eps is closer, but not exact
    def err(eps):
        return float(torch.linalg.vector_norm(flatten(obj.finite_difference_hvp(params, v, eps)) - flatten(exact)))

    assert err(1e-4) < err(1e-3) / 10
    assert err(1e-3) > 0


def test_objective_errors():
    x, y = make_data()
    model = make_model()
    with pytest.raises(ValueError, match="at least one chunk"):
        Objective(model, squared_error, [])
    with pytest.raises(ValueError, match="hvp_mode"):
        Objective(model, squared_error, [(x, y)], hvp_mode="finite-difference")
    with pytest.raises(ValueError, match="chunk_size"):
        Objective.from_tensors(model, squared_error, x, y, chunk_size=0)
    assert len(Objective.from_tensors(model, squared_error, x, y, chunk_size=N).chunks) == 1


# --- Hessian eigen-solver -------------------------------------------------------------------


def dense_top(loss, k):
    _, _, H = dense(loss)
    vals = torch.linalg.eigvalsh(H).numpy()[::-1]
    return vals[:k], vals


def hvp_counter(obj):
    """Wrap obj.hvp to count calls."""
    calls = [0]
    original = obj.hvp

    def counted(params, vector):
        calls[0] += 1
        return original(params, vector)

    obj.hvp = counted
    return calls


@pytest.mark.parametrize("loss", ["mse", "xent"])
@pytest.mark.parametrize("method,k", [("lanczos", 1), ("lanczos", 2), ("eigsh", 1), ("eigsh", 2), ("power", 1)])
def test_hessian_eigensolver_top_eigenvalue(loss, method, k):
    top, spectrum = dense_top(loss, k)
    if method == "power":
        # power iteration finds the largest magnitude: it must be the top one here
        assert spectrum[0] > abs(spectrum[-1])
    obj = make_objective(loss)
    calls = hvp_counter(obj)
    solver = HessianEigensolver(k=k, method=method, tol=1e-8, max_iter=2000 if method == "power" else 100)
    result = solver(obj, obj.parameters())
    assert result.converged
    assert result.matvecs == calls[0]
    assert result.eigenvalues.shape == (k,)
    assert np.allclose(result.eigenvalues, top, rtol=1e-7, atol=0)
    # eigenvectors are eigenvectors of the dense Hessian
    _, _, H = dense(loss)
    for lam, v in zip(result.eigenvalues, result.eigenvectors):
        assert float(torch.linalg.vector_norm(H @ v - lam * v)) <= 1e-6 * top[0]


@pytest.mark.parametrize("loss", ["mse", "xent"])
@pytest.mark.parametrize("method,k", [("lanczos", 1), ("lanczos", 2), ("power", 1)])
def test_warm_start_uses_fewer_hvps(loss, method, k):
    obj = make_objective(loss)
    params = obj.parameters()
    solver = HessianEigensolver(k=k, method=method, tol=1e-8, max_iter=2000)
    first = solver(obj, params)
    assert solver.previous is not None and solver.previous.shape == (k, NUM_PARAMS)
    # same point: the previous eigenvectors are (nearly) exact
    again = solver(obj, params)
    assert again.matvecs <= k + 2 < first.matvecs
    assert np.allclose(again.eigenvalues, first.eigenvalues, rtol=1e-8)
    # a nearby point (one small gradient step): still far fewer than a cold start
    grad = obj.grad(params)
    moved = tuple(p - 1e-3 * g for p, g in zip(params, grad))
    cold = hessian_eigenpairs(obj, moved, k=k, method=method, tol=1e-8, max_iter=2000)
    warm = solver(obj, moved)
    assert warm.converged and cold.converged
    assert warm.matvecs < cold.matvecs
    assert np.allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-7)


def test_no_warm_start_keeps_nothing_and_paper_is_never_warm():
    obj = make_objective()
    solver = HessianEigensolver(tol=1e-8, warm_start=False)
    a = solver(obj, obj.parameters())
    b = solver(obj, obj.parameters())
    assert solver.previous is None
    assert a.matvecs > 2 and b.matvecs > 2
    paper = HessianEigensolver(method="paper", warm_start=True)
    assert paper.warm_start is False
    r = paper(obj, obj.parameters())
    assert paper.previous is None
    top, _ = dense_top("mse", 1)
    assert r.eigenvalues[0] == pytest.approx(top[0], rel=0.05)
    assert r.method == "paper-power"


def test_state_dict_round_trip():
    obj = make_objective("xent")
    params = obj.parameters()
    solver = HessianEigensolver(k=2, tol=1e-8, seed=5)
    solver(obj, params)
    state = solver.state_dict()
    assert torch.equal(state["previous"], solver.previous)
    moved = tuple(p + 1e-3 for p in params)
    restored = HessianEigensolver(k=2, tol=1e-8, seed=99)
    restored.load_state_dict(state)
    a, b = solver(obj, moved), restored(obj, moved)
    assert np.array_equal(a.eigenvalues, b.eigenvalues)
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.matvecs == b.matvecs
    # the generator state travels too: cold solvers with restored state agree bitwise
    cold1 = HessianEigensolver(tol=1e-6, warm_start=False, seed=1)
    cold1(obj, params)
    cold2 = HessianEigensolver(tol=1e-6, warm_start=False, seed=2)
    cold2.load_state_dict(cold1.state_dict())
    r1, r2 = cold1(obj, moved), cold2(obj, moved)
    assert np.array_equal(r1.eigenvalues, r2.eigenvalues) and r1.matvecs == r2.matvecs


def test_block_kept_for_the_next_start_matches_the_dense_hessian():
    obj = make_objective()
    params = obj.parameters()
    solver = HessianEigensolver(k=1, tol=1e-8, block=3)
    first = solver(obj, params)
    assert solver.previous is not None and solver.previous.shape == (3, NUM_PARAMS)
    top, _ = dense_top("mse", 1)
    assert first.eigenvalues[0] == pytest.approx(top[0], rel=1e-7)
    # the next solve starts from the block: at a nearby point it agrees with a cold solve
    grad = obj.grad(params)
    moved = tuple(p - 1e-3 * g for p, g in zip(params, grad))
    warm = solver(obj, moved)
    cold = hessian_eigenpairs(obj, moved, tol=1e-8)
    assert warm.converged and warm.eigenvalues[0] == pytest.approx(cold.eigenvalues[0], rel=1e-7)
    assert HessianEigensolver(k=2, block=1).block == 2  # never fewer than k
    assert HessianEigensolver(method="eigsh", block=3).block == 1  # lanczos only


def test_eigensolver_errors():
    assert set(METHODS) == {"lanczos", "eigsh", "power", "paper-power", "paper"}
    with pytest.raises(ValueError, match="block must be"):
        HessianEigensolver(block=0)
    with pytest.raises(ValueError, match="unknown eigen-solver"):
        HessianEigensolver(method="arnoldi")
    with pytest.raises(ValueError, match="k must be"):
        HessianEigensolver(k=0)
    for method in ("power", "paper"):
        with pytest.raises(ValueError, match="one eigenvalue"):
            HessianEigensolver(k=2, method=method)


# ---------------------------------------------------------------- graph reuse within a reading


def _reuse_problem(dropout=False):
    torch.manual_seed(5)
    layers = [nn.Linear(6, 9), nn.Tanh()] + ([nn.Dropout(0.3)] if dropout else []) + [nn.Linear(9, 3)]
    model = nn.Sequential(*layers).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    return model, x, y


def _dense_hessian(model, x, y, params, mode=None):
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss_of(f):
        ps, i = [], 0
        for p in params:
            ps.append(f[i : i + p.numel()].view_as(p))
            i += p.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

    return torch.autograd.functional.hessian(loss_of, flat)


@pytest.mark.parametrize("chunk_size, budget", [(None, 1 << 30), (13, 1 << 30), (13, 0), (13, "one")])
def test_reused_graph_hvps_match_the_dense_hessian(chunk_size, budget):
    model, x, y = _reuse_problem()
    if budget == "one":  # room for the first chunk's graph only: the others are rebuilt each time
        first = Objective(model, nn.CrossEntropyLoss(), [(x[:13], y[:13])])
        ps = first.parameters()
        first.hvp(ps, tuple(torch.ones_like(p) for p in ps))
        budget = first.hvp_graph_bytes
        assert budget > 0
    obj = Objective.from_tensors(model, nn.CrossEntropyLoss(), x, y, chunk_size, hvp_graph_budget=budget)
    params = obj.parameters()
    H = _dense_hessian(model, x, y, params)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):  # the first product builds the graphs, the others reuse what was kept
        v = torch.randn(H.shape[0], generator=gen, dtype=torch.float64)
        hv = flatten(obj.hvp(params, unflatten(v, params)))
        torch.testing.assert_close(hv, H @ v, rtol=1e-10, atol=1e-12)
    assert obj.hvp_graph_bytes <= obj.hvp_graph_budget
    kept = len(obj._graphs)
    if budget == 0:
        assert kept == 0 and obj.hvp_graph_bytes == 0
    elif chunk_size is None or budget == 1 << 30:
        assert kept == len(obj.chunks) and obj.hvp_graph_bytes > 0
    else:
        assert kept == 1
    obj.release_hvp_graph()
    assert obj.hvp_graph_bytes == 0 and not obj._graphs


def test_reused_graph_follows_parameter_changes_and_keeps_dropout_masks():
    model, x, y = _reuse_problem(dropout=True)
    obj = Objective.from_tensors(model, nn.CrossEntropyLoss(), x, y, None, mode="train")
    fresh = Objective.from_tensors(model, nn.CrossEntropyLoss(), x, y, None, mode="train", hvp_graph_budget=0)
    params = obj.parameters()
    v = tuple(torch.randn_like(p) for p in params)
    first = obj.hvp(params, v)
    # dropout: the kept graph holds the same masks a freshly built one draws (seeded per chunk)
    for a, b in zip(obj.hvp(params, v), fresh.hvp(params, v)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(first, fresh.hvp(params, v)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # an in-place change of the parameters invalidates the kept graph
    with torch.no_grad():
        params[0].mul_(1.5)
    for a, b in zip(obj.hvp(params, v), fresh.hvp(params, v)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # new parameter tensors too
    moved = tuple(p + 0.1 for p in params)
    for a, b in zip(obj.hvp(moved, v), fresh.hvp(moved, v)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_hvp_operator_and_the_eigensolver_release_the_graph():
    model, x, y = _reuse_problem()
    obj = Objective.from_tensors(model, nn.CrossEntropyLoss(), x, y, 16)
    params = obj.parameters()
    H = _dense_hessian(model, x, y, params)
    matvec = obj.hvp_operator(params)
    v = torch.linspace(-1, 1, H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    assert obj.hvp_graph_bytes > 0
    result = HessianEigensolver(tol=1e-9)(obj, params)
    assert obj.hvp_graph_bytes == 0  # a reading never leaves its graph behind
    assert math.isclose(float(result.eigenvalues[0]), float(torch.linalg.eigvalsh(H)[-1]), rel_tol=1e-8)


def test_hvp_graph_budget_must_be_non_negative():
    model, x, y = _reuse_problem()
    with pytest.raises(ValueError, match="hvp_graph_budget"):
        Objective.from_tensors(model, nn.CrossEntropyLoss(), x, y, None, hvp_graph_budget=-1)
