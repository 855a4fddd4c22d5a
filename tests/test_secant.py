"""Rayleigh-Ritz on secant pairs: exact on a quadratic, against a dense Rayleigh-Ritz."""

import math

import numpy as np
import pytest
import torch

from samedge.core.secant import SecantWindow, rayleigh_ritz_secants


def spd(d, seed, top=None):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.sort(rng.uniform(0.1, 5.0, d))
    if top is not None:
        lam[-1] = top
    return (q * lam) @ q.T, lam


def dense_ritz(H, S):
    """Independent Rayleigh-Ritz: QR of the directions, dense projection, dense residual."""
    Q, _ = np.linalg.qr(S.T)
    thetas, Z = np.linalg.eigh(Q.T @ H @ Q)
    u = Q @ Z[:, -1]
    return thetas[-1], np.linalg.norm(H @ u - thetas[-1] * u) / abs(thetas[-1]), u


@pytest.mark.parametrize("m", [1, 3, 8])
def test_exact_on_a_quadratic(m):
    H, _ = spd(40, m)
    S = np.random.default_rng(100 + m).standard_normal((m, 40))
    est = rayleigh_ritz_secants(torch.tensor(S), torch.tensor(S @ H))
    theta, res, u = dense_ritz(H, S)
    assert est.sharpness == pytest.approx(theta, rel=1e-12)
    assert est.residual == pytest.approx(res, rel=1e-8, abs=1e-12)
    assert abs(float(torch.dot(est.vector, torch.tensor(u)))) == pytest.approx(1.0, abs=1e-10)
    assert est.pairs == m and est.rank == m


def test_span_containing_the_top_eigenvector_gives_it_with_zero_residual():
    H, lam = spd(30, 7, top=9.0)
    w, V = np.linalg.eigh(H)
    S = np.stack([V[:, -1] + 0.0 * V[:, 0], V[:, 3], V[:, 5]])
    est = rayleigh_ritz_secants(torch.tensor(S), torch.tensor(S @ H))
    assert est.sharpness == pytest.approx(9.0, rel=1e-12)
    assert est.residual < 1e-7


def test_dependent_directions_are_dropped_not_divided_by():
    H, _ = spd(20, 3)
    s = np.random.default_rng(0).standard_normal(20)
    S = np.stack([s, 2 * s, -0.5 * s])
    est = rayleigh_ritz_secants(torch.tensor(S), torch.tensor(S @ H))
    assert est.rank == 1
    assert est.sharpness == pytest.approx(s @ H @ s / (s @ s), rel=1e-10)  # the Rayleigh quotient


def test_window_keeps_the_last_pairs_and_matches_a_direct_solve():
    H, _ = spd(25, 11)
    rng = np.random.default_rng(5)
    window = SecantWindow(4)
    pairs = [rng.standard_normal(25) for _ in range(7)]
    for s in pairs:
        window.push(torch.tensor(s), torch.tensor(H @ s))
    assert len(window) == 4
    S = np.stack(pairs[-4:])
    est = window.estimate(with_vector=True)
    theta, res, _ = dense_ritz(H, S)
    assert est.sharpness == pytest.approx(theta, rel=1e-12)
    assert est.residual == pytest.approx(res, rel=1e-8)
    # the incremental Gram matrices equal the direct ones
    direct = rayleigh_ritz_secants(torch.tensor(S), torch.tensor(S @ H))
    assert est.sharpness == direct.sharpness or est.sharpness == pytest.approx(direct.sharpness, rel=1e-14)


def test_window_state_round_trip_is_bitwise():
    rng = np.random.default_rng(2)
    a, b = SecantWindow(3), SecantWindow(3)
    for _ in range(5):
        s = torch.tensor(rng.standard_normal(10), dtype=torch.float32)
        a.push(s, 3 * s + 0.01 * torch.randn(10, generator=torch.Generator().manual_seed(1)))
    b.load_state_dict(a.state_dict())
    ea, eb = a.estimate(), b.estimate()
    assert ea.sharpness == eb.sharpness and ea.residual == eb.residual


def test_window_skips_empty_and_non_finite_pairs_and_refuses_bad_sizes():
    w = SecantWindow(2)
    assert w.estimate() is None
    w.push(torch.zeros(3), torch.ones(3))
    w.push(torch.tensor([1.0, math.nan, 0.0]), torch.ones(3))
    assert len(w) == 0
    with pytest.raises(ValueError, match="positive integer"):
        SecantWindow(0)
    with pytest.raises(ValueError, match="one shape"):
        w.push(torch.ones(3), torch.ones(4))


def test_step_secants_pick_their_pairs_by_method():
    """SAM contributes its perturbation pair (e, g(w+e) - g(w)); GD consecutive steps. On a
    quadratic both are exact secants, so the estimate is Rayleigh-Ritz of the true Hessian."""
    from samedge.core.method import Method
    from samedge.core.secant import CONSECUTIVE_PAIRS, PERTURBATION_PAIRS, StepSecants

    H, lam = spd(12, 4, top=6.0)
    Ht = torch.tensor(H)

    def grad(w):
        return (Ht @ w[0],)

    for method, expected_size in (
        (Method("sam", 0.1, 0.05), PERTURBATION_PAIRS),
        (Method("gd", 0.3), CONSECUTIVE_PAIRS),
    ):
        sec = StepSecants(method)
        assert sec.window.size == expected_size
        w = (torch.tensor(np.random.default_rng(1).standard_normal(12)),)
        dirs = []
        for _ in range(6):
            g = grad(w)
            d = method.direction(grad, w, g)
            est = sec.observe(w, g, d)
            dirs.append(method.perturbation(g)[0].numpy() if method.perturbs else None)
            w, _ = method.update(w, d)
        S = torch.stack(sec.window._s).double().numpy()
        theta, res, _ = dense_ritz(H, S)
        assert est.sharpness == pytest.approx(theta, rel=1e-8)  # e is w + e - w up to rounding
        assert est.residual == pytest.approx(res, abs=1e-5)  # the Gram formula cancels below ~1e-5
        assert est.sharpness <= lam[-1] * (1 + 1e-12)  # a Ritz value never exceeds lambda_1


def test_step_secants_state_round_trip_continues_identically():
    from samedge.core.method import Method
    from samedge.core.secant import StepSecants

    H, _ = spd(8, 9)
    Ht = torch.tensor(H)
    method = Method("gd", 0.2)

    def steps(sec, w, n):
        out = []
        for _ in range(n):
            g = (Ht @ w[0],)
            est = sec.observe(w, g, g)
            out.append(None if est is None else (est.sharpness, est.residual))
            w, _ = method.update(w, g)
        return w, out

    a = StepSecants(method)
    w, _ = steps(a, (torch.ones(8, dtype=torch.float64),), 4)
    b = StepSecants(method)
    b.load_state_dict(a.state_dict())
    _, ra = steps(a, w, 3)
    _, rb = steps(b, w, 3)
    assert ra == rb


def test_sam_hands_its_pair_to_the_tracker_in_a_users_loop():
    """samedge.SAM(secant_pair=True) keeps (e, g(w+e) - g(w)); on a linear model with squared
    error (a quadratic) that is H e exactly, so the tracker's estimate is Rayleigh-Ritz of the
    dense Hessian on the span of the perturbations: below lambda_1, and close to it once the
    gradients align with the top eigenvector."""
    from torch import nn

    from samedge import SAM, SharpnessTracker

    torch.manual_seed(0)
    x = torch.randn(200, 6, dtype=torch.float64) * torch.tensor([3.0, 1, 1, 0.5, 0.5, 0.2], dtype=torch.float64)
    y = torch.randn(200, 1, dtype=torch.float64)
    model = nn.Linear(6, 1).double()
    loss_fn = nn.MSELoss()
    xb = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    H = 2 * xb.T @ xb / 200  # the dense Hessian of the mean squared error (weights, then bias)
    lam1 = float(torch.linalg.eigvalsh(H)[-1])
    opt = SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.05, lr=1.9 / lam1, secant_pair=True)
    tracker = SharpnessTracker(model, loss_fn, (x, y))
    est = None
    for _ in range(30):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step(lambda: (opt.zero_grad(), loss_fn(model(x), y).backward()))
        s, yy = opt.last_secant_pair
        assert torch.allclose(yy, H @ s, rtol=1e-9, atol=1e-12)  # an exact secant on a quadratic
        est = tracker.secant(s, yy)
    assert est is not None and est.pairs == 10
    assert est.sharpness <= lam1 * (1 + 1e-9)
    assert est.sharpness == pytest.approx(lam1, rel=1e-3) and est.trusted
    with pytest.raises(ValueError, match="both s and y"):
        tracker.secant(s)
