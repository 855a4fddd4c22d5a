"""How far to trust the per-step secant sharpness (``steps.csv``): against the Lanczos readings.

For each configuration it runs ``samedge`` (in this process, no figures) and compares, at every
reading, the secant estimate of that step with the Lanczos sharpness of ``metrics.csv``:

* after the edge (from the first reading with sharpness >= 95% of the edge): the share of
  readings with a valid estimate (residual within the rule), and the median and worst
  ``|estimate / lambda_1 - 1|`` among them;
* everywhere: the share of written estimates within 10%.

    python benchmarks/bench_secant.py                       # MNIST: SAM default, GD preset, USAM
    python benchmarks/bench_secant.py --cifar DIR --shakespeare FILE   # also those defaults (long)
    python benchmarks/bench_secant.py --write               # also writes benchmarks/SECANT.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _report import machine, publish

from samedge.experiment import build_config, read_metrics
from samedge.experiment import run_experiment as run


def compare(run_dir: Path) -> dict:
    steps = {int(r["step"] or 0): r for r in read_metrics(run_dir / "steps.csv")}
    rows = read_metrics(run_dir / "metrics.csv")
    ratios = [r["sharpness_over_edge"] for r in rows]
    k = next((i for i, q in enumerate(ratios) if q is not None and q >= 0.95), None)
    pairs = [(steps[int(r["step"] or 0)]["sharpness_secant"], r["sharpness"]) for r in rows]
    written = [(e, lam) for e, lam in pairs if e is not None and lam]
    out: dict = {
        "readings": len(rows),
        "written": len(written),
        "written_within_10pct": sum(abs(e / lam - 1) <= 0.10 for e, lam in written),
        "edge_reading": None if k is None else int(rows[k]["step"] or 0),
    }
    if k is not None:
        post = pairs[k:]
        valid = [abs(e / lam - 1) for e, lam in post if e is not None and lam]
        signed = [e / lam - 1 for e, lam in post if e is not None and lam]
        out.update(
            after_edge=len(post),
            valid_after_edge=len(valid),
            within_5pct=sum(v <= 0.05 for v in valid),
            median_error=statistics.median(valid) if valid else math.nan,
            worst_error=max(valid) if valid else math.nan,
            median_signed=statistics.median(signed) if signed else math.nan,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", help="CIFAR-10 data (runs the cifar10 default: long on a CPU)")
    parser.add_argument("--shakespeare", help="tiny Shakespeare input.txt (runs the shakespeare default: long)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    configs = [
        ("MNIST default (SAM)", "mnist", None, {"steps": 600, "measure_every": 20}),
        ("MNIST mnist-gd (GD)", "mnist", "mnist-gd", {"steps": 400, "measure_every": 20}),
        ("MNIST USAM", "mnist", None, {"optimizer": "usam", "rho": 4.0, "steps": 600, "measure_every": 20}),
    ]
    if args.cifar:
        configs.append(("CIFAR-10 default (SAM)", "cifar10", None, {"data": args.cifar}))
    if args.shakespeare:
        configs.append(("Shakespeare default (minibatch SAM)", "shakespeare", None, {"data": args.shakespeare}))
    lines = [
        f"Machine: {machine()}.",
        "",
        "| run | pairs | readings after the edge | valid there | within 5% of those | median, worst error | "
        "median signed | written estimates within 10% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for label, task, preset, overrides in configs:
            cfg = build_config(task, preset=preset, overrides=overrides)
            t0 = time.perf_counter()
            run(cfg, Path(tmp) / label.replace(" ", "_"), progress=False)
            c = compare(Path(tmp) / label.replace(" ", "_"))
            kind = "perturbation, 10" if cfg.method().perturbs else "consecutive steps, 3"
            if c.get("after_edge") is None:
                lines.append(
                    f"| {label} | {kind} | never reached 95% of the edge | | | | | "
                    f"{c['written_within_10pct']}/{c['written']} |"
                )
            else:
                lines.append(
                    f"| {label} | {kind} | {c['after_edge']} (from step {c['edge_reading']}) | "
                    f"{c['valid_after_edge']} | {c['within_5pct']} | {c['median_error']:.3f}, {c['worst_error']:.3f} | "
                    f"{c['median_signed']:+.3f} | {c['written_within_10pct']}/{c['written']} |"
                )
            print(lines[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    publish(
        lines,
        title="Per-step secant sharpness against Lanczos",
        script="bench_secant.py",
        filename="SECANT.md" if args.write else None,
    )


if __name__ == "__main__":
    main()
