"""Command line: ``samedge run | plot | edge | download | sweep | compare | reproduce``.

Exit codes: 0 success; 2 bad input (any :class:`~samedge.errors.BadInput`: arguments, config,
data, checkpoint, run directory), as one line on stderr ``samedge: error: ...``; 3 the run
diverged; 130 interrupted.  Any other exception is a bug of samedge's: it propagates with its
traceback (exit 1), never reported as bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from samedge.errors import BadInput, ConfigError
from samedge.experiment.config import TASKS, RunConfig, build_config, preset_names
from samedge.experiment.report import reproduce_names

__all__ = ["main", "build_parser", "COMMANDS"]

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 2, 3, 130

_HELP = {
    "optimizer": "gd, sam or usam",
    "eta": "step size",
    "rho": "SAM radius (0 for gd)",
    "momentum": "heavy-ball momentum beta in [0, 1)",
    "steps": "number of optimizer steps",
    "batch_size": "minibatch size (default: full batch)",
    "vocab": "shakespeare: 'text' (the file's distinct characters) or 'ascii' (all 128, as the paper code)",
    "eval_batch_size": "minibatch runs: also measure sharpness and edge on a fixed, seeded batch of this many "
    "training examples (0: off)",
    "measure_every": "measure every N steps (and at the last step)",
    "eig_k": "number of top Hessian eigenvalues to record",
    "eig_method": "lanczos (default), eigsh, power, or paper (finite-difference power iteration)",
    "eig_tol": "relative residual at which an eigen-solve stops",
    "eig_max_iter": "most HVPs (Lanczos steps) per eigen-solve",
    "measure_perturbed": "also measure the sharpness at SAM's ascent point w + e",
    "hvp_mode": "double-backward or forward-over-reverse (same numbers)",
    "data": "data directory or file (default: the data embedded for the task)",
    "n_train": "number of training examples",
    "n_test": "number of test examples",
    "subset": "first N examples, or a seeded class-balanced sample",
    "chunk_size": "examples per chunk for full-batch sums (bounds memory)",
    "loss": "mse (squared error on one-hot targets, as the paper) or xent",
    "checkpoint_every": "checkpoint every N steps (0: only at the end and on Ctrl-C)",
    "seed": "random seed (data order, initialization, eigen-solver start)",
    "dtype": "float32 or float64",
    "device": "cpu, cuda or auto",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(RunConfig):
        if f.name == "task":
            continue
        flag = "--" + f.name.replace("_", "-")
        base = str(f.type).replace(" | None", "")
        help_text = _HELP.get(f.name, f"model setting ({f.name})")
        if base == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[base]
            p.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(), help=help_text)


def _add_sweep_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="sweep directory (default: sweeps/<task>-<varied settings>)")
    p.add_argument("--executor", choices=["serial", "ray"], default="serial", help="serial (default) or ray")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument(
        "--threads-per-run",
        type=int,
        default=1,
        metavar="N",
        help="torch threads (and Ray CPUs) per run (default 1; the same N gives the same metrics on every executor)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars or lines")
    p.add_argument("--plots", action="store_true", help="also draw each run's own figures")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="samedge", description="GD and SAM at the edge of stability.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train and measure; writes a run directory")
    run.add_argument("task", nargs="?", help=f"one of {', '.join(TASKS)} (not with --resume)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    run.add_argument("--config", help="TOML file with settings (flags override it)")
    run.add_argument("--preset", help=f"named settings: {', '.join(preset_names())}")
    run.add_argument("--out", help="run directory (default: runs/<task>-<optimizer>-eta..-seed..)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--no-plots", action="store_true", help="do not draw figures at the end")
    _add_config_flags(run)

    plot = sub.add_parser("plot", help="draw the figures of a run directory from its metrics")
    plot.add_argument("run_dir")

    edge = sub.add_parser("edge", help="print the stability thresholds")
    edge.add_argument("--eta", type=float, required=True)
    edge.add_argument("--rho", type=float, default=0.0)
    edge.add_argument("--grad-norm", type=float, default=None, help="||g|| (needed for the SAM-edge)")
    edge.add_argument("--momentum", type=float, default=0.0)
    edge.add_argument("--json", action="store_true", help="print JSON")

    sw = sub.add_parser("sweep", help="run a grid or list of runs into one sweep directory; writes sweep.csv")
    sw.add_argument("target", help=f"a task ({', '.join(TASKS)}) or a TOML sweep file")
    sw.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="vary a setting over these values (repeat: every combination)",
    )
    sw.add_argument("--config", help="TOML file with base settings (flags override it)")
    sw.add_argument("--preset", help=f"named base settings: {', '.join(preset_names())}")
    _add_sweep_run_flags(sw)
    _add_config_flags(sw)

    cmp = sub.add_parser("compare", help="figures that overlay runs: run directories or a sweep directory")
    cmp.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, or one sweep directory")
    cmp.add_argument("--out", help="where to write the figures (default: SWEEP_DIR/compare or ./compare)")

    rep = sub.add_parser("reproduce", help="the paper's figure set for a task: a sweep, figures and a report")
    rep.add_argument("task", help=f"one of {', '.join(reproduce_names())}")
    rep.add_argument(
        "--paper", action="store_true", help="the paper-scale grid (for a GPU or a cluster) instead of the laptop one"
    )
    _add_sweep_run_flags(rep)

    dl = sub.add_parser("download", help="download a data set's official files (needs internet)")
    dl.add_argument("dataset", choices=["mnist", "cifar10", "shakespeare"])
    dl.add_argument("--dir", default="data", help="where to put the files (default: ./data)")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from samedge.experiment.plotting import plot_run
    from samedge.experiment.rundir import default_run_dir, load_run_config
    from samedge.experiment.runner import run

    overrides = {f.name: getattr(args, f.name) for f in fields(RunConfig) if f.name != "task"}
    if args.resume:
        given = [k for k, v in overrides.items() if v is not None]
        if given or args.preset or args.config or args.out or args.overwrite:
            what = f"--{given[0].replace('_', '-')}" if given else "--preset/--config/--out/--overwrite"
            raise ConfigError(f"{what} cannot be combined with --resume: a resumed run keeps its saved settings")
        cfg = load_run_config(args.resume)
        if args.task is not None and args.task != cfg.task:
            raise ConfigError(f"{args.resume} is a {cfg.task} run, not {args.task}")
        out = Path(args.resume)
    else:
        if args.task is None:
            raise ConfigError(f"name a task ({', '.join(TASKS)}) or give --resume RUN_DIR")
        cfg = build_config(args.task, preset=args.preset, config_file=args.config, overrides=overrides)
        out = Path(args.out) if args.out else default_run_dir(cfg)
    result = run(cfg, out, overwrite=args.overwrite, progress=not args.no_progress, resume=bool(args.resume))
    if not args.no_plots and result.summary.get("measurements"):
        plot_run(out)
    _report(result.summary, out)
    if result.summary.get("interrupted"):
        return EXIT_INTERRUPTED
    return EXIT_DIVERGED if result.diverged else EXIT_OK


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def _report(s: dict, out: Path) -> None:
    print(f"run directory: {out}")
    if s.get("diverged"):
        print(f"DIVERGED at step {s.get('diverged_step')} ({s.get('reason', '')})")
    if s.get("interrupted"):
        print(f"interrupted at step {s.get('interrupted_step')}")
    print(
        f"final train loss {_fmt(s.get('final_train_loss'))}, accuracy {_fmt(s.get('final_train_accuracy'))}; "
        f"test error {_fmt(s.get('test_error'))}"
    )
    for prefix, what in (("", "sharpness"), ("eval_", "evaluation-batch sharpness")):
        if f"{prefix}edge_reached_step" not in s:
            continue
        if s[f"{prefix}edge_reached_step"] is None:
            print(f"{what} never reached 90% of the edge")
        else:
            print(
                f"{what} reached 90% of the edge at step {s[f'{prefix}edge_reached_step']}; afterwards sharpness/edge "
                f"median {_fmt(s[f'{prefix}ratio_median'], '.3f')} "
                f"(IQR {_fmt(s[f'{prefix}ratio_q25'], '.3f')}-{_fmt(s[f'{prefix}ratio_q75'], '.3f')})"
            )


def _cmd_plot(args: argparse.Namespace) -> int:
    from samedge.experiment.plotting import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return EXIT_OK


def _cmd_edge(args: argparse.Namespace) -> int:
    from samedge.core.method import METHOD_KINDS, Method

    out = {}
    try:
        for kind in METHOD_KINDS:
            method = Method(kind, args.eta, args.rho if Method.takes_rho(kind) else 0.0, args.momentum)
            if method.normalized and args.grad_norm is None and args.rho > 0:
                raise ConfigError(f"--grad-norm is needed for the {method.edge_name} when --rho > 0")
            out[f"{kind}_edge"] = method.edge(0.0 if args.grad_norm is None else args.grad_norm)
    except ConfigError:
        raise
    except ValueError as err:  # the method refuses the values typed: bad input
        raise ConfigError(str(err)) from None
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:10s} {v:.10g}")
    return EXIT_OK


def _cmd_download(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if args.dataset == "mnist":
        from samedge.data.mnist import download_mnist

        path = download_mnist(directory)
    elif args.dataset == "cifar10":
        from samedge.data.cifar10 import download_cifar10

        path = download_cifar10(directory)
    else:
        from samedge.data.shakespeare import download_shakespeare

        path = download_shakespeare(directory)
    print(path)
    return EXIT_OK


def _sweep_spec(args: argparse.Namespace):
    from samedge.experiment.sweep import SweepSpec, load_sweep_file, parse_grid_arg

    base = {f.name: getattr(args, f.name) for f in fields(RunConfig) if f.name != "task"}
    base = {k: v for k, v in base.items() if v is not None}
    grid: dict[str, list] = {}
    for arg in args.grid:
        name, values = parse_grid_arg(arg)
        if name in grid:
            raise ConfigError(f"--grid {name} is given twice")
        grid[name] = values
    if args.target.endswith(".toml"):
        spec = load_sweep_file(args.target)
        if args.preset or args.config:
            raise ConfigError("--preset/--config go in the sweep file (preset = ..., config = ...)")
        spec.base.update(base)
        spec.grid.update(grid)
        spec.__post_init__()
    else:
        spec = SweepSpec(
            args.target,
            base,
            grid,
            preset=args.preset,
            config_file=str(Path(args.config).resolve()) if args.config else None,
        )
    clash = sorted(set(spec.grid) & set(base))
    if clash:
        raise ConfigError(f"setting '{clash[0]}' is both varied (--grid) and fixed (--{clash[0].replace('_', '-')})")
    return spec


def _run_sweep_cli(spec, out: Path, args: argparse.Namespace) -> int:
    from samedge.experiment.executors import run_sweep
    from samedge.experiment.sweep import prepare_sweep_dir

    points = prepare_sweep_dir(out, spec, spec.points())
    done = run_sweep(
        out,
        points,
        executor=args.executor,
        threads=args.threads_per_run,
        address=args.address,
        cpus=args.cpus,
        progress=not args.no_progress,
    )
    if args.plots:
        from samedge.experiment.plotting import plot_run

        for p in points:
            if (out / p.name / "metrics.csv").exists():
                plot_run(out / p.name)
    counts = ", ".join(f"{done.count(s)} {s}" for s in ("done", "diverged", "failed", "error") if done.count(s))
    print(f"sweep directory: {out} ({len(points)} runs: {counts}; {done.skipped} already finished)")
    print(f"summary: {out / 'sweep.csv'}")
    for name, status in done.statuses.items():
        if status in ("failed", "error"):
            print(f"  {name}: {status}")
    if done.count("error"):
        return 1  # a samedge bug in some run (its message is in sweep.csv)
    return EXIT_BAD_INPUT if done.count("failed") else EXIT_OK


def _cmd_sweep(args: argparse.Namespace) -> int:
    spec = _sweep_spec(args)
    out = Path(args.out) if args.out else Path("sweeps") / "-".join([spec.task, *spec.varied_names()])
    return _run_sweep_cli(spec, out, args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from samedge.experiment.compare import compare

    for path in compare(args.dirs, args.out):
        print(path)
    return EXIT_OK


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from samedge.experiment.compare import compare
    from samedge.experiment.report import load_reproduce_spec, write_report

    spec = load_reproduce_spec(args.task, paper=args.paper)
    out = Path(args.out) if args.out else Path("reproduce") / (args.task + ("-paper" if args.paper else ""))
    code = _run_sweep_cli(spec, out, args)
    if code == EXIT_INTERRUPTED:
        return code
    compare([str(out)], None)
    for path in write_report(out):
        print(path)
    return code


#: subcommand -> handler(args) -> exit code
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "plot": _cmd_plot,
    "edge": _cmd_edge,
    "download": _cmd_download,
    "sweep": _cmd_sweep,
    "compare": _cmd_compare,
    "reproduce": _cmd_reproduce,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(stop.code or 0)
    handler = COMMANDS[args.command]
    try:
        return handler(args)
    except BadInput as err:
        print(f"samedge: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("samedge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
