"""Readings of a default run against a tight solve at the same weights.

Trains a task's default preset (or ``--preset``) with the library, as ``samedge run`` does: the
optimizer step, and at every ``measure_every`` steps a reading by a warm-started
``HessianEigensolver`` with the preset's ``eig_tol``; for minibatch runs also the reading on the
fixed evaluation batch.  Each reading is then checked by a solve at the same weights to a relative
residual of 1e-7, started from the reading's own eigenvector (that solve never changes the run's
solver state).  It reports, per reading: HVPs, relative residual, ``eig_bound`` and the true
relative error ``(lambda_ref - theta) / lambda_ref``; and the worst error against ``eig_tol``.

    python benchmarks/bench_reading_accuracy.py mnist --steps 300
    python benchmarks/bench_reading_accuracy.py cifar10 --data DIR --steps 100
    python benchmarks/bench_reading_accuracy.py shakespeare --data PATH/input.txt --steps 400
"""

from __future__ import annotations

import argparse
import statistics

import torch

from samedge.core.curvature import HessianEigensolver
from samedge.experiment import build_config, build_task

REFERENCE_TOL = 1e-7


def check(objective, params, solver: HessianEigensolver) -> dict:
    result = solver(objective, params)
    ref = HessianEigensolver(tol=REFERENCE_TOL, max_iter=300, warm_start=False)
    ref.previous = result.eigenvectors[:1].clone()
    ref.warm_start = True
    tight = ref(objective, params)
    lam, theta = float(tight.eigenvalues[0]), float(result.eigenvalues[0])
    return {
        "hvps": result.matvecs,
        "residual": float(result.relative_residuals[0]),
        "bound": float(result.relative_bounds[0]),
        "error": (lam - theta) / abs(lam),
        "reference_converged": bool(tight.converged),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task")
    ap.add_argument("--preset")
    ap.add_argument("--data")
    ap.add_argument("--steps", type=int, help="train this many steps (default: the preset's)")
    args = ap.parse_args()
    overrides = {k: v for k, v in (("data", args.data), ("steps", args.steps)) if v is not None}
    cfg = build_config(args.task, preset=args.preset, overrides=overrides)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg)
    method = cfg.method()
    solver = HessianEigensolver(k=cfg.eig_k, tol=cfg.eig_tol, max_iter=cfg.eig_max_iter, seed=cfg.seed)
    eval_solver = HessianEigensolver(tol=cfg.eig_tol, max_iter=cfg.eig_max_iter, seed=cfg.seed + 2)
    params, velocity = task.train.parameters(), None
    rows: list[tuple[str, int, dict]] = []
    for step in range(cfg.steps + 1):
        objective = task.objective_at(step)
        ev = objective.loss_and_grad(params)
        assert ev.grad is not None
        direction = method.direction(objective.grad, params, ev.grad)
        if step % cfg.measure_every == 0 or step == cfg.steps:
            batches = [("train" if task.minibatch is None else "minibatch", objective, solver)]
            if task.eval_batch is not None:
                batches.append(("eval batch", task.eval_batch, eval_solver))
            for name, obj, s in batches:
                r = check(obj, params, s)
                rows.append((name, step, r))
                print(
                    f"{name:10s} step {step:5d}: {r['hvps']:3d} HVPs, residual {r['residual']:.1e}, "
                    f"eig_bound {r['bound']:.1e}, true error {r['error']:.1e}",
                    flush=True,
                )
        if step == cfg.steps:
            break
        params, velocity = method.update(params, direction, velocity)
    print(f"\n{cfg.task} (preset {args.preset or 'default'}), {cfg.steps} steps, eig_tol {cfg.eig_tol:g}:")
    for name in dict.fromkeys(n for n, _, _ in rows):
        mine = [r for n, _, r in rows if n == name]
        warm = [r["hvps"] for r in mine[1:]]
        worst = max(abs(r["error"]) for r in mine)
        print(
            f"- {name}: {len(mine)} readings; HVPs per warm reading median {statistics.median(warm) if warm else 'n/a'}"
            f" ({min(warm, default=0)}-{max(warm, default=0)}); worst true error {worst:.1e}"
            f" (eig_tol {cfg.eig_tol:g}); worst eig_bound {max(r['bound'] for r in mine):.1e};"
            f" true error above eig_bound at {sum(abs(r['error']) > r['bound'] for r in mine)} readings;"
            f" references converged: {all(r['reference_converged'] for r in mine)}"
        )


if __name__ == "__main__":
    main()
