"""Wall time of a preset run as a ratio to a fixed CPU workload timed in the same run.

A wall time alone says little on another machine, or on this one when it is busy; the ratio to a
fixed workload measured just before and just after the run carries over.  The workload: 20
full-batch gradients of a small CNN (two 3x3 conv blocks, 16 and 32 channels, as the paper's) on
1,000 random 32x32 images, with 2 torch threads, in a process of its own (about 8 s on 2 quiet
CPU cores of the development machine).  The preset runs as a user runs it, ``samedge run TASK
--preset NAME --no-plots`` in a process of its own, with torch's default threads.

    python benchmarks/bench_presets.py mnist
    python benchmarks/bench_presets.py shakespeare --data PATH/input.txt
    python benchmarks/bench_presets.py cifar10 --data DIR
    python benchmarks/bench_presets.py shakespeare --data FILE -- --seed 1   # extra settings

It also prints the run's wall time over its floor: ``steps x`` the time of one optimizer step plus
``readings x`` the time of the cheapest possible reading (a warm solve started from the converged
top eigenvector, evaluation batch included), both timed at the run's final weights in one process
of their own (fastest of 3).  What lies above the floor is the readings' extra HVPs, the first
(cold) reading, loading data, writing files and checkpoints.

It prints the wall time, the workload's seconds before and after, their ratio, and what the run
measured: the step where the sharpness reached its edge (summary.json's ``edge_reached_step``),
the median and IQR of sharpness/edge from there, and the minibatch check of the acceptance test
(median sharpness/edge from the first reading after step 0 within 10% of the edge).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE_GRADIENTS = 20


def reference_workload(n: int = REFERENCE_GRADIENTS) -> float:
    """Seconds for ``n`` gradients of the fixed CNN workload (after 2 warm-up gradients)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    x, y = torch.randn(1000, 3, 32, 32), torch.randn(1000, 10)
    params = list(net.parameters())
    for _ in range(2):
        torch.autograd.grad(((net(x) - y) ** 2).mean(), params)
    t0 = time.perf_counter()
    for _ in range(n):
        torch.autograd.grad(((net(x) - y) ** 2).mean(), params)
    return time.perf_counter() - t0


def timed_reference() -> float:
    """The workload in a fresh process (its thread setting must not touch the preset run's)."""
    out = subprocess.run([sys.executable, __file__, "--reference"], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def cost_floor(run_dir: Path, repeats: int = 3) -> dict:
    """Seconds of one optimizer step and of the cheapest reading at ``run_dir``'s final weights."""

    from samedge.core.curvature import HessianEigensolver
    from samedge.experiment import RunDir, build_task, load_checkpoint

    cfg = RunDir(run_dir).read_config()
    task = build_task(cfg)
    like = task.train.parameters()
    state = load_checkpoint(run_dir, cfg.to_dict(), like, device=like[0].device)
    step = state.step - 1 if state.finished else state.step
    objective, method, params = task.objective_at(step), cfg.method(), state.params

    def fastest(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def optimizer_step() -> None:
        ev = objective.loss_and_grad(params)
        method.update(params, method.direction(objective.grad, params, ev.grad))

    def solvers():
        pairs = [(objective, HessianEigensolver(k=cfg.eig_k, tol=cfg.eig_tol, max_iter=cfg.eig_max_iter))]
        if task.eval_batch is not None:
            pairs.append((task.eval_batch, HessianEigensolver(tol=cfg.eig_tol, max_iter=cfg.eig_max_iter)))
        for obj, solver in pairs:
            solver(obj, params)  # converge once: later solves start from the eigenvector itself
        return pairs

    pairs = solvers()
    hvps = []

    def reading() -> None:
        hvps.append(sum(solver(obj, params).matvecs for obj, solver in pairs))

    return {"step_seconds": fastest(optimizer_step), "reading_seconds": fastest(reading), "reading_hvps": min(hvps)}


def timed_floor(run_dir: Path) -> dict:
    """:func:`cost_floor` in a fresh process, with the run's (torch's default) threads."""
    out = subprocess.run(
        [sys.executable, __file__, "--floor", str(run_dir)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def tracking(metrics: Path) -> dict:
    """The acceptance test's minibatch check on ``metrics.csv``."""
    import csv

    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    q = [float(r["sharpness"]) / float(r["sam_edge"]) for r in rows]
    k = next((i for i, v in enumerate(q) if i > 0 and 0.9 <= v <= 1.1), None)
    if k is None:
        return {"within_10pct_step": None}
    return {"within_10pct_step": int(float(rows[k]["step"])), "median_from_there": statistics.median(q[k:])}


def main() -> None:
    if sys.argv[1:] == ["--reference"]:
        print(f"{reference_workload():.3f}")
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--floor":
        print(json.dumps(cost_floor(Path(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task")
    ap.add_argument("--preset", help="preset name (default: the task's default preset)")
    ap.add_argument("--data")
    ap.add_argument("--out", help="keep the run directory here (default: a temporary one, removed)")
    argv = sys.argv[1:]
    # settings for samedge run follow "--" (split here: argparse would give them to the task)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    cmd = [sys.executable, "-m", "samedge", "run", args.task, "--no-plots"]
    if args.preset:
        cmd += ["--preset", args.preset]
    if args.data:
        cmd += ["--data", args.data]
    cmd += args.extra
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "run"
        ref_before = timed_reference()
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        ref_after = timed_reference()
        if proc.returncode != 0:
            sys.exit(f"bench_presets: {' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        summary = json.loads((out / "summary.json").read_text())
        track = tracking(out / "metrics.csv")
        floor = timed_floor(out)
        readings = sum(1 for _ in (out / "metrics.csv").open()) - 1
        steps = int(summary["final_step"])
    ref = (ref_before + ref_after) / 2
    print(f"command: samedge {' '.join(cmd[3:])}")
    print(f"wall {wall:.1f} s; reference workload {ref_before:.2f} s before, {ref_after:.2f} s after")
    print(f"ratio to the reference workload: {wall / ref:.1f}x")
    floor_s = steps * floor["step_seconds"] + readings * floor["reading_seconds"]
    print(
        f"floor: {steps} steps x {floor['step_seconds']:.3f} s + {readings} readings x "
        f"{floor['reading_seconds']:.3f} s ({floor['reading_hvps']} HVPs) = {floor_s:.1f} s; "
        f"wall / floor {wall / floor_s:.2f}"
    )
    cost = summary.get("cost", {})
    if cost:
        print(
            f"cost: training {cost['train_gradients']} gradients, {cost['train_share']:.0%} of the wall time; "
            f"measuring {cost['measure_hvps']} HVPs + {cost['measure_gradients']} gradients, "
            f"{cost['measure_share']:.0%}"
        )
    keys = (
        "edge_reached_step",
        "ratio_median",
        "ratio_q25",
        "ratio_q75",
        "eval_ratio_median",
        "total_hvps",
        "test_loss",
    )
    print("summary: " + ", ".join(f"{k} {summary[k]:.4g}" for k in keys if isinstance(summary.get(k), (int, float))))
    print(
        "minibatch check: "
        + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in track.items())
    )


if __name__ == "__main__":
    main()
