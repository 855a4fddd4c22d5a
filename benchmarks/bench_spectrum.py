"""Hessian trace and spectral density: samedge against PyHessian on the same model and weights.

A small MNIST MLP (784-4-4-10, ReLU, 3,210 parameters, 1,000 embedded digits, squared error, the
task's preprocessing), at initialization and after ``--steps`` GD steps, so that its Hessian can
be formed exactly: all 3,210 columns by exact HVPs in float64, symmetrized, then ``eigvalsh``.
The estimators run in float32 on the same weights (the model as runs use it), in chunks of 250
examples; every HVP is counted.

* trace: samedge's Hutchinson (32 and 128 Rademacher probes; and with the top 10 eigenvectors of a
  Lanczos solve deflated, those HVPs counted) against PyHessian's ``trace()`` (Hutchinson stopped
  when the running mean changes by less than 1e-3 relative, at most 100 probes; no error bar).
  Each is repeated with ``--repeats`` seeds: median and largest relative error, HVPs, and for
  samedge how often the exact trace lies within 2 standard errors.
* density: Wasserstein-1 distance between each SLQ measure and the empirical distribution of the
  exact eigenvalues, relative to the spectrum's width, for samedge's ``slq_density`` and
  PyHessian's ``density()`` with the same probes and Lanczos steps.  PyHessian 0.1 calls
  ``torch.eig``, which PyTorch removed in 2.0; the benchmark supplies it from ``torch.linalg.eigh``
  (the tridiagonal matrix is symmetric) and changes nothing else.

PyHessian is installed only for this script (``pip install --no-deps pyhessian``: it declares no
torch pin, and its code needs only torch and numpy); it is not a dependency of samedge.

    python benchmarks/bench_spectrum.py [--write]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _report import machine, publish

from samedge.core.curvature import HessianEigensolver
from samedge.core.method import Method
from samedge.core.params import flatten, unflatten
from samedge.core.spectrum import hessian_density, hessian_trace
from samedge.experiment import build_config, build_task


def _pyhessian():
    import sys

    import pyhessian  # noqa: F401  (its __init__ shadows the module name with the class)

    ph = sys.modules["pyhessian.hessian"]

    # torch.eig was removed in torch 2.0 (a stub that raises is left); PyHessian 0.1's density() needs it

    def eig(T, eigenvectors=True):
        w, V = torch.linalg.eigh(T)  # T is symmetric tridiagonal
        return torch.stack([w, torch.zeros_like(w)], dim=1), V

    ph.torch.eig = eig
    return ph.hessian


def exact_spectrum(obj64, params64) -> tuple[float, np.ndarray]:
    n = sum(p.numel() for p in params64)
    cols = []
    for i in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = 1.0
        cols.append(flatten(obj64.hvp(params64, unflatten(e, params64))))
    H = torch.stack(cols, dim=1)
    H = 0.5 * (H + H.T)
    return float(torch.trace(H)), torch.linalg.eigvalsh(H).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--steps", type=int, default=300, help="GD steps before the second point")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = dict(n_train=1000, n_test=100, width=4, depth=3, chunk_size=250, optimizer="gd", eta=0.5)
    task32 = build_task(build_config("mnist", overrides={**settings, "dtype": "float32"}))
    task64 = build_task(build_config("mnist", overrides={**settings, "dtype": "float64"}))
    obj32, obj64 = task32.train, task64.train
    Hessian = _pyhessian()
    lines = [f"Machine: {machine()}.", ""]
    params = obj32.parameters()
    method = Method("gd", 0.5)
    for point in ("initialization", f"after {args.steps} GD steps (eta 0.5)"):
        if point != "initialization":
            for _ in range(args.steps):
                params, _ = method.update(params, obj32.grad(params), None)
        for p, q in zip(task32.model.parameters(), params):  # PyHessian reads the module's weights
            p.data.copy_(q)
        params64 = tuple(p.double() for p in params)
        t0 = time.perf_counter()
        exact, eigs = exact_spectrum(obj64, params64)
        spread = float(eigs.max() - eigs.min())
        loss = obj32.evaluate(params).loss
        lines += [
            f"## {point}: train loss {loss:.4g}",
            "",
            f"Exact (dense float64, {len(eigs)} HVPs, {time.perf_counter() - t0:.1f} s): trace {exact:.6g}, "
            f"top eigenvalue {eigs.max():.5g}, eigenvalues in [{eigs.min():.3g}, {eigs.max():.4g}].",
            "",
            "| trace estimator | median rel. error | max rel. error | HVPs (median) | exact within 2 s.e. |",
            "|---|---|---|---|---|",
        ]
        top = HessianEigensolver(k=10, tol=1e-3, warm_start=False, seed=0)(obj32, params)

        def row(name, errs, hvps, covered=None):
            cov = "n/a (no error bar)" if covered is None else f"{sum(covered)}/{len(covered)}"
            lines.append(f"| {name} | {np.median(errs):.2%} | {np.max(errs):.2%} | {int(np.median(hvps))} | {cov} |")

        for probes in (32, 128):
            for deflate in (False, True):
                errs, hvps, covered = [], [], []
                for seed in range(args.repeats):
                    est = hessian_trace(
                        obj32,
                        params,
                        probes=probes,
                        generator=torch.Generator().manual_seed(seed),
                        deflate=top.eigenvectors if deflate else None,
                    )
                    errs.append(abs(est.trace - exact) / exact)
                    hvps.append(est.matvecs + (top.matvecs if deflate else 0))
                    covered.append(abs(est.trace - exact) <= 2 * est.stderr)
                name = f"samedge Hutchinson, {probes} probes" + (
                    f" + top-10 deflation (Lanczos {top.matvecs} HVPs incl.)" if deflate else ""
                )
                row(name, errs, hvps, covered)
        errs, hvps = [], []
        for seed in range(args.repeats):
            torch.manual_seed(seed)
            hv = Hessian(task32.model, task32.train.loss_fn, dataloader=obj32.chunks, cuda=False)
            samples = hv.trace(maxIter=100, tol=1e-3)
            errs.append(abs(float(np.mean(samples)) - exact) / exact)
            hvps.append(len(samples))
        row("PyHessian trace() (tol 1e-3, at most 100)", errs, hvps)
        lines += [
            "",
            "| density (4 probes, 64 Lanczos steps) | W1 / spectrum width (median of seeds) | max | HVPs |",
            "|---|---|---|---|",
        ]
        ours, theirs = [], []
        for seed in range(min(args.repeats, 5)):
            d = hessian_density(obj32, params, probes=4, steps=64, generator=torch.Generator().manual_seed(seed))
            ours.append(d.wasserstein(eigs) / spread)
            torch.manual_seed(seed)
            hv = Hessian(task32.model, task32.train.loss_fn, dataloader=obj32.chunks, cuda=False)
            nodes, weights = hv.density(iter=64, n_v=4)
            nodes, weights = np.asarray(nodes).ravel(), np.asarray(weights).ravel() / 4
            import scipy.stats

            theirs.append(scipy.stats.wasserstein_distance(nodes, eigs, weights) / spread)
        lines.append(f"| samedge slq_density | {np.median(ours):.4f} | {np.max(ours):.4f} | {d.matvecs} |")
        lines.append(f"| PyHessian density() | {np.median(theirs):.4f} | {np.max(theirs):.4f} | {4 * 64} |")
        lines.append("")
    publish(
        lines,
        title="Hessian trace and spectral density",
        script="bench_spectrum.py",
        filename="SPECTRUM.md" if args.write else None,
    )


if __name__ == "__main__":
    main()
