"""The edges in samedge.core.thresholds are where GD / SAM / USAM on a quadratic lose stability."""

import math

import numpy as np
import pytest

from samedge.core.quadratic import simulate_quadratic
from samedge.core.thresholds import gd_edge, momentum_edge, sam_edge, usam_edge

STEPS = 2000


def quadratic_with_top(top: float, edge: float, seed: int, dim: int = 5) -> np.ndarray:
    """Symmetric H with eigenvalues top, 0.6 edge, 0.3 edge, 0.1 edge, 0 (in a random basis)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    lams = np.array([top, 0.6 * edge, 0.3 * edge, 0.1 * edge] + [0.0] * (dim - 4))
    H = Q @ np.diag(lams) @ Q.T
    return (H + H.T) / 2


def start(seed: int, dim: int = 5) -> np.ndarray:
    return np.random.default_rng(seed + 1000).standard_normal(dim)


def norms(traj) -> np.ndarray:
    return np.linalg.norm(traj.w, axis=1)


def assert_bounded(traj, w0, factor=1.0 + 1e-9):
    assert not traj.diverged
    assert len(traj.w) == STEPS + 1
    assert np.all(np.isfinite(traj.w))
    assert norms(traj).max() <= factor * np.linalg.norm(w0)


def assert_grows(traj, w0):
    # diverged (norm past 1e150) or grown by at least ten orders of magnitude
    assert traj.diverged or norms(traj)[-1] >= 1e10 * np.linalg.norm(w0)
    # and not by accident: the last stored iterate is the largest by far
    assert norms(traj)[-1] >= 1e6 * np.linalg.norm(w0)


CASES = [(0.01, 0.01), (0.01, 0.5), (0.1, 0.05), (0.1, 1.0), (1.0, 0.1), (2.0, 2.0)]


@pytest.mark.parametrize("eta", [0.01, 0.1, 1.0, 2.5])
@pytest.mark.parametrize("factor", [0.98, 1.02])
def test_gd_edge_on_quadratic(eta, factor):
    edge = gd_edge(eta)
    H = quadratic_with_top(factor * edge, edge, seed=int(eta * 100))
    w0 = start(1)
    traj = simulate_quadratic(H, w0, eta=eta, steps=STEPS, optimizer="gd")
    if factor < 1:
        assert_bounded(traj, w0)
        # the top component decays as 0.96^t
        assert norms(traj)[-1] <= np.linalg.norm(w0)
    else:
        assert_grows(traj, w0)
        # growth rate of the top component is |1 - eta lam| = 1.04
        n = norms(traj)
        assert n[1001] / n[1000] == pytest.approx(1.04, rel=1e-6)


@pytest.mark.parametrize("eta,rho", CASES)
@pytest.mark.parametrize("factor", [0.98, 1.02])
def test_usam_edge_on_quadratic(eta, rho, factor):
    edge = usam_edge(eta, rho)
    H = quadratic_with_top(factor * edge, edge, seed=7)
    w0 = start(2)
    traj = simulate_quadratic(H, w0, eta=eta, rho=rho, steps=STEPS, optimizer="usam")
    if factor < 1:
        assert_bounded(traj, w0)
    else:
        assert_grows(traj, w0)
        lam = factor * edge
        rate = abs(1 - eta * lam * (1 + rho * lam))
        n = norms(traj)
        assert n[1001] / n[1000] == pytest.approx(rate, rel=1e-6)
    # the USAM edge is below the GD edge: 1.02 x the USAM edge is stable for GD when rho > 0
    # and far enough below
    if factor > 1 and 1.02 * edge < 0.99 * gd_edge(eta):
        gd = simulate_quadratic(H, w0, eta=eta, steps=STEPS, optimizer="gd")
        assert_bounded(gd, w0)


@pytest.mark.parametrize("eta", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("factor", [0.98, 1.02])
def test_momentum_edge_on_quadratic(eta, beta, factor):
    edge = momentum_edge(eta, beta)
    assert edge == pytest.approx((2 + 2 * beta) / eta, rel=1e-15)
    H = quadratic_with_top(factor * edge, edge, seed=3)
    w0 = start(3)
    traj = simulate_quadratic(H, w0, eta=eta, momentum=beta, steps=STEPS, optimizer="gd")
    if factor < 1:
        # heavy ball is not a contraction in w alone: allow a transient
        assert_bounded(traj, w0, factor=100.0)
        assert norms(traj)[-1] <= 10 * np.linalg.norm(w0)
    else:
        assert_grows(traj, w0)
    # the same top eigenvalue without momentum: unstable if above 2/eta
    if factor * edge > 1.02 * gd_edge(eta):
        no_momentum = simulate_quadratic(H, w0, eta=eta, steps=STEPS, optimizer="gd")
        assert_grows(no_momentum, w0)


@pytest.mark.parametrize("eta,rho", CASES)
@pytest.mark.parametrize("G", [0.1, 10.0])
@pytest.mark.parametrize("factor", [0.98, 1.02])
def test_sam_frozen_grad_norm_edge(eta, rho, G, factor):
    edge = sam_edge(eta, rho, G)
    H = quadratic_with_top(factor * edge, edge, seed=11)
    w0 = start(4)
    traj = simulate_quadratic(H, w0, eta=eta, rho=rho, steps=STEPS, optimizer="sam", frozen_grad_norm=G)
    if factor < 1:
        assert_bounded(traj, w0)
    else:
        assert_grows(traj, w0)
        lam = factor * edge
        rate = abs(1 - eta * lam * (1 + rho * lam / G))
        n = norms(traj)
        assert n[1001] / n[1000] == pytest.approx(rate, rel=1e-6)


@pytest.mark.parametrize("eta,rho,G,beta", [(0.1, 0.05, 1.0, 0.9), (0.01, 0.5, 0.1, 0.5), (1.0, 0.1, 10.0, 0.8)])
@pytest.mark.parametrize("factor", [0.98, 1.02])
def test_sam_frozen_grad_norm_edge_with_momentum(eta, rho, G, beta, factor):
    edge = sam_edge(eta, rho, G, momentum=beta)
    H = quadratic_with_top(factor * edge, edge, seed=12)
    w0 = start(5)
    traj = simulate_quadratic(H, w0, eta=eta, rho=rho, steps=STEPS, optimizer="sam", frozen_grad_norm=G, momentum=beta)
    if factor < 1:
        assert_bounded(traj, w0, factor=100.0)
    else:
        assert_grows(traj, w0)


ORBIT_CASES = [
    # eta, rho, bnorm
    (0.1, 0.05, 1.0),
    (0.1, 0.5, 0.3),
    (0.01, 0.01, 2.0),
    (0.01, 0.1, 0.05),
    (1.0, 0.2, 0.5),
    (0.5, 1.0, 3.0),
]


@pytest.mark.parametrize("eta,rho,bnorm", ORBIT_CASES)
@pytest.mark.parametrize("position", [0.3, 0.7])
def test_sam_true_norm_settles_at_sam_edge(eta, rho, bnorm, position):
    low, high = sam_edge(eta, rho, bnorm), 2.0 / eta
    lam = low + position * (high - low)
    assert low < lam < high
    H = np.diag([lam, 0.0])
    b = np.array([0.0, bnorm])
    w0 = np.array([1e-3 / lam, 0.0])
    steps = 3000
    traj = simulate_quadratic(H, w0, eta=eta, rho=rho, steps=steps, optimizer="sam", b=b)
    assert not traj.diverged
    top = traj.w[:, 0]
    # the top component left zero (unstable at ||g|| = bnorm) ...
    assert abs(top[-1]) > 100 * abs(top[0])
    # ... and settled into a period-2 orbit
    tail = top[-20:]
    assert np.allclose(tail[2:], tail[:-2], rtol=1e-9, atol=0)
    assert np.allclose(tail[1:], -tail[:-1], rtol=1e-9, atol=0)
    # the flat coordinate drifts by eta * bnorm per step
    assert traj.w[-1, 1] == pytest.approx(-eta * bnorm * steps, rel=1e-9)
    # on the orbit the top eigenvalue is exactly the SAM-edge of the orbit's gradient norm
    g = traj.grad_norm[-1]
    assert g == pytest.approx(math.hypot(lam * top[-1], bnorm), rel=1e-12)
    assert sam_edge(eta, rho, g) == pytest.approx(lam, rel=1e-6)
    # closed form of the orbit: eta lam (1 + rho lam / G) = 2
    G = rho * lam**2 * eta / (2 - eta * lam)
    assert g == pytest.approx(G, rel=1e-6)
    assert abs(top[-1]) == pytest.approx(math.sqrt(G**2 - bnorm**2) / lam, rel=1e-6)


def test_sam_true_norm_below_edge_top_component_decays():
    eta, rho, bnorm = 0.1, 0.05, 1.0
    lam = 0.9 * sam_edge(eta, rho, bnorm)
    traj = simulate_quadratic(
        np.diag([lam, 0.0]),
        np.array([0.1, 0.0]),
        eta=eta,
        rho=rho,
        steps=STEPS,
        optimizer="sam",
        b=np.array([0.0, bnorm]),
    )
    assert abs(traj.w[-1, 0]) < 1e-12
    assert traj.grad_norm[-1] == pytest.approx(bnorm, rel=1e-12)


@pytest.mark.parametrize("b", [None, np.array([0.3, -0.2, 0.0, 0.1, 0.5])])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_rho_zero_sam_is_gd_exactly(b, beta):
    eta = 0.1
    H = quadratic_with_top(1.01 * gd_edge(eta), gd_edge(eta), seed=5)
    w0 = start(6)
    gd = simulate_quadratic(H, w0, eta=eta, steps=300, optimizer="gd", b=b, momentum=beta)
    for opt in ("sam", "usam"):
        other = simulate_quadratic(H, w0, eta=eta, steps=300, optimizer=opt, rho=0.0, b=b, momentum=beta)
        assert np.array_equal(gd.w, other.w)
        assert np.array_equal(gd.grad_norm, other.grad_norm)
        assert gd.diverged == other.diverged


def test_gd_step_by_hand():
    H = np.array([[2.0, 1.0], [1.0, 3.0]])
    b = np.array([1.0, -1.0])
    w0 = np.array([1.0, 2.0])
    traj = simulate_quadratic(H, w0, eta=0.1, steps=1, optimizer="gd", b=b)
    # g = H w0 + b = (4 + 1, 7 - 1) = (5, 6)
    assert np.allclose(traj.w[1], [0.5, 1.4], rtol=0, atol=1e-15)
    assert traj.grad_norm[0] == pytest.approx(math.hypot(5, 6), rel=1e-15)


def test_sam_step_by_hand():
    H = np.diag([2.0, 1.0])
    w0 = np.array([3.0, 4.0])
    # g = (6, 4), ||g|| = sqrt(52); e = 0.5 g / sqrt(52); direction = H (w0 + e)
    traj = simulate_quadratic(H, w0, eta=0.1, rho=0.5, steps=1, optimizer="sam")
    e = 0.5 * np.array([6.0, 4.0]) / math.sqrt(52)
    expected = w0 - 0.1 * (H @ (w0 + e))
    assert np.allclose(traj.w[1], expected, rtol=0, atol=1e-15)
    usam = simulate_quadratic(H, w0, eta=0.1, rho=0.5, steps=1, optimizer="usam")
    # e = 0.5 (6, 4) = (3, 2): direction = (2 * 6, 1 * 6) = (12, 6)
    assert np.allclose(usam.w[1], [3 - 1.2, 4 - 0.6], rtol=0, atol=1e-15)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        simulate_quadratic(np.eye(2), np.ones(2), eta=0.1, steps=1, optimizer="adam")


def test_divergence_flag_stops_run():
    traj = simulate_quadratic(np.diag([100.0]), np.ones(1), eta=1.0, steps=10_000, optimizer="gd")
    # multiplier -99: past 1e150 after ~76 steps
    assert traj.diverged
    assert len(traj.w) < 100
    assert len(traj.w) == len(traj.grad_norm)
    assert np.linalg.norm(traj.w[-1]) <= 1e150
