"""The operator type the solvers take, and the Lanczos process shared by the eigen-solver and SLQ."""

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

from samedge import LinearOperator
from samedge.core.eigen import SOLVERS, eigsh, lanczos
from samedge.core.lanczos import LanczosProcess, orthonormal_rows, project_out
from samedge.core.objective import Objective
from samedge.core.operator import as_operator
from samedge.core.spectrum import hutchinson_trace, slq_density

DIM = 40


def matrix(dim=DIM, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return (B + B.T) / 2


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def test_operator_counts_its_products_and_carries_its_shape():
    A = matrix()
    op = LinearOperator(lambda v: A @ v, DIM, dtype=torch.float64)
    assert op.shape == (DIM, DIM) and op.device == torch.device("cpu") and op.matvecs == 0
    v = torch.ones(DIM, dtype=torch.float64)
    torch.testing.assert_close(op(v), A @ v)
    torch.testing.assert_close(op.matvec(v), A @ v)
    assert op.matvecs == 2
    assert "matvecs=2" in repr(op)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        LinearOperator(lambda v: v, 0)


def test_as_operator_wraps_a_callable_and_checks_an_operator():
    wrapped = as_operator(lambda v: v, 5)
    assert isinstance(wrapped, LinearOperator) and wrapped.dim == 5 and wrapped.dtype == torch.float32
    op = LinearOperator(lambda v: v, 5, dtype=torch.float64)
    assert as_operator(op) is op
    assert as_operator(op, 5, dtype=torch.float64, device="cpu") is op
    with pytest.raises(ValueError, match="dim"):
        as_operator(op, 6)
    with pytest.raises(ValueError, match="dtype"):
        as_operator(op, dtype=torch.float32)
    with pytest.raises(ValueError, match="device"):
        as_operator(op, device="meta")
    with pytest.raises(TypeError, match="dim is required"):
        as_operator(lambda v: v)
    with pytest.raises(TypeError, match="LinearOperator or a callable"):
        as_operator(np.eye(3), 3)


def test_to_scipy_is_the_same_operator_and_counts():
    A = matrix()
    op = LinearOperator(lambda v: A @ v, DIM, dtype=torch.float64)
    sp = op.to_scipy()
    x = np.linspace(-1, 1, DIM)
    np.testing.assert_allclose(sp.matvec(x), A.numpy() @ x, rtol=1e-14)
    np.testing.assert_allclose(sp.rmatvec(x), A.numpy() @ x, rtol=1e-14)
    vals = scipy.sparse.linalg.eigsh(sp, k=1, which="LA", return_eigenvectors=False)
    assert vals[0] == pytest.approx(float(torch.linalg.eigvalsh(A)[-1]), rel=1e-10)
    assert op.matvecs > 2


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_give_the_same_numbers_from_an_operator_as_from_a_callable(name):
    A = matrix()
    solver = SOLVERS[name]
    k = 2 if name in ("lanczos", "eigsh") else 1
    plain = solver(lambda v: A @ v, DIM, k=k, tol=1e-6, generator=gen(), dtype=torch.float64)
    op = LinearOperator(lambda v: A @ v, DIM, dtype=torch.float64)
    op(torch.zeros(DIM, dtype=torch.float64))  # products taken before the solve are not its own
    wrapped = solver(op, k=k, tol=1e-6, generator=gen())
    assert np.array_equal(plain.eigenvalues, wrapped.eigenvalues)
    assert torch.equal(plain.eigenvectors, wrapped.eigenvectors)
    assert plain.matvecs == wrapped.matvecs == op.matvecs - 1


def test_spectrum_estimators_take_an_operator():
    A = matrix()
    op = LinearOperator(lambda v: A @ v, DIM, dtype=torch.float64)
    d1 = slq_density(op, probes=2, steps=10, generator=gen(3))
    d2 = slq_density(lambda v: A @ v, DIM, probes=2, steps=10, generator=gen(3), dtype=torch.float64)
    assert np.array_equal(d1.nodes, d2.nodes) and np.array_equal(d1.weights, d2.weights)
    assert d1.matvecs == d2.matvecs == op.matvecs == 20
    t = hutchinson_trace(op, probes=4, generator=gen(3), deflate=torch.eye(DIM, dtype=torch.float64)[:2])
    assert t.matvecs == 6 and op.matvecs == 26


def test_lanczos_process_satisfies_the_lanczos_relation():
    A = matrix()
    op = LinearOperator(lambda v: A @ v, DIM, dtype=torch.float64)
    start = torch.randn(DIM, generator=gen(), dtype=torch.float64)
    process = LanczosProcess(op, start / start.norm())
    for _ in range(7):
        process.step()
        process.advance()
    beta = process.step()
    alphas, betas = process.tridiagonal()
    assert len(alphas) == 8 and len(betas) == 7 and op.matvecs == 8
    T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    Q = process.Q
    assert torch.allclose(Q @ Q.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    # A Q^T = Q^T T + r e_m^T, with ||r|| = beta
    R = A @ Q.T - Q.T @ torch.as_tensor(T)
    assert torch.allclose(R[:, :-1], torch.zeros(DIM, 7, dtype=torch.float64), atol=1e-12)
    assert float(R[:, -1].norm()) == pytest.approx(beta, rel=1e-10)
    theta, S = process.ritz()
    np.testing.assert_allclose(np.sort(theta), np.linalg.eigvalsh(T), atol=1e-12)
    with pytest.raises(RuntimeError, match="between two steps"):
        process.step()


def test_lanczos_process_restart_splits_the_tridiagonal_matrix():
    A = torch.diag(torch.tensor([3.0, 3.0, 1.0, 1.0], dtype=torch.float64))
    op = LinearOperator(lambda v: A @ v, 4, dtype=torch.float64)
    process = LanczosProcess(op, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert process.step() == pytest.approx(0.0, abs=1e-15)  # an eigenvector: invariant at once
    process.restart(torch.ones(4, dtype=torch.float64))
    process.step()
    alphas, betas = process.tridiagonal()
    assert betas.tolist() == [0.0]
    assert float(process.Q[1, 0]) == pytest.approx(0.0, abs=1e-15)
    assert alphas[1] == pytest.approx((3.0 + 1.0 + 1.0) / 3)


def test_orthonormal_rows_drops_dependent_rows_and_projects_out():
    V = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    Q = orthonormal_rows(V)
    assert Q.shape == (2, 3) and torch.allclose(Q @ Q.T, torch.eye(2, dtype=torch.float64))
    rest = orthonormal_rows(torch.eye(3, dtype=torch.float64), against=Q)
    assert rest.shape == (1, 3) and torch.allclose(Q @ rest.T, torch.zeros(2, 1, dtype=torch.float64), atol=1e-15)
    assert orthonormal_rows(torch.zeros(2, 3)).shape == (0, 3)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(project_out(w, Q), project_out(w[None], Q)[0])


def test_hvp_operator_is_a_linear_operator_of_the_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    obj = Objective.from_tensors(model, nn.MSELoss(), x, y, None)
    params = obj.parameters()
    op = obj.hvp_operator(params)
    assert isinstance(op, LinearOperator)
    assert op.dim == sum(p.numel() for p in params) == 21 and op.dtype == torch.float64
    result = lanczos(op, k=1, tol=1e-8, generator=gen())
    assert result.matvecs == op.matvecs
    cold = eigsh(obj.hvp_operator(params), k=1, tol=1e-10, generator=gen())
    obj.release_hvp_graph()
    assert result.eigenvalues[0] == pytest.approx(cold.eigenvalues[0], rel=1e-7)
