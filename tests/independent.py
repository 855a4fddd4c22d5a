"""Independent reference computations shared by tests (imported as a sibling module; pytest puts
``tests/`` on ``sys.path``)."""

import numpy as np
import scipy.sparse.linalg
import torch

from samedge.core.params import flatten, unflatten


def top_eigenvalue(hvp, like, tol: float = 1e-12) -> float:
    """Largest eigenvalue of the symmetric operator ``hvp`` (parameter tuple -> parameter tuple,
    shaped like ``like``) by SciPy's ARPACK, in float64 from a fixed start vector."""
    n = sum(p.numel() for p in like)

    def matvec(x):
        v = unflatten(torch.as_tensor(x, dtype=torch.float64).ravel().to(like[0].dtype), like)
        return flatten(hvp(v)).double().numpy()

    op = scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    return float(scipy.sparse.linalg.eigsh(op, k=1, which="LA", tol=tol, v0=np.ones(n))[0][0])
