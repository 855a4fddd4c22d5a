"""Does the secant Ritz vector make a better Lanczos warm start than the previous reading's
eigenvector?  Along the MNIST default (SAM, 600 steps, a reading every 20), at every reading
where the secant estimate is valid, the same Lanczos solve (tolerance 1e-3) is started from each
and the HVPs are counted.

    python benchmarks/bench_secant_warm_start.py
"""

from __future__ import annotations

import statistics

import torch

from samedge.core.curvature import HessianEigensolver
from samedge.core.secant import StepSecants
from samedge.experiment import build_config, build_task


def main() -> None:
    torch.set_num_threads(1)
    cfg = build_config("mnist", overrides={"steps": 600})
    task = build_task(cfg)
    method, objective = cfg.method(), task.train
    usual = HessianEigensolver(seed=0)  # warm from the previous reading, as in a run
    from_ritz = HessianEigensolver(seed=0)
    secants = StepSecants(method)
    params, velocity = objective.parameters(), None
    pairs = []
    for step in range(cfg.steps + 1):
        grad = objective.grad(params)
        direction = method.direction(objective.grad, params, grad)
        secants.observe(params, grad, direction)
        if step % 20 == 0:
            start = usual.previous
            a = usual(objective, params)
            est = secants.window.estimate(with_vector=True)
            if est is not None and secants.valid(est) and est.vector is not None and start is not None:
                from_ritz.previous = est.vector[None].to(params[0].dtype)
                b = from_ritz(objective, params)
                pairs.append((a.matvecs, b.matvecs))
                print(f"step {step}: {a.matvecs} HVPs from the previous eigenvector, {b.matvecs} from the Ritz vector")
        params, velocity = method.update(params, direction, velocity)
    usual_hvps, ritz_hvps = [p for p, _ in pairs], [r for _, r in pairs]
    print(
        f"{len(pairs)} readings with a valid secant estimate: median HVPs {statistics.median(usual_hvps)} "
        f"(previous eigenvector) vs {statistics.median(ritz_hvps)} (Ritz vector); "
        f"total {sum(usual_hvps)} vs {sum(ritz_hvps)}"
    )


if __name__ == "__main__":
    main()
