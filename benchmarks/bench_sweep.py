"""The same 4-run sweep (MNIST, rho x seed) on the serial executor, the local executor (worker
processes, ``--cpus`` at a time) and a local Ray cluster (when Ray is installed): wall times, their
ratios, and each one's per-run overhead (a sweep of 4 runs of 0 steps, whose time is all
start-up, data loading and bookkeeping, minus the serial executor's for the same).

Each run uses one torch thread in every executor (the default), so the metrics agree row for row
(checked here too) and the gain of the other two comes from running ``--cpus`` runs at once.

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
from samedge.experiment.sweeps.executors.local import LocalExecutor


def timed_sweep(out: Path, steps: int, executor, cpus: int) -> float:
    spec = SweepSpec(
        "mnist",
        {"steps": steps, "measure_every": 10, "n_train": 500, "n_test": 200, "width": 64, "depth": 3},
        {"rho": [0.05, 0.1], "seed": [0, 1]},
    )
    points = prepare_sweep_dir(out, spec, spec.points())
    t = time.perf_counter()
    options = {"cpus": cpus} if executor == "ray" else {}
    done = run_sweep(out, points, executor=executor, progress=False, **options)
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
    ap.add_argument("--cpus", type=int, default=2, help="runs at a time: the local executor's jobs, Ray's CPUs")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--write", action="store_true", help="write benchmarks/SWEEP.md")
    args = ap.parse_args()
    try:
        import ray
    except ImportError:
        ray = None

    times: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        times["serial"] = (timed_sweep(d / "serial", args.steps, "serial", 1), timed_sweep(d / "s0", 0, "serial", 1))
        local = LocalExecutor(jobs=args.cpus)
        times["local"] = (timed_sweep(d / "local", args.steps, local, 1), timed_sweep(d / "l0", 0, local, 1))
        start = None
        if ray is not None:
            t = time.perf_counter()
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            start = time.perf_counter() - t
            try:
                times["ray"] = (
                    timed_sweep(d / "ray", args.steps, "ray", args.cpus),
                    timed_sweep(d / "r0", 0, "ray", args.cpus),
                )
            finally:
                ray.shutdown()
        same = {
            name: all(
                rows(p) == rows(d / name / p.parent.name / "metrics.csv") for p in (d / "serial").glob("*/metrics.csv")
            )
            for name in times
            if name != "serial"
        }
    serial, serial0 = times["serial"]
    lines = [
        f"Machine: {machine()}.",
        "",
        f"Sweep: MNIST, rho in {{0.05, 0.1}} x seed in {{0, 1}}, {args.steps} steps, 500 digits, MLP 3 x 64; "
        f"one torch thread per run; {args.cpus} runs at a time (local: --jobs, Ray: its CPUs).",
        "",
        "| executor | 4 runs (s) | 4 runs of 0 steps (s) | serial / this | overhead per run (s) |",
        "|---|---|---|---|---|",
    ]
    for name, (wall, wall0) in times.items():
        lines.append(f"| {name} | {wall:.1f} | {wall0:.2f} | {serial / wall:.2f} | {(wall0 - serial0) / 4:.2f} |")
    lines += [
        "",
        f"- ideal serial / this: {args.cpus} on {args.cpus} idle cores; overhead: (0-step sweep - serial's) / 4",
        f"- starting the local Ray cluster (ray.init): {start:.1f} s, not counted above"
        if start is not None
        else "- Ray: not installed, not measured",
    ]
    lines += [
        f"- metrics.csv identical to serial's ({name}; elapsed_s aside): {'yes' if ok else 'NO'}"
        for name, ok in same.items()
    ]
    publish(
        lines,
        title="Sweep benchmark: serial, local processes and local Ray",
        script="bench_sweep.py",
        filename="SWEEP.md" if args.write else None,
    )


if __name__ == "__main__":
    main()
