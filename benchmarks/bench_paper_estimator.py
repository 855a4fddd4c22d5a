"""The paper code's sharpness estimator against warm-started Lanczos at equal accuracy.

Long & Bartlett's estimator (finite-difference HVP with eps 1e-3, power iteration from a random
vector, stopped when ||Hv|| changes by less than a relative tolerance, at most 100 iterations)
is run at its own tolerance 1e-3 and at tighter ones, at points of a SAM run on the default MNIST
task.  Cost is counted in gradient evaluations, which does not depend on machine load: a
finite-difference HVP is exactly 2 gradients; an exact HVP costs the HVP/gradient time ratio
(measured here, interleaved).

    python benchmarks/bench_paper_estimator.py [--write]   # appends to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from samedge.core.curvature import HessianEigensolver
from samedge.core.eigen import paper_power_iteration
from samedge.core.optim import heavy_ball_update, sam_gradient
from samedge.core.params import flatten, unflatten
from samedge.experiment import build_config, build_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--points", type=int, nargs="+", default=[150, 300])
    parser.add_argument(
        "--activation",
        default="relu",
        help="MLP activation; with a smooth one (tanh) finite differences converge as eps^2",
    )
    args = parser.parse_args()
    cfg = build_config("mnist", overrides={"activation": args.activation})
    obj = build_task(cfg).train
    p = obj.parameters()
    v = tuple(torch.randn_like(t) for t in p)
    ratios = []
    for _ in range(7):
        t0 = time.perf_counter()
        obj.hvp(p, v)
        t1 = time.perf_counter()
        obj.grad(p)
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    hvp_cost = statistics.median(ratios)

    warm = HessianEigensolver(seed=1)
    rows = []
    for step in range(max(args.points) + 1):
        g = obj.grad(p)
        if step % cfg.measure_every == 0:
            r_warm = warm(obj, p)
        if step in args.points:
            ref = float(HessianEigensolver(tol=1e-9, max_iter=300, warm_start=False, seed=9)(obj, p).eigenvalues[0])
            rows.append(
                (step, "lanczos warm (tol 1e-3)", r_warm.matvecs * hvp_cost, abs(r_warm.eigenvalues[0] - ref) / ref)
            )
            cold = HessianEigensolver(warm_start=False, seed=step)(obj, p)
            rows.append(
                (step, "lanczos cold (tol 1e-3)", cold.matvecs * hvp_cost, abs(cold.eigenvalues[0] - ref) / ref)
            )
            params = tuple(p)

            def fd(x):
                return flatten(obj.finite_difference_hvp(params, unflatten(x, params), 1e-3))

            dim = sum(t.numel() for t in p)
            for tol, cap in ((1e-3, 100), (1e-4, 1000), (1e-5, 1000)):
                gen = torch.Generator().manual_seed(step)
                r = paper_power_iteration(fd, dim, tol=tol, max_iter=cap, generator=gen)
                rows.append(
                    (
                        step,
                        f"paper, rel. change {tol:g}, <= {cap} it.",
                        2.0 * r.matvecs,
                        abs(r.eigenvalues[0] - ref) / ref,
                    )
                )
        p, _ = heavy_ball_update(p, sam_gradient(obj.grad, p, g, cfg.rho), cfg.eta)

    lines = [
        f"## Paper estimator at equal accuracy (gradient evaluations per reading; {args.activation} MLP)",
        "",
        f"Points of the default SAM run with activation {args.activation} (steps {', '.join(map(str, args.points))}); "
        "reference: Lanczos to 1e-9. "
        f"One exact HVP = {hvp_cost:.2f} gradients (measured here); one finite-difference HVP = 2 gradients.",
        "",
        "| step | estimator | gradient evaluations | relative error |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {name} | {cost:.0f} | {err:.1e} |" for s, name, cost, err in rows]
    lines.append("")
    good = {}
    for s, name, cost, err in rows:
        if name.startswith("paper") and err <= 1e-3:
            good.setdefault(s, cost)
    warm_cost = {s: cost for s, name, cost, _ in rows if name.startswith("lanczos warm")}
    for s in args.points:
        if s in good:
            lines.append(
                f"- step {s}: cheapest paper setting with error <= 1e-3 costs {good[s]:.0f} gradients, "
                f"{good[s] / warm_cost[s]:.0f}x warm Lanczos"
            )
        else:
            lines.append(f"- step {s}: no paper setting tried reached 1e-3 error")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.write:
        path = Path(__file__).parent / "RESULTS.md"
        path.write_text(path.read_text() + "\n" + text + "\n")


if __name__ == "__main__":
    main()
