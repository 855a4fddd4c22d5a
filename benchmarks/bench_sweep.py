"""The same 4-run sweep (MNIST, rho x seed) on the serial executor and on a local Ray cluster:
wall times, their ratio, and Ray's per-task overhead (a sweep of 4 runs of 0 steps, whose time is
all start-up, data loading and bookkeeping, minus the serial executor's for the same).

Each run uses one torch thread in both executors (the default), so the metrics agree row for row
(checked here too) and Ray's gain comes from running ``--cpus`` runs at once.

    python benchmarks/bench_sweep.py [--cpus 2] [--steps 100] [--write]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from _report import machine, publish

from samedge.experiment import SweepSpec, prepare_sweep_dir, run_sweep


def timed_sweep(out: Path, steps: int, executor: str, cpus: int) -> float:
    spec = SweepSpec(
        "mnist",
        {"steps": steps, "measure_every": 10, "n_train": 500, "n_test": 200, "width": 64, "depth": 3},
        {"rho": [0.05, 0.1], "seed": [0, 1]},
    )
    points = prepare_sweep_dir(out, spec, spec.points())
    t = time.perf_counter()
    done = run_sweep(out, points, executor=executor, cpus=cpus, progress=False)
    wall = time.perf_counter() - t
    assert done.count("done") == 4, done.statuses
    return wall


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        out = list(csv.DictReader(f))
    for r in out:
        r.pop("elapsed_s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--write", action="store_true", help="write benchmarks/SWEEP.md")
    args = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        serial = timed_sweep(d / "serial", args.steps, "serial", args.cpus)
        serial0 = timed_sweep(d / "serial0", 0, "serial", args.cpus)
        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter() - t
        try:
            on_ray = timed_sweep(d / "ray", args.steps, "ray", args.cpus)
            ray0 = timed_sweep(d / "ray0", 0, "ray", args.cpus)
        finally:
            ray.shutdown()
        same = all(
            rows(p) == rows(d / "ray" / p.parent.name / "metrics.csv") for p in (d / "serial").glob("*/metrics.csv")
        )
    lines = [
        f"Machine: {machine()}.",
        "",
        f"Sweep: MNIST, rho in {{0.05, 0.1}} x seed in {{0, 1}}, {args.steps} steps, 500 digits, MLP 3 x 64; "
        f"one torch thread per run; local Ray cluster of {args.cpus} CPUs.",
        "",
        "| executor | 4 runs (s) | 4 runs of 0 steps (s) |",
        "|---|---|---|",
        f"| serial | {serial:.1f} | {serial0:.2f} |",
        f"| ray | {on_ray:.1f} | {ray0:.2f} |",
        "",
        f"- wall-time ratio serial / ray: {serial / on_ray:.2f} (ideal {args.cpus} on {args.cpus} idle cores)",
        f"- Ray per-task overhead (0-step sweeps, ray - serial, per run): {(ray0 - serial0) / 4:.2f} s",
        f"- starting the local cluster (ray.init): {start:.1f} s, not counted above",
        f"- metrics.csv identical between the executors (elapsed_s aside): {'yes' if same else 'NO'}",
    ]
    publish(
        lines,
        title="Sweep benchmark: serial vs local Ray",
        script="bench_sweep.py",
        filename="SWEEP.md" if args.write else None,
    )


if __name__ == "__main__":
    main()
