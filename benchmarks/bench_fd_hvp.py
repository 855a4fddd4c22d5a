"""How far the paper code's finite-difference HVP is from the exact one, by step eps.

At the default MNIST MLP's initialization, the top Hessian eigenvector v is found by Lanczos on
exact HVPs (tolerance 1e-9); then the Rayleigh quotient v.(Hv) of the central difference
``(grad(w + eps v) - grad(w - eps v)) / (2 eps)`` is compared with the exact one, for a ReLU and a
tanh MLP, in float32 and float64.  A smooth network's difference shrinks as eps^2; a ReLU
network's does not.

    python benchmarks/bench_fd_hvp.py
"""

from __future__ import annotations

import torch

from samedge.core.curvature import HessianEigensolver
from samedge.core.params import flatten, unflatten
from samedge.experiment import build_config, build_task

EPS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


def relative_differences(activation: str, dtype: str) -> list[float]:
    obj = build_task(build_config("mnist", overrides={"activation": activation, "dtype": dtype})).train
    params = obj.parameters()
    top = HessianEigensolver(tol=1e-9, max_iter=300, warm_start=False, seed=3)(obj, params).eigenvectors[0]
    top = (top / torch.linalg.vector_norm(top)).double()
    v = unflatten(top.to(params[0].dtype), params)

    def rayleigh(hv) -> float:
        return float(torch.dot(flatten(hv).double(), top))

    exact = rayleigh(obj.hvp(params, v))
    return [(rayleigh(obj.finite_difference_hvp(params, v, eps)) - exact) / exact for eps in EPS]


def main() -> None:
    print("| activation | dtype | " + " | ".join(f"eps {e:g}" for e in EPS) + " |")
    print("|---|---|" + "---|" * len(EPS))
    for activation in ("relu", "tanh"):
        for dtype in ("float32", "float64"):
            diffs = relative_differences(activation, dtype)
            print(f"| {activation} | {dtype} | " + " | ".join(f"{d:+.1e}" for d in diffs) + " |")


if __name__ == "__main__":
    main()
