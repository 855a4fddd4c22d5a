"""SharpnessTracker, Objective and SAM on models as people train them, against dense float64
Hessians over the trainable parameters: frozen layers, dropout, BatchNorm, losses with their own
normaliser in chunks, unused parameters, tuple and dict outputs, minibatches, SAM over SGD with
weight decay and over AdamW against hand-written steps."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samedge import SAM, Method, Objective, SharpnessTracker, SummedLoss, sam_edge
from samedge.core.curvature import hessian_eigenpairs
from samedge.core.objective import _chunk_seed, frozen_rng
from samedge.core.params import flatten

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

N = 48
G = torch.Generator().manual_seed(0)
X = torch.randn(N, 5, generator=G, dtype=torch.float64)
Y = torch.randn(N, 1, generator=G, dtype=torch.float64)
LABELS = torch.arange(N) * 4 // N  # class-sorted: 4 classes of 12


def mlp(out=1, *middle, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), *middle, nn.Tanh(), nn.Linear(6, out)).double()


def dense(model, loss_fn, x, y, seed=None, eval_mode=False):
    """Gradient and Hessian of ``loss_fn(model(x), y)`` over the parameters with requires_grad,
    by torch.autograd.functional on a copy (its buffers are the copy's); ``seed`` seeds the global
    generator for the one forward pass (dropout masks)."""
    m = copy.deepcopy(model)
    if eval_mode:
        m.eval()
    named = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
    names, shapes = list(named), [p.shape for p in named.values()]

    def f(flat):
        pieces, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            pieces[n] = flat[i : i + k].view(s)
            i += k
        if seed is not None:
            torch.manual_seed(seed)
        return loss_fn(torch.func.functional_call(m, pieces, (x,)), y)

    flat = torch.cat([p.reshape(-1) for p in named.values()])
    with torch.random.fork_rng():
        H = torch.autograd.functional.hessian(f, flat)
        leaf = flat.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(leaf), leaf)
    return g, H


def top(H):
    return float(torch.linalg.eigvalsh(H)[-1])


# --- trainable parameters only ------------------------------------------------------------


def test_frozen_layer_hessian_and_grad_norm_over_trainable_parameters_and_sam_agrees():
    model = mlp()
    model[0].requires_grad_(False)
    mse = nn.MSELoss()
    g, H = dense(model, mse, X, Y)
    assert H.shape == (6 + 1, 6 + 1)  # the last layer only
    m = SharpnessTracker(model, mse, (X, Y), tol=1e-10).measure(eta=0.05, rho=0.05)
    assert m.sharpness == pytest.approx(top(H), rel=1e-9)
    assert m.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
    # SAM over the same model sees the same gradient (frozen parameters have none)
    opt = SAM(model.parameters(), lr=0.05, rho=0.05)

    def closure():
        opt.zero_grad()
        loss = mse(model(X), Y)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.last_grad_norm == pytest.approx(m.grad_norm, rel=1e-12)
    assert m.edge == pytest.approx(sam_edge(0.05, 0.05, opt.last_grad_norm), rel=1e-12)


def test_unused_parameter_left_out_with_one_warning():
    model = mlp()
    model.spare = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    tracker = SharpnessTracker(model, nn.MSELoss(), (X, Y), tol=1e-10)
    with pytest.warns(UserWarning, match="spare are not used"):
        m = tracker.measure(eta=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = tracker.measure(eta=0.05)  # said once
    used = nn.Sequential(*list(model.children()))
    g, H = dense(used, nn.MSELoss(), X, Y)
    assert m.sharpness == pytest.approx(top(H), rel=1e-9)
    assert again.sharpness == pytest.approx(top(H), rel=1e-9)
    assert m.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
    # the Objective itself: zero gradient and zero Hessian rows, and it names the parameter
    obj = Objective(model, nn.MSELoss(), [(X, Y)])
    grad = obj.grad(obj.parameters())
    i = obj.names.index("spare")
    assert obj.unused == ("spare",) and torch.equal(grad[i], torch.zeros(3, dtype=torch.float64))
    v = tuple(torch.ones_like(p) for p in obj.parameters())
    assert torch.equal(obj.hvp(obj.parameters(), v)[i], torch.zeros(3, dtype=torch.float64))


# --- dropout and batchnorm --------------------------------------------------------------------


def test_dropout_frozen_within_a_reading_seeded_by_the_tracker_and_rng_untouched():
    model = mlp(1, nn.Dropout(0.3))
    mse = nn.MSELoss()
    torch.manual_seed(5)
    tracker = SharpnessTracker(model, mse, (X, Y), tol=1e-10, seed=3)
    state = torch.get_rng_state()
    a = tracker.measure(eta=0.05)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    torch.manual_seed(9)
    b = SharpnessTracker(model, mse, (X, Y), tol=1e-10, seed=3).measure(eta=0.05)
    assert a.sharpness == b.sharpness and a.converged and a.hvp_consistent
    # the reading is the Hessian of the function with one fixed set of masks: that of the
    # reading's seed (the seed of chunk 0 of the objective)
    obj = Objective(model, mse, [(X, Y)], seed=11)
    got = hessian_eigenpairs(obj, obj.parameters(), tol=1e-10).eigenvalues[0]
    _, H = dense(model, mse, X, Y, seed=_chunk_seed(11, 0))
    assert got == pytest.approx(top(H), rel=1e-9)
    _, H_eval = dense(model, mse, X, Y, eval_mode=True)
    assert abs(top(H) / top(H_eval) - 1) > 1e-3  # the masks matter
    # mode="eval": the deterministic eval-mode function; the module's flags are restored
    m = SharpnessTracker(model, mse, (X, Y), tol=1e-10, mode="eval").measure(eta=0.05)
    assert m.sharpness == pytest.approx(top(H_eval), rel=1e-9)
    assert all(mod.training for mod in model.modules())


def test_frozen_rng_restores_the_callers_state():
    torch.manual_seed(1)
    before = torch.get_rng_state()
    with frozen_rng(42, torch.device("cpu")):
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(42)
    assert torch.equal(inside, torch.rand(3))


class NumpyNoise(nn.Module):
    """A layer with randomness samedge does not control (NumPy's global generator)."""

    def forward(self, x):
        return x * torch.as_tensor(np.random.uniform(0.5, 1.5, x.shape[-1]), dtype=x.dtype)


def test_uncontrolled_randomness_is_never_reported_converged():
    model = mlp(1, NumpyNoise())
    np.random.seed(0)
    with pytest.warns(UserWarning, match="function changes between calls"):
        m = SharpnessTracker(model, nn.MSELoss(), (X, Y), tol=1e-6).measure(eta=0.05)
    assert m.hvp_consistent is False and m.converged is False


def test_batchnorm_buffers_untouched_and_train_mode_function_measured():
    model = mlp(1, nn.BatchNorm1d(6))
    model[1].running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mse = nn.MSELoss()
    m = SharpnessTracker(model, mse, (X, Y), tol=1e-10).measure(eta=0.05)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    g, H = dense(model, mse, X, Y)  # train mode: normalised by the batch's statistics
    assert m.sharpness == pytest.approx(top(H), rel=1e-9)
    assert m.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
    # eval mode uses the running statistics
    _, H_eval = dense(model, mse, X, Y, eval_mode=True)
    m_eval = SharpnessTracker(model, mse, (X, Y), tol=1e-10, mode="eval").measure(eta=0.05)
    assert m_eval.sharpness == pytest.approx(top(H_eval), rel=1e-9)
    assert model.training
    # chunks in train mode: each chunk has its own statistics, and a warning says so
    with pytest.warns(UserWarning, match="own batch statistics"):
        SharpnessTracker(model, mse, (X, Y), chunk_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SharpnessTracker(model, mse, (X, Y), chunk_size=16, mode="eval")


# --- losses in chunks -------------------------------------------------------------------------

WEIGHT = torch.tensor([0.2, 1.0, 3.0, 0.5], dtype=torch.float64)
IGNORED = LABELS.clone()
IGNORED[::5] = -100
SMOOTH_LABELS = torch.softmax(torch.randn(N, 4, generator=G, dtype=torch.float64), -1)
CHUNK_LOSSES = {
    "weighted-ce": (nn.CrossEntropyLoss(weight=WEIGHT), LABELS),
    "ignore-index-ce": (nn.CrossEntropyLoss(ignore_index=-100), IGNORED),
    "weighted-smoothed-ignore": (nn.CrossEntropyLoss(weight=WEIGHT, ignore_index=-100, label_smoothing=0.1), IGNORED),
    "ce-probabilities": (nn.CrossEntropyLoss(weight=WEIGHT), SMOOTH_LABELS),
    "nll-weighted": (nn.NLLLoss(weight=WEIGHT), LABELS),
    "ce-sum": (nn.CrossEntropyLoss(weight=WEIGHT, reduction="sum"), LABELS),
    "kl-batchmean": (nn.KLDivLoss(reduction="batchmean"), SMOOTH_LABELS),
    "mse-module": (nn.MSELoss(), SMOOTH_LABELS),
}


@pytest.mark.parametrize("name", CHUNK_LOSSES)
def test_chunked_loss_equals_unchunked_and_dense(name):
    loss_fn, targets = CHUNK_LOSSES[name]
    if isinstance(loss_fn, (nn.NLLLoss, nn.KLDivLoss)):
        model = nn.Sequential(mlp(4), nn.LogSoftmax(-1))
    else:
        model = mlp(4)
    whole = Objective.from_tensors(model, loss_fn, X, targets)
    chunked = Objective.from_tensors(model, loss_fn, X, targets, chunk_size=12)  # class-sorted chunks
    g, H = dense(model, loss_fn, X, targets)
    params = whole.parameters()
    a, b = whole.loss_and_grad(params), chunked.loss_and_grad(params)
    assert b.loss == pytest.approx(a.loss, rel=1e-12)
    with torch.no_grad():
        assert b.loss == pytest.approx(float(loss_fn(model(X), targets)), rel=1e-12)
    assert torch.allclose(flatten(b.grad), g, rtol=1e-10, atol=1e-13)
    assert chunked.evaluate(params).loss == pytest.approx(a.loss, rel=1e-12)
    v = tuple(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) for p in params)
    for hvp_mode in ("double-backward", "forward-over-reverse"):
        chunked.hvp_mode = hvp_mode
        assert torch.allclose(flatten(chunked.hvp(params, v)), H @ flatten(v), rtol=1e-10, atol=1e-13)


def test_tracker_weighted_ce_in_chunks_matches_one_chunk():
    model, ce = mlp(4), nn.CrossEntropyLoss(weight=WEIGHT)
    a = SharpnessTracker(model, ce, (X, LABELS), tol=1e-10).measure(eta=0.1)
    b = SharpnessTracker(model, ce, (X, LABELS), tol=1e-10, chunk_size=12).measure(eta=0.1)
    g, H = dense(model, ce, X, LABELS)
    assert b.sharpness == pytest.approx(top(H), rel=1e-9) and a.sharpness == pytest.approx(top(H), rel=1e-9)
    assert b.grad_norm == pytest.approx(float(g.norm()), rel=1e-10)


def test_summed_loss_by_hand_and_refusals():
    model = mlp(4)

    def weighted(out, y):
        return F.cross_entropy(out, y, weight=WEIGHT, reduction="sum"), WEIGHT[y].sum()

    loss = SummedLoss(weighted)
    obj = Objective.from_tensors(model, loss, X, LABELS, chunk_size=7)
    g, _ = dense(model, nn.CrossEntropyLoss(weight=WEIGHT), X, LABELS)
    assert torch.allclose(flatten(obj.grad(obj.parameters())), g, rtol=1e-10, atol=1e-13)
    assert float(loss(model(X), LABELS)) == pytest.approx(float(F.cross_entropy(model(X), LABELS, weight=WEIGHT)))
    with pytest.raises(ValueError, match="reduction='none'"):
        Objective.from_tensors(model, nn.MSELoss(reduction="none"), X, Y, chunk_size=7)
    with pytest.raises(ValueError, match="CTCLoss.*cannot be split"):
        Objective.from_tensors(model, nn.CTCLoss(), X, Y, chunk_size=7)
    with pytest.raises(ValueError, match="callable"):
        SummedLoss(3)


# --- outputs, minibatches, arguments --------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.as_dict = nn.Linear(5, 4).double(), nn.Linear(4, 4).double(), as_dict

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return {"logits": self.head(h), "h": h} if self.as_dict else (self.head(h), h)


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_outputs_are_the_losss_business(as_dict):
    model = TwoHeads(as_dict)

    def loss(out, y):
        logits = out["logits"] if as_dict else out[0]
        return F.cross_entropy(logits, y)

    m = SharpnessTracker(model, loss, (X, LABELS), tol=1e-10).measure(eta=0.1)
    _, H = dense(model, loss, X, LABELS)
    assert m.sharpness == pytest.approx(top(H), rel=1e-9)
    assert np.isnan(Objective(model, loss, [(X, LABELS)]).evaluate(tuple(model.parameters())).accuracy)


def test_new_minibatch_with_warm_start_kept():
    model, mse = mlp(), nn.MSELoss()
    tracker = SharpnessTracker(model, mse, (X[:24], Y[:24]), tol=1e-10)
    tracker.measure(eta=0.05)
    cold = tracker.solver.previous.clone()
    m = tracker.measure(eta=0.05, batch=(X[24:], Y[24:]))
    _, H = dense(model, mse, X[24:], Y[24:])
    assert m.sharpness == pytest.approx(top(H), rel=1e-9)
    assert not torch.equal(tracker.solver.previous, cold)  # the solver (and its warm start) is shared
    # without batch= the tracker's own data again
    _, H0 = dense(model, mse, X[:24], Y[:24])
    assert tracker.measure(eta=0.05).sharpness == pytest.approx(top(H0), rel=1e-9)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(eta=-1.0), "eta must be > 0"),
        (dict(eta=0.1, optimizer="adam"), "unknown optimizer"),
        (dict(), "needs eta"),
        (dict(eta=0.1, batch=(X, Y[:3])), "48 inputs but 3 targets"),
        (dict(eta=0.1, batch=X), r"batch must be \(inputs, targets\)"),
        (dict(method=Method("gd", 0.1), eta=0.1), "either method"),
        (dict(optimizer=torch.optim.AdamW([nn.Parameter(torch.zeros(1))])), "not this model's"),
        (dict(eta=0.1, optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)), "do not pass eta"),
    ],
)
def test_arguments_checked_before_any_work(kw, match):
    model = mlp()
    tracker = SharpnessTracker(model, nn.MSELoss(), (X, Y))
    calls = []
    tracker.objective.loss_and_grad = lambda p: calls.append(p)  # any work would call it
    with pytest.raises(ValueError, match=match):
        tracker.measure(**kw)
    assert calls == [] and tracker.solver.previous is None


def test_method_from_optimizer_gives_the_momentum_edge():
    model, mse = mlp(), nn.MSELoss()
    opt = SAM(model.parameters(), lr=0.05, rho=0.1, momentum=0.9)
    assert Method.from_optimizer(opt) == Method("sam", 0.05, 0.1, 0.9)
    over_sgd = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.5, normalized=False)
    assert Method.from_optimizer(over_sgd) == Method("usam", 0.05, 0.1, 0.5)
    assert Method.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)) == Method("gd", 0.2, 0, 0.9)
    m = SharpnessTracker(model, mse, (X, Y)).measure(optimizer=opt)
    assert m.edge == pytest.approx(sam_edge(0.05, 0.1, m.grad_norm, 0.9), rel=1e-12)
    assert m.gd_edge == pytest.approx((2 + 2 * 0.9) / 0.05)
    # coupled weight decay is part of the linearised step (the top eigenvalue of H + lambda I)
    decayed = Method.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=1e-4))
    assert decayed.weight_decay == 1e-4 and decayed.gd_edge == pytest.approx(2 / 0.2 - 1e-4, rel=1e-12)


# --- SAM over a base optimizer ---------------------------------------------------------------------


def hand_sam_over(base_cls, rho, steps, **kw):
    """SAM written out by hand: g at w, e = rho g / ||g||, the gradient at w + e, back to w, the
    base optimizer's step with that gradient."""
    model = mlp(seed=1)
    base = base_cls(model.parameters(), **kw)
    ps = list(model.parameters())
    for _ in range(steps):
        base.zero_grad()
        F.mse_loss(model(X), Y).backward()
        g = [p.grad.clone() for p in ps]
        n = torch.sqrt(sum((gi**2).sum() for gi in g))
        with torch.no_grad():
            for p, gi in zip(ps, g):
                p.add_(rho * gi / n)
        base.zero_grad()
        F.mse_loss(model(X), Y).backward()
        with torch.no_grad():
            for p, gi in zip(ps, g):
                p.sub_(rho * gi / n)
        base.step()
    return ps


@pytest.mark.parametrize(
    "base_cls,kw",
    [
        (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
        (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
    ],
    ids=["sgd-momentum-wd", "adamw"],
)
@pytest.mark.parametrize("form", ["closure", "two-steps"])
def test_sam_over_base_optimizer_equals_hand_written(base_cls, kw, form):
    model = mlp(seed=1)
    opt = SAM(model.parameters(), base_optimizer=base_cls, rho=0.05, **kw)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(4):
        opt.zero_grad()
        F.mse_loss(model(X), Y).backward()
        if form == "closure":

            def closure():
                opt.zero_grad()
                loss = F.mse_loss(model(X), Y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.first_step(zero_grad=True)
            F.mse_loss(model(X), Y).backward()
            opt.second_step(zero_grad=True)
    expected = hand_sam_over(base_cls, 0.05, 4, **kw)
    for p, q, s in zip(model.parameters(), expected, start):
        assert torch.allclose(p, q, rtol=0, atol=1e-13)
        assert not torch.equal(p, s)


def test_sam_base_state_dict_round_trip_continues_identically():
    def make():
        model = mlp(seed=2)
        return model, SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            F.mse_loss(model(X), Y).backward()
            opt.first_step(zero_grad=True)
            F.mse_loss(model(X), Y).backward()
            opt.second_step()

    a, opt_a = make()
    steps(a, opt_a, 2)
    b, opt_b = make()
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups is opt_b.base_optimizer.param_groups
    steps(a, opt_a, 2)
    steps(b, opt_b, 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_sam_group_keys_not_honoured_are_refused():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="weight_decay.*base_optimizer"):
        SAM([p], lr=0.1, weight_decay=0.01)
    with pytest.raises(ValueError, match=r"\['weight_decay'\] are not used by SAM or SAM's built-in"):
        SAM([{"params": [p], "weight_decay": 0.01}], lr=0.1)
    with pytest.raises(ValueError, match=r"\['betas'\] are not used by SAM or SGD"):
        SAM([{"params": [p], "betas": (0.9, 0.99)}], torch.optim.SGD, lr=0.1)
    opt = SAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="nesterov_typo"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "nesterov_typo": True})
    with pytest.raises(ValueError, match="keyword"):
        SAM([p], 0.1)
    with pytest.raises(ValueError, match="backward"):
        opt.step(lambda: torch.zeros(()))
