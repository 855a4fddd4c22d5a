"""Every (base, perturbation) on quadratics where H and a fixed diagonal preconditioner P do not
commute: the linearised step's spectral radius crosses 1 exactly where the stated threshold says
(to 1e-6), and the simulated dynamics settle below it and leave above it."""

import numpy as np
import pytest

from samedge.core.method import Method
from samedge.core.quadratic import effective_sharpness, linearised_update, simulate_quadratic

BASES = {
    "sgd heavy-ball, dampening, weight decay": dict(base="sgd", momentum=0.9, dampening=0.3, weight_decay=0.5),
    "sgd nesterov, weight decay": dict(base="sgd", momentum=0.9, nesterov=True, weight_decay=0.2),
    "adam, coupled weight decay": dict(base="adam", beta1=0.9, weight_decay=0.1),
    "adamw": dict(base="adamw", beta1=0.8, weight_decay=2.0),
    "rmsprop momentum, weight decay": dict(base="rmsprop", momentum=0.5, weight_decay=0.1),
}
KINDS = {"gd": 0.0, "sam": 0.05, "usam": 0.02}
ETA, G, N = 0.01, 0.7, 6


def problem(seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    H = Q @ np.diag([1.0, 0.7, 0.4, 0.2, 0.05, 0.0]) @ Q.T
    P = rng.uniform(0.2, 3.0, N)
    return (H + H.T) / 2, P


def radius(M):
    return float(np.abs(np.linalg.eigvals(M)).max())


def setting(name, kind):
    hyper = dict(BASES[name])
    method = Method(kind, ETA, KINDS[kind], hyper.pop("momentum", 0.0), **hyper)
    kw = dict(eta=ETA, optimizer=kind, rho=KINDS[kind], momentum=method.momentum, **hyper)
    if method.preconditioned:
        kw["preconditioner"] = problem()[1]
    return method, kw


def critical_scale(method, kw, H):
    """The scale sigma of H at which the stated threshold is met: for sgd the top eigenvalue of
    sigma H at the closed-form edge on H, for a preconditioned base the effective sharpness at
    the base's threshold (bisection, monotone in sigma)."""

    def excess(sigma):
        if method.preconditioned:
            return effective_sharpness(sigma * H, grad_norm=G, **kw) / method.threshold - 1.0
        return sigma * np.linalg.eigvalsh(H)[-1] / method.edge(G) - 1.0

    lo, hi = 0.0, 1.0
    while excess(hi) < 0:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", list(BASES))
def test_spectral_radius_crosses_one_at_the_threshold(name, kind):
    method, kw = setting(name, kind)
    H, _ = problem()
    sigma = critical_scale(method, kw, H)
    below = radius(linearised_update(sigma * (1 - 1e-6) * H, grad_norm=G, **kw))
    above = radius(linearised_update(sigma * (1 + 1e-6) * H, grad_norm=G, **kw))
    assert below < 1.0 < above, (below, above)
    assert abs(radius(linearised_update(sigma * H, grad_norm=G, **kw)) - 1.0) < 1e-6


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", list(BASES))
def test_dynamics_settle_below_and_leave_above(name, kind):
    method, kw = setting(name, kind)
    H, _ = problem()
    sigma = critical_scale(method, kw, H)
    w0 = np.random.default_rng(5).standard_normal(N)
    settled = simulate_quadratic(sigma * 0.97 * H, w0, steps=3000, frozen_grad_norm=G, **kw)
    left = simulate_quadratic(sigma * 1.03 * H, w0, steps=3000, frozen_grad_norm=G, **kw)
    assert not settled.diverged and np.linalg.norm(settled.grad_norm[-1]) < 1e-3 * settled.grad_norm[0]
    assert left.diverged or left.grad_norm[-1] > 1e6 * left.grad_norm[0]


def test_the_preconditioner_does_not_commute_with_h():
    H, P = problem()
    assert np.abs(np.diag(P) @ H - H @ np.diag(P)).max() > 0.1


def test_the_adamw_threshold_is_below_adams_by_one_minus_eta_lambda_over_two():
    adam, adamw = (
        Method("gd", 0.01, base="adam", beta1=0.9),
        Method("gd", 0.01, base="adamw", beta1=0.9, weight_decay=2),
    )
    assert adamw.threshold == pytest.approx(adam.threshold * (1 - 0.01))


def test_without_momentum_or_perturbation_sgd_is_two_over_eta():
    H = problem()[0] + 0.01 * np.eye(N)  # top eigenvalue 1.01, all positive
    M = linearised_update(H * 199.9 / 1.01, eta=ETA)
    assert radius(M) < 1 < radius(linearised_update(H * 200.1 / 1.01, eta=ETA))
