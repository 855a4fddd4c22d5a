"""Eigen-solvers on matrices with a known spectrum: accuracy, residuals, matvec counts, warm starts."""

import functools

import numpy as np
import pytest
import torch

from samedge.core.eigen import SOLVERS, EigenResult, eigsh, lanczos, paper_power_iteration, power_iteration

DIM = 120
TOP = np.array([10.0, 6.0, 5.5])


def known_matrix(dim=DIM, top=TOP, low=-3.0, high=4.0, seed=0):
    """A = Q diag(spectrum) Q^T with the given top eigenvalues above a bulk in [low, high]."""
    return _known_matrix(dim, tuple(float(t) for t in top), low, high, seed)


@functools.cache
def _known_matrix(dim, top, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    bulk = low + (high - low) * torch.rand(dim - len(top), generator=g, dtype=torch.float64)
    spectrum = torch.cat([torch.as_tensor(top, dtype=torch.float64), bulk])
    A = Q @ torch.diag(spectrum) @ Q.T
    A = (A + A.T) / 2
    return A, Q[:, : len(top)].T.clone(), spectrum


class Counter:
    def __init__(self, A):
        self.A, self.calls = A, 0

    def __call__(self, v):
        self.calls += 1
        assert v.shape == (self.A.shape[0],)
        return self.A @ v


def true_residuals(A, result):
    return np.array(
        [float(torch.linalg.vector_norm(A @ v - lam * v)) for lam, v in zip(result.eigenvalues, result.eigenvectors)]
    )


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def check_result(A, top_vecs, result, k, tol, counter):
    assert isinstance(result, EigenResult)
    assert result.converged
    assert result.matvecs == counter.calls
    assert result.eigenvalues.shape == (k,)
    assert result.eigenvectors.shape == (k, A.shape[0])
    assert result.residuals.shape == (k,)
    scale = float(TOP[0])
    # eigenvalues to the requested (relative) accuracy: |lam - ritz| <= residual <= tol * scale
    assert np.all(np.abs(result.eigenvalues - TOP[:k]) <= tol * scale)
    assert np.all(result.residuals <= tol * scale * (1 + 1e-9))
    # reported residuals are the true ||A v - lam v|| (the eigenvectors have unit norm)
    norms = torch.linalg.vector_norm(result.eigenvectors, dim=1)
    assert torch.allclose(norms, torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-10)
    true = true_residuals(A, result)
    assert np.allclose(result.residuals, true, rtol=1e-3, atol=1e-11 * scale)
    assert np.allclose(result.relative_residuals, result.residuals / np.max(np.abs(result.eigenvalues)))
    # eigenvectors aligned with the true ones (gap >= 0.5: sin angle <= residual / gap)
    overlaps = torch.abs((result.eigenvectors * top_vecs[:k]).sum(dim=1))
    assert torch.all(1 - overlaps <= (2 * tol * scale / 0.5) ** 2 + 1e-12)


@pytest.mark.parametrize("solver", [lanczos, eigsh])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("tol", [1e-4, 1e-8])
def test_top_eigenpairs(solver, k, tol):
    A, top_vecs, _ = known_matrix()
    counter = Counter(A)
    result = solver(counter, DIM, k=k, tol=tol, generator=gen(), dtype=torch.float64)
    check_result(A, top_vecs, result, k, tol, counter)
    assert result.method == solver.__name__


@pytest.mark.parametrize("tol", [1e-4, 1e-8])
def test_power_iteration(tol):
    A, top_vecs, _ = known_matrix()
    counter = Counter(A)
    result = power_iteration(counter, DIM, tol=tol, max_iter=500, generator=gen(), dtype=torch.float64)
    check_result(A, top_vecs, result, 1, tol, counter)
    # residuals of power iteration are computed, not estimated: they match to rounding
    assert np.allclose(result.residuals, true_residuals(A, result), rtol=1e-9, atol=1e-12)
    assert result.method == "power"


def test_lanczos_eigenvalue_error_is_quadratic_in_residual():
    A, _, _ = known_matrix()
    result = lanczos(Counter(A), DIM, k=1, tol=1e-4, generator=gen(), dtype=torch.float64)
    err = abs(result.eigenvalues[0] - TOP[0])
    # error ~ residual^2 / gap, far below tol * scale
    assert err <= 2 * result.residuals[0] ** 2 / (TOP[0] - TOP[1]) + 1e-12


def test_lanczos_not_converged_reports_it():
    A, _, _ = known_matrix()
    counter = Counter(A)
    result = lanczos(counter, DIM, k=3, tol=1e-12, max_iter=5, generator=gen(), dtype=torch.float64)
    assert not result.converged
    assert result.matvecs == counter.calls == 5
    assert np.allclose(result.residuals, true_residuals(A, result), rtol=1e-3, atol=1e-9)
    assert np.max(result.residuals) > 1e-12 * 10


def test_power_iteration_not_converged_reports_it():
    A, _, _ = known_matrix()
    counter = Counter(A)
    result = power_iteration(counter, DIM, tol=1e-12, max_iter=7, generator=gen(), dtype=torch.float64)
    assert not result.converged
    assert result.matvecs == counter.calls == 7


def test_power_iteration_unconverged_result_is_consistent():
    # EigenResult promises residuals[i] = ||A v_i - eigenvalues[i] v_i|| for the returned pair.
    A, _, _ = known_matrix()
    result = power_iteration(Counter(A), DIM, tol=1e-12, max_iter=7, generator=gen(), dtype=torch.float64)
    assert not result.converged
    v = result.eigenvectors[0]
    assert float(v @ A @ v) == pytest.approx(result.eigenvalues[0], rel=1e-12)
    assert np.allclose(result.residuals, true_residuals(A, result), rtol=1e-9, atol=1e-12)


def test_lanczos_invariant_subspace_restart():
    # eigenvalues 5 (twice) and 1 (58 times): the Krylov space of one start vector is
    # 2-dimensional ({5, 1}), fewer than k = 3 pairs, so the solver must restart from a fresh
    # vector orthogonal to the basis, which brings in the second copy of 5.
    dim = 60
    A, top_vecs, _ = known_matrix(dim=dim, top=np.array([5.0, 5.0]), low=1.0, high=1.0)
    counter = Counter(A)
    result = lanczos(counter, dim, k=3, tol=1e-8, generator=gen(), dtype=torch.float64)
    assert result.converged
    assert result.matvecs == counter.calls <= 6
    assert np.allclose(result.eigenvalues, [5.0, 5.0, 1.0], rtol=0, atol=1e-10)
    assert np.all(true_residuals(A, result) <= 1e-9)
    V = result.eigenvectors
    assert torch.allclose(V @ V.T, torch.eye(3, dtype=torch.float64), atol=1e-10)
    # the first two span the top eigenspace
    assert torch.allclose(torch.linalg.svdvals(top_vecs @ V[:2].T), torch.ones(2, dtype=torch.float64), atol=1e-10)


def test_lanczos_repeated_top_eigenvalue_k2():
    dim = 60
    A, _, _ = known_matrix(dim=dim, top=np.array([5.0, 5.0]), low=1.0, high=1.0)
    result = lanczos(Counter(A), dim, k=2, tol=1e-8, generator=gen(), dtype=torch.float64)
    # true top-2 eigenvalues are (5, 5): the restart on the invariant Krylov space finds the second 5
    assert not result.converged or np.allclose(result.eigenvalues, [5.0, 5.0], atol=1e-8)


def test_lanczos_triple_top_eigenvalue():
    # eigenvalue 5 three times over a bulk at 1: each Krylov block from one vector sees {5, 1}
    # only, so the top eigenspace needs two restarts to be found in full.
    dim = 60
    A, top_vecs, _ = known_matrix(dim=dim, top=np.array([5.0, 5.0, 5.0]), low=1.0, high=1.0)
    counter = Counter(A)
    result = lanczos(counter, dim, k=3, tol=1e-8, generator=gen(), dtype=torch.float64)
    assert result.matvecs == counter.calls
    assert not result.converged or np.allclose(result.eigenvalues, [5.0, 5.0, 5.0], atol=1e-8)


@pytest.mark.parametrize("solver", [lanczos, power_iteration])
def test_warm_start_from_exact_eigenvector(solver):
    A, top_vecs, _ = known_matrix()
    counter = Counter(A)
    result = solver(counter, DIM, k=1, v0=top_vecs[0], tol=1e-8, dtype=torch.float64)
    assert result.converged
    assert result.matvecs == counter.calls
    assert result.matvecs <= 2
    assert result.eigenvalues[0] == pytest.approx(TOP[0], rel=1e-12)


def test_warm_start_lanczos_k3_from_previous_eigenvectors():
    A, top_vecs, _ = known_matrix()
    counter = Counter(A)
    result = lanczos(counter, DIM, k=3, v0=top_vecs, tol=1e-8, dtype=torch.float64)
    assert result.converged
    assert result.matvecs == counter.calls <= 4
    assert np.allclose(result.eigenvalues, TOP, rtol=1e-12)


@pytest.mark.parametrize("solver", [lanczos, power_iteration])
def test_warm_start_from_perturbed_eigenvector_is_cheaper(solver):
    A, top_vecs, _ = known_matrix()
    tol = 1e-8
    cold = solver(Counter(A), DIM, tol=tol, max_iter=500, generator=gen(), dtype=torch.float64)
    noise = torch.randn(DIM, generator=gen(5), dtype=torch.float64)
    v0 = top_vecs[0] + 1e-4 * noise / noise.norm()
    counter = Counter(A)
    warm = solver(counter, DIM, tol=tol, max_iter=500, v0=v0, dtype=torch.float64)
    assert cold.converged and warm.converged
    assert warm.matvecs == counter.calls
    assert warm.matvecs <= cold.matvecs / 2
    assert warm.eigenvalues[0] == pytest.approx(TOP[0], rel=tol)


def test_eigsh_warm_start_from_exact_eigenvector():
    A, top_vecs, _ = known_matrix()
    counter = Counter(A)
    result = eigsh(counter, DIM, k=1, v0=top_vecs[0], tol=1e-8, dtype=torch.float64)
    assert result.matvecs == counter.calls
    assert result.eigenvalues[0] == pytest.approx(TOP[0], rel=1e-10)


def test_paper_power_iteration():
    A, _, _ = known_matrix()
    counter = Counter(A)
    tol = 1e-3
    result = paper_power_iteration(counter, DIM, tol=tol, generator=gen(), dtype=torch.float64)
    assert result.method == "paper-power"
    assert result.matvecs == counter.calls
    assert 1 < result.matvecs <= 100
    assert result.converged
    estimate = float(result.eigenvalues[0])
    assert isinstance(estimate, float)
    # a usable but loose estimate of the top eigenvalue (||A v|| >= Rayleigh quotient)
    assert estimate == pytest.approx(TOP[0], rel=0.05)
    # its reported residual is the true residual of the Rayleigh quotient of the vector before the
    # last product; recompute from its own definition on a fresh run with one product
    one = paper_power_iteration(Counter(A), DIM, tol=tol, max_iter=1, generator=gen(), dtype=torch.float64)
    v = torch.randn(DIM, generator=gen(), dtype=torch.float64)
    v = v / v.norm()
    Av = A @ v
    assert one.matvecs == 1
    assert float(one.eigenvalues[0]) == pytest.approx(float(Av.norm()), rel=1e-14)
    assert float(one.residuals[0]) == pytest.approx(float((Av - (v @ Av) * v).norm()), rel=1e-12)
    assert not one.converged


def test_deterministic_with_seeded_generator():
    A, _, _ = known_matrix()
    for name, solver in SOLVERS.items():
        k = 2 if name in ("lanczos", "eigsh") else 1
        r1 = solver(Counter(A), DIM, k=k, tol=1e-6, generator=gen(3), dtype=torch.float64)
        r2 = solver(Counter(A), DIM, k=k, tol=1e-6, generator=gen(3), dtype=torch.float64)
        assert np.array_equal(r1.eigenvalues, r2.eigenvalues)
        assert torch.equal(r1.eigenvectors, r2.eigenvectors)
        assert r1.matvecs == r2.matvecs


def test_float32_default_dtype():
    A, _, _ = known_matrix()
    A32 = A.float()
    result = lanczos(lambda v: A32 @ v, DIM, k=1, tol=1e-4, generator=gen())
    assert result.eigenvectors.dtype == torch.float32
    assert result.eigenvalues[0] == pytest.approx(TOP[0], rel=1e-4)


# --- errors --------------------------------------------------------------------------------


def identity(v):
    return v


@pytest.mark.parametrize("k", [0, -1, 11])
def test_lanczos_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        lanczos(identity, 10, k=k)


@pytest.mark.parametrize("tol", [0.0, -1e-3])
def test_lanczos_bad_tol(tol):
    with pytest.raises(ValueError, match="tol must be"):
        lanczos(identity, 10, tol=tol)


def test_lanczos_bad_max_iter():
    with pytest.raises(ValueError, match="max_iter"):
        lanczos(identity, 10, k=3, max_iter=2)


@pytest.mark.parametrize("solver", [power_iteration, paper_power_iteration])
def test_power_methods_reject_k_above_one(solver):
    with pytest.raises(ValueError, match="one eigenpair"):
        solver(identity, 10, k=2)


@pytest.mark.parametrize("solver", [lanczos, power_iteration, eigsh])
def test_bad_start_vector(solver):
    with pytest.raises(ValueError, match="shape"):
        solver(identity, 10, v0=torch.ones(9, dtype=torch.float64), dtype=torch.float64)
    with pytest.raises(ValueError, match="nonzero"):
        solver(identity, 10, v0=torch.zeros(10, dtype=torch.float64), dtype=torch.float64)
    with pytest.raises(ValueError, match="finite"):
        solver(identity, 10, v0=torch.full((10,), float("nan"), dtype=torch.float64), dtype=torch.float64)


def test_lanczos_bounds_cover_the_true_error_and_are_tighter_than_the_residual():
    # a known spectrum with a cluster at the top: 10.0, 9.96, 9.9, then a gap to 8 and below
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    values = torch.cat(
        [torch.tensor([10.0, 9.96, 9.9], dtype=torch.float64), torch.linspace(8, -1, 197, dtype=torch.float64)]
    )
    a = q @ torch.diag(values) @ q.T
    for tol in (1e-2, 1e-3, 1e-4):
        result = lanczos(
            lambda v: a @ v, 200, k=2, tol=tol, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        )
        assert result.gaps is not None and np.all(result.gaps > 0)
        true_error = np.abs(result.eigenvalues - values[:2].numpy())
        assert np.all(true_error <= result.bounds + 1e-12)
        assert np.all(result.bounds <= result.residuals)
        np.testing.assert_allclose(result.relative_bounds, result.bounds / 10.0, rtol=1e-3)
    # solvers without a gap estimate fall back to the residual
    single = power_iteration(
        lambda v: a @ v, 200, tol=1e-3, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    np.testing.assert_array_equal(single.bounds, single.residuals)


# --- block starts: a cluster of near-equal top eigenvalues whose eigenvectors rotate between solves

CLUSTER = np.array([10.0, 9.97, 9.9, 9.8])


def rotated_cluster_block(top_vecs, angle, b, seed=3):
    """The top ``b`` eigenvectors of a clustered matrix, mixed among themselves (a rotation inside
    the cluster) and tilted by ``angle`` out of it: what the previous solve hands over."""
    g = torch.Generator().manual_seed(seed)
    mix, _ = torch.linalg.qr(torch.randn(len(top_vecs), len(top_vecs), generator=g, dtype=torch.float64))
    noise = torch.randn(b, top_vecs.shape[1], generator=g, dtype=torch.float64)
    return (mix @ top_vecs)[:b] + angle * noise / noise.norm(dim=1, keepdim=True)


def test_block_start_finds_the_top_of_a_cluster_with_true_residuals():
    A, top_vecs, _ = known_matrix(top=CLUSTER)
    counter = Counter(A)
    block = rotated_cluster_block(top_vecs, 1e-2, 3)
    result = lanczos(counter, DIM, k=2, v0=block, tol=1e-8, max_iter=DIM, dtype=torch.float64)
    assert result.converged
    assert result.matvecs == counter.calls
    assert np.allclose(result.residuals, true_residuals(A, result), rtol=1e-6, atol=1e-12)
    assert np.all(result.residuals <= 1e-8 * result.eigenvalues[0] * (1 + 1e-9))
    assert np.all(np.abs(result.eigenvalues - CLUSTER[:2]) <= result.bounds + 1e-12)
    assert np.all(result.bounds <= result.residuals)
    V = result.eigenvectors
    assert torch.allclose(V @ V.T, torch.eye(2, dtype=torch.float64), atol=1e-10)


def test_block_start_is_cheaper_than_its_first_vector_alone_on_a_rotated_cluster():
    A, top_vecs, _ = known_matrix(top=CLUSTER)
    block = rotated_cluster_block(top_vecs, 1e-3, 4)
    one, many = Counter(A), Counter(A)
    single = lanczos(one, DIM, k=1, v0=block[0], tol=1e-6, max_iter=DIM, dtype=torch.float64)
    blocked = lanczos(many, DIM, k=1, v0=block, tol=1e-6, max_iter=DIM, dtype=torch.float64)
    assert single.converged and blocked.converged
    assert blocked.eigenvalues[0] == pytest.approx(CLUSTER[0], rel=1e-6)
    assert single.eigenvalues[0] == pytest.approx(CLUSTER[0], rel=1e-6)
    assert blocked.matvecs < single.matvecs


def test_start_block_of_exact_eigenvectors():
    # an invariant block (exact eigenvectors, zero residuals) that holds the top eigenvector:
    # converged after the block's products plus the one random product that checks it
    A, top_vecs, _ = known_matrix()
    counter = Counter(A)
    result = lanczos(counter, DIM, k=2, v0=top_vecs, tol=1e-8, max_iter=DIM, generator=gen(), dtype=torch.float64)
    assert result.converged
    assert np.allclose(result.eigenvalues, TOP[:2], rtol=1e-12)
    assert result.matvecs == counter.calls == len(top_vecs) + 1


@pytest.mark.parametrize("start", ["none", "vector", "block"])
def test_keep_returns_the_top_ritz_vectors_for_the_next_start(start):
    A, top_vecs, _ = known_matrix(top=CLUSTER)
    v0 = {"none": None, "vector": top_vecs[0] + 0.1 * top_vecs[3], "block": rotated_cluster_block(top_vecs, 1e-2, 3)}
    result = lanczos(
        Counter(A), DIM, k=1, keep=3, v0=v0[start], tol=1e-8, max_iter=DIM, generator=gen(), dtype=torch.float64
    )
    assert result.eigenvectors.shape == (1, DIM) and result.block.shape == (3, DIM)
    B = result.block
    assert torch.allclose(B @ B.T, torch.eye(3, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(B[0], result.eigenvectors[0])
    # the kept vectors are Ritz vectors: their Rayleigh quotients are the top Ritz values, near the cluster
    rayleigh = torch.einsum("bi,ij,bj->b", B, A, B)
    assert torch.all(rayleigh[:-1] >= rayleigh[1:] - 1e-10)
    assert float(rayleigh[0]) == pytest.approx(CLUSTER[0], rel=1e-8)
    assert lanczos(Counter(A), DIM, k=1, tol=1e-8, generator=gen(), dtype=torch.float64).block is None


def test_block_start_rejects_a_bad_block():
    A, _, _ = known_matrix()
    with pytest.raises(ValueError, match="shape"):
        lanczos(Counter(A), DIM, v0=torch.ones(2, DIM + 1, dtype=torch.float64), dtype=torch.float64)
    with pytest.raises(ValueError, match="nonzero"):
        lanczos(Counter(A), DIM, v0=torch.zeros(2, DIM, dtype=torch.float64), dtype=torch.float64)
    with pytest.raises(ValueError, match="finite"):
        lanczos(Counter(A), DIM, v0=torch.full((2, DIM), float("nan"), dtype=torch.float64), dtype=torch.float64)


def test_block_start_finds_every_copy_of_a_repeated_top_eigenvalue():
    # eigenvalue 5 three times over a bulk at 1: one start vector's Krylov space sees one copy; a
    # warm block near the eigenspace holds all three
    dim = 60
    A, top_vecs, _ = known_matrix(dim=dim, top=np.array([5.0, 5.0, 5.0]), low=1.0, high=1.0)
    block = top_vecs + 1e-3 * torch.randn(3, dim, generator=gen(7), dtype=torch.float64)
    counter = Counter(A)
    result = lanczos(counter, dim, k=3, v0=block, tol=1e-8, generator=gen(), dtype=torch.float64)
    assert result.converged
    assert np.allclose(result.eigenvalues, [5.0, 5.0, 5.0], atol=1e-8)
    assert result.matvecs == counter.calls <= 8
    assert torch.allclose(torch.linalg.svdvals(top_vecs @ result.eigenvectors.T), torch.ones(3, dtype=torch.float64))
