"""Speed and HVP-count benchmarks of the core, on the default MNIST task (MLP 4 x 256, 2,000
embedded digits, full batch).  Every figure is a ratio or a count measured within this one run.

    python benchmarks/bench_core.py            # prints a markdown report
    python benchmarks/bench_core.py --write    # also writes benchmarks/RESULTS.md

Targets (issue 2): HVP/gradient time <= 2.1; HVPs per sharpness reading at 1e-3 relative
accuracy <= 20 cold and <= 6 warm-started during training; >= 10x cheaper than the paper code's
estimator at equal accuracy; SAM step / GD step <= 2.05.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from _report import machine, publish  # benchmarks/_report.py (the script's folder is on sys.path)

from samedge.core.curvature import HessianEigensolver
from samedge.core.objective import Objective
from samedge.core.optim import heavy_ball_update, sam_gradient
from samedge.experiment import build_config, build_task


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls (after two warm-up calls)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_ratio(num, den, repeats: int) -> float:
    """Median of per-round ratios num/den, the two timed back to back in each round (so slow
    phases of a shared machine hit both)."""
    num()
    den()
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        num()
        t1 = time.perf_counter()
        den()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="write benchmarks/RESULTS.md")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--train-steps", type=int, default=400, help="SAM steps for the warm-start study")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    lines: list[str] = []
    say = lines.append

    cfg = build_config("mnist")
    task = build_task(cfg)
    obj: Objective = task.train
    params = obj.parameters()
    vec = tuple(torch.randn_like(p) for p in params)
    say(f"Machine: {machine()}.  ")
    say(f"Task: {task.source}; MLP depth {cfg.depth} width {cfg.width}, {task.n_parameters:,} parameters, full batch.")
    say("")

    # 1. HVP / gradient
    say("## HVP time / gradient time")
    say("")
    say("| HVP route | HVP / gradient (median of interleaved pairs) |")
    say("|---|---|")
    hvp_ratios = {}
    for mode in ("double-backward", "forward-over-reverse"):
        o = Objective(obj.model, obj.loss_fn, obj.chunks, hvp_mode=mode)
        hvp_ratios[mode] = interleaved_ratio(lambda: o.hvp(params, vec), lambda: o.grad(params), args.repeats)
        say(f"| {mode} | {hvp_ratios[mode]:.2f} |")
    say("")

    # 2. SAM step / GD step
    def gd_step():
        g = obj.grad(params)
        heavy_ball_update(params, g, cfg.eta)

    def sam_step():
        g = obj.grad(params)
        heavy_ball_update(params, sam_gradient(obj.grad, params, g, cfg.rho), cfg.eta)

    say("## SAM step / GD step")
    say("")
    say(f"SAM step / GD step time: **{interleaved_ratio(sam_step, gd_step, args.repeats):.2f}** (target <= 2.05).")
    say("")

    # 3. HVPs per reading: cold and warm-started along a SAM trajectory
    def reference(p):
        return float(HessianEigensolver(tol=1e-9, max_iter=300, warm_start=False, seed=123)(obj, p).eigenvalues[0])

    rows = {
        "lanczos-cold": [],
        "lanczos-warm": [],
        "eigsh-cold": [],
        "eigsh-warm": [],
        "power-cold": [],
        "paper-cold": [],
    }
    errors = {k: [] for k in rows}
    seconds = {k: [] for k in rows}
    warm = {
        "lanczos-warm": HessianEigensolver(method="lanczos", seed=1),
        "eigsh-warm": HessianEigensolver(method="eigsh", seed=1),
    }
    p = params
    measure_every = cfg.measure_every
    for step in range(args.train_steps + 1):
        g = obj.grad(p)
        if step % measure_every == 0:
            checkpoint = step % (5 * measure_every) == 0  # cold solves and references at every 5th reading
            ref = reference(p) if checkpoint else None
            for name, solver in warm.items():
                t = time.perf_counter()
                r = solver(obj, p)
                if step > 0 and checkpoint:
                    seconds[name].append(time.perf_counter() - t)
                    rows[name].append(r.matvecs)
                    errors[name].append(abs(r.eigenvalues[0] - ref) / abs(ref))
            if checkpoint:
                for name, method in (
                    ("lanczos-cold", "lanczos"),
                    ("eigsh-cold", "eigsh"),
                    ("power-cold", "power"),
                    ("paper-cold", "paper"),
                ):
                    solver = HessianEigensolver(method=method, warm_start=False, seed=step)
                    t = time.perf_counter()
                    r = solver(obj, p)
                    seconds[name].append(time.perf_counter() - t)
                    rows[name].append(r.matvecs)
                    errors[name].append(abs(r.eigenvalues[0] - ref) / abs(ref))
        p, _ = heavy_ball_update(p, sam_gradient(obj.grad, p, g, cfg.rho), cfg.eta)

    say("## HVPs per sharpness reading (tolerance 1e-3)")
    say("")
    say(
        f"Readings every {measure_every} steps along a {args.train_steps}-step SAM run (eta {cfg.eta}, rho {cfg.rho}); "
        "cold solves and the reference (Lanczos to 1e-9) at every 5th reading; warm solves start from the "
        "previous reading's eigenvector.  `paper` counts finite-difference HVPs (2 gradients each)."
    )
    say("")
    say("| solver | readings | HVPs median | HVPs max | worst relative error | median seconds |")
    say("|---|---|---|---|---|---|")
    for name in rows:
        if rows[name]:
            say(
                f"| {name} | {len(rows[name])} | {np.median(rows[name]):.0f} | {max(rows[name])} | "
                f"{max(errors[name]):.1e} | {np.median(seconds[name]):.3f} |"
            )
    say("")
    paper_t = np.median(seconds["paper-cold"])
    say("## Against the paper code's estimator")
    say("")
    say(
        f"The paper's estimator (finite-difference HVP, power iteration, stop at 1e-3 relative change) reached a worst "
        f"error of {max(errors['paper-cold']):.1e}; Lanczos at tolerance 1e-3 reached {max(errors['lanczos-cold']):.1e} "
        f"cold and {max(errors['lanczos-warm']):.1e} warm, so Lanczos is at least as accurate in every reading."
    )
    say("")
    say(f"- time per reading, paper / Lanczos cold: **{paper_t / np.median(seconds['lanczos-cold']):.1f}x**")
    say(
        f"- time per reading, paper / Lanczos warm (as in training): **{paper_t / np.median(seconds['lanczos-warm']):.1f}x**"
    )
    say("")
    say(
        f"1-minute load average at the start {load_start:.2f}, at the end {os.getloadavg()[0]:.2f} "
        f"({os.cpu_count()} cores; this benchmark alone keeps about {torch.get_num_threads()} busy, so a higher load means other work shared the machine and the time ratios are unreliable)."
    )
    publish(lines, title="Benchmark results", script="bench_core.py", filename="RESULTS.md" if args.write else None)


if __name__ == "__main__":
    main()
