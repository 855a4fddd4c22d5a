"""Stability thresholds against closed forms and the equations they solve."""

import math

import pytest

from samedge import edge_for
from samedge.core.thresholds import gd_edge, momentum_edge, sam_edge, usam_edge

ETAS = [1e-3, 0.01, 0.05, 0.2, 1.0, 3.0]
RHOS = [1e-3, 0.01, 0.05, 0.1, 0.5, 2.0]
GRAD_NORMS = [1e-3, 0.1, 1.0, 7.5, 100.0]
MOMENTA = [0.0, 0.5, 0.9, 0.99]


def rel(a, b):
    return abs(a - b) / abs(b)


def sam_edge_naive(eta, rho, g, beta=0.0):
    """(g / (2 rho)) (sqrt(1 + 8 rho (1 + beta) / (eta g)) - 1): the textbook root, which loses
    digits to cancellation when 8 rho / (eta g) is small."""
    return (g / (2 * rho)) * (math.sqrt(1 + 8 * rho * (1 + beta) / (eta * g)) - 1)


def usam_edge_naive(eta, rho, beta=0.0):
    return (math.sqrt(1 + 8 * rho * (1 + beta) / eta) - 1) / (2 * rho)


# --- GD / momentum -------------------------------------------------------------------------


@pytest.mark.parametrize("eta", ETAS)
def test_gd_edge_is_two_over_eta(eta):
    assert gd_edge(eta) == 2.0 / eta
    assert edge_for("gd", eta, 0.0, 1.0) == 2.0 / eta
    with pytest.raises(ValueError, match="rho must be 0 with optimizer 'gd'"):
        edge_for("gd", eta, 0.3, 1.0)  # refused, never ignored
    assert momentum_edge(eta, 0.0) == 2.0 / eta


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("beta", MOMENTA)
def test_momentum_edge_closed_form(eta, beta):
    assert rel(momentum_edge(eta, beta), (2 + 2 * beta) / eta) <= 1e-15
    assert rel(edge_for("gd", eta, 0.0, 1.0, momentum=beta), (2 + 2 * beta) / eta) <= 1e-15


# --- SAM -----------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("g", GRAD_NORMS)
def test_sam_edge_solves_its_equation(eta, rho, g):
    lam = sam_edge(eta, rho, g)
    assert lam > 0
    # positive root of eta lam (1 + rho lam / g) = 2
    assert rel(eta * lam * (1 + rho * lam / g), 2.0) <= 1e-12
    # it is the positive root of the quadratic (rho/g) lam^2 + lam - 2/eta: the other root is negative
    a, c = rho / g, -2.0 / eta
    other = c / a / lam  # product of roots = c / a
    assert other < 0
    assert edge_for("sam", eta, rho, g) == lam


ACCURATE = [(eta, rho, g) for eta in ETAS for rho in RHOS for g in GRAD_NORMS if 8 * rho / (eta * g) >= 1e-2]


@pytest.mark.parametrize("eta,rho,g", ACCURATE)
def test_sam_edge_equals_cancellation_prone_form_where_accurate(eta, rho, g):
    # (only where 8 rho / (eta g) >= 1e-2: below, the naive form loses digits to cancellation)
    assert rel(sam_edge(eta, rho, g), sam_edge_naive(eta, rho, g)) <= 1e-12


def test_sam_edge_accurate_where_naive_form_cancels():
    # 8 rho / (eta g) = 8e-12: the naive form has only ~4 correct digits here, the edge is
    # 2/eta (1 - 2 rho/(eta g) + ...) to first order.
    eta, rho, g = 0.1, 1e-12, 10.0
    lam = sam_edge(eta, rho, g)
    assert rel(eta * lam * (1 + rho * lam / g), 2.0) <= 1e-15
    expected = (2 / eta) * (1 - 2 * rho / (eta * g))
    assert rel(lam, expected) <= 1e-15


@pytest.mark.parametrize("eta", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("rho", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("g", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("beta", MOMENTA)
def test_sam_edge_with_momentum(eta, rho, g, beta):
    lam = sam_edge(eta, rho, g, momentum=beta)
    assert rel(eta * lam * (1 + rho * lam / g), 2 + 2 * beta) <= 1e-12
    if 8 * rho / (eta * g) >= 1e-2:
        assert rel(lam, sam_edge_naive(eta, rho, g, beta)) <= 1e-12
    assert edge_for("sam", eta, rho, g, momentum=beta) == lam
    assert lam < momentum_edge(eta, beta)


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("g", GRAD_NORMS + [0.0])
@pytest.mark.parametrize("beta", MOMENTA)
def test_sam_edge_rho_zero_is_gd_edge_exactly(eta, g, beta):
    assert sam_edge(eta, 0.0, g, momentum=beta) == momentum_edge(eta, beta)
    assert sam_edge(eta, 0.0, g) == 2.0 / eta


@pytest.mark.parametrize("rho", RHOS)
def test_sam_edge_zero_grad_norm_gives_zero(rho):
    assert sam_edge(0.1, rho, 0.0) == 0.0
    assert sam_edge(0.1, rho, 0.0, momentum=0.9) == 0.0
    # and this is the limit of the formula
    assert sam_edge(0.1, rho, 1e-300) < 1e-140


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("rho", RHOS)
def test_sam_edge_below_gd_edge_and_increasing_in_grad_norm(eta, rho):
    norms = [0.0, 1e-6, 1e-3, 0.1, 1.0, 10.0, 1e3, 1e6]
    edges = [sam_edge(eta, rho, g) for g in norms]
    assert all(e < 2.0 / eta for e in edges)
    assert all(a < b for a, b in zip(edges, edges[1:]))
    # tends to 2/eta as the gradient dominates
    # (first-order deficit 2 rho / (eta g))
    assert 0 < rel(sam_edge(eta, rho, 1e12), 2.0 / eta) <= 4 * rho / (eta * 1e12)


def test_sam_edge_hand_value():
    # eta = 0.5, rho = 0.25, g = 1: lam (1 + lam/4) = 4  <=>  lam^2 + 4 lam - 16 = 0
    assert rel(sam_edge(0.5, 0.25, 1.0), -2 + math.sqrt(20)) <= 1e-15


# --- USAM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("beta", MOMENTA)
def test_usam_edge_solves_its_equation(eta, rho, beta):
    lam = usam_edge(eta, rho, momentum=beta)
    assert lam > 0
    assert rel(eta * lam * (1 + rho * lam), 2 + 2 * beta) <= 1e-12
    if 8 * rho / eta >= 1e-2:
        assert rel(lam, usam_edge_naive(eta, rho, beta)) <= 1e-12
    assert edge_for("usam", eta, rho, 123.0, momentum=beta) == lam
    assert lam < momentum_edge(eta, beta)


@pytest.mark.parametrize("eta", ETAS)
def test_usam_edge_rho_zero(eta):
    assert usam_edge(eta, 0.0) == 2.0 / eta


def test_usam_edge_is_sam_edge_at_unit_grad_norm():
    for eta, rho in [(0.1, 0.05), (1.0, 2.0), (0.01, 1e-3)]:
        assert rel(usam_edge(eta, rho), sam_edge(eta, rho, 1.0)) <= 1e-15


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, -0.1, math.nan, math.inf])
def test_bad_eta(eta):
    for fn in (
        lambda: gd_edge(eta),
        lambda: momentum_edge(eta, 0.5),
        lambda: sam_edge(eta, 0.1, 1.0),
        lambda: usam_edge(eta, 0.1),
        lambda: edge_for("sam", eta, 0.1, 1.0),
    ):
        with pytest.raises(ValueError, match="eta"):
            fn()


@pytest.mark.parametrize("rho", [-1e-9, -1.0, math.nan])
def test_bad_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        sam_edge(0.1, rho, 1.0)
    with pytest.raises(ValueError, match="rho"):
        usam_edge(0.1, rho)
    with pytest.raises(ValueError, match="rho"):
        edge_for("usam", 0.1, rho, 1.0)


@pytest.mark.parametrize("g", [-1e-9, -1.0, math.nan])
def test_bad_grad_norm(g):
    with pytest.raises(ValueError, match="grad_norm"):
        sam_edge(0.1, 0.05, g)
    with pytest.raises(ValueError, match="grad_norm"):
        edge_for("sam", 0.1, 0.05, g)


@pytest.mark.parametrize("beta", [1.0, 1.5, -0.1, math.nan])
def test_bad_momentum(beta):
    for fn in (
        lambda: momentum_edge(0.1, beta),
        lambda: sam_edge(0.1, 0.05, 1.0, momentum=beta),
        lambda: usam_edge(0.1, 0.05, momentum=beta),
        lambda: edge_for("gd", 0.1, 0.0, 1.0, beta),
    ):
        with pytest.raises(ValueError, match="momentum"):
            fn()


def test_non_number_argument():
    with pytest.raises(ValueError, match="eta"):
        gd_edge("fast")


@pytest.mark.parametrize("name", ["adam", "SAM", "", "sgd"])
def test_unknown_optimizer(name):
    with pytest.raises(ValueError, match="optimizer"):
        edge_for(name, 0.1, 0.05, 1.0)
