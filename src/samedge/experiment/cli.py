"""Command line: ``samedge run | measure | plot | edge | download | sweep | compare | reproduce | flatness``.

Exit codes: 0 success; 2 bad input (any :class:`~samedge.errors.BadInput`: arguments, config,
data, checkpoint, run directory), as one line on stderr ``samedge: error: ...``; 3 the run
diverged; 4 the environment refused (an ``OSError``: no permission, a full disk, a missing or
unreadable path), as one line naming the path; 5 a worker process of a run over many processes
died (``--nproc``); 130 interrupted.  Any other exception is a bug of
samedge's: it propagates with its traceback (exit 1), never reported as bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from samedge.errors import BadInput, ConfigError

# samedge.experiment.config (and with it torch, seconds to import) is imported inside the functions
# that need it, so that Ctrl-C during that import is an interrupt like any other and a locked run
# directory is refused before it (:func:`_refuse_locked_early`).

__all__ = ["main", "build_parser", "COMMANDS"]

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_ENVIRONMENT, EXIT_WORKER_LOST, EXIT_INTERRUPTED = 0, 2, 3, 4, 5, 130

_HELP = {
    "optimizer": "the perturbation: gd (none), sam or usam",
    "base": "the update rule the perturbed gradient drives: sgd (default), adam, adamw or rmsprop",
    "dampening": "sgd: momentum dampening in [0, 1) (torch.optim.SGD's)",
    "nesterov": "sgd: Nesterov momentum",
    "weight_decay": "weight decay (coupled L2 for sgd, adam, rmsprop; decoupled for adamw)",
    "beta1": "adam, adamw: first-moment coefficient (its momentum)",
    "beta2": "adam, adamw: second-moment coefficient",
    "eps": "adam, adamw, rmsprop: denominator epsilon",
    "alpha": "rmsprop: smoothing constant of the squared-gradient average",
    "eta": "step size",
    "rho": "SAM radius (0 for gd)",
    "momentum": "momentum in [0, 1) (sgd: heavy-ball, rmsprop: its momentum; adam uses --beta1)",
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
    "trace_every": "Hutchinson Hessian trace every N steps (a multiple of --measure-every; 0: off)",
    "trace_probes": "Rademacher probes per trace (its standard error falls as 1/sqrt)",
    "density_every": "SLQ Hessian spectral density every N steps (a multiple of --measure-every; 0: off)",
    "density_probes": "random start vectors per spectral density",
    "density_steps": "Lanczos steps per density probe",
    "measure_test": "also evaluate the test set at every measurement (test_loss, test_accuracy columns)",
    "hvp_mode": "double-backward or forward-over-reverse (same numbers)",
    "data": "data directory or file (default: the data embedded for the task)",
    "n_train": "number of training examples",
    "n_test": "number of test examples",
    "subset": "first N examples, or a seeded class-balanced sample",
    "chunk_size": "examples per chunk for full-batch sums (bounds memory)",
    "loss": "mse (squared error on one-hot targets, as the paper) or xent",
    "checkpoint_every": "checkpoint every N steps (0: only at the end and on Ctrl-C)",
    "secant_pairs": "per-step sharpness (steps.csv) from the last N gradient pairs training computes anyway "
    "(default: 10 SAM/USAM perturbation pairs, 3 consecutive steps for GD; 0: off)",
    "seed": "random seed (data order, initialization, eigen-solver start)",
    "layer_groups": "blocks of layers.csv: '' top-level modules (default), 'leaves', 'off', or "
    "'NAME=PARAM,PARAM;NAME=...' (parameter names or module prefixes; the rest is 'other')",
    "layer_sharpness_every": "each block's own top eigenvalue lambda_max(H_BB) every N steps, in layers.csv "
    "(a multiple of measure-every; 0: off)",
    "batch_sharpness_batches": "batch sharpness over N seeded minibatches at each reading "
    "(default 8 for minibatch runs; 0: off)",
    "dtype": "float32 or float64",
    "device": "cpu, cuda or auto",
    "threads": "torch threads (default: torch's, one per core); a matrix product's float sums depend on the count, "
    "so the same count gives the same metrics.csv (a sweep's runs use --threads-per-run, default 1)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from samedge.experiment.config import RunConfig

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
    from samedge.experiment.sweeps.executors import EXECUTORS, executor_class

    p.add_argument(
        "--executor",
        choices=list(EXECUTORS),
        default="local",
        help="; ".join(f"{name}: {executor_class(name).summary}" for name in EXECUTORS),
    )
    own: dict[str, list[argparse.Action]] = {}
    for name in EXECUTORS:
        before = len(p._actions)
        executor_class(name).add_arguments(p)
        own[name] = p._actions[before:]
    p.set_defaults(executor_flags=own)
    p.add_argument(
        "--threads-per-run",
        type=int,
        default=None,
        metavar="N",
        help="torch threads (and Ray CPUs, SLURM CPUs) per run: each run's threads setting (default 1; the same N "
        "gives the same metrics on every executor and in samedge run --threads N); fixed for a sweep directory",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars or lines")
    p.add_argument("--plots", action="store_true", help="also draw each run's own figures")


def build_parser() -> argparse.ArgumentParser:
    from samedge.experiment.analysis.report import reproduce_names
    from samedge.experiment.config import TASKS, preset_names

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
    run.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="full batch over N local processes (torch.distributed: gloo on CPU, NCCL with one GPU each "
        "on cuda); also with --resume",
    )
    _add_config_flags(run)

    flat = sub.add_parser(
        "flatness", help="GD and SAM at the same eta from the same initialization: sharpness, trace, test error"
    )
    flat.add_argument("task", help=f"one of {', '.join(TASKS)}")
    flat.add_argument("--config", help="TOML file with settings (flags override it)")
    flat.add_argument("--preset", help=f"named settings: {', '.join(preset_names())}")
    flat.add_argument("--out", help="output directory (default: runs/flatness-<task>-eta..-rho..-seed..)")
    flat.add_argument("--overwrite", action="store_true", help="replace an existing output")
    flat.add_argument("--no-progress", action="store_true", help="no progress bar")
    flat.add_argument("--depart", type=float, default=0.1, help="relative sharpness difference counted as departed")
    _add_config_flags(flat)

    mes = sub.add_parser("measure", help="re-measure the top Hessian eigenpairs at a run's saved (last) weights")
    mes.add_argument("run_dir")
    mes.add_argument("--eig-k", type=int, default=1, help="number of top eigenpairs (default 1)")
    mes.add_argument("--eig-tol", type=float, default=1e-6, help="relative residual to stop at (default 1e-6)")
    mes.add_argument("--eig-method", default="lanczos", help="eigen-solver: lanczos (default), eigsh, power")
    mes.add_argument("--eig-max-iter", type=int, default=300, help="most HVPs (Lanczos) (default 300)")
    mes.add_argument("--json", action="store_true", help="print the result as JSON")

    plot = sub.add_parser("plot", help="draw the figures of a run directory from its metrics")
    plot.add_argument("run_dir")

    edge = sub.add_parser("edge", help="print the stability thresholds")
    edge.add_argument("--eta", type=float, required=True)
    edge.add_argument("--rho", type=float, default=0.0)
    edge.add_argument("--grad-norm", type=float, default=None, help="||g|| (needed for the SAM-edge)")
    edge.add_argument("--momentum", type=float, default=0.0, help=_HELP["momentum"])
    edge.add_argument("--base", default="sgd", help=_HELP["base"])
    edge.add_argument("--dampening", type=float, default=0.0, help=_HELP["dampening"])
    edge.add_argument("--nesterov", action="store_true", help=_HELP["nesterov"])
    edge.add_argument("--weight-decay", type=float, default=0.0, help=_HELP["weight_decay"])
    edge.add_argument("--beta1", type=float, default=0.9, help=_HELP["beta1"])
    edge.add_argument("--beta2", type=float, default=0.999, help=_HELP["beta2"])
    edge.add_argument("--eps", type=float, default=1e-8, help=_HELP["eps"])
    edge.add_argument("--alpha", type=float, default=0.99, help=_HELP["alpha"])
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

    rep = sub.add_parser(
        "reproduce", help="the paper's comparisons: sweeps, figures and a report that checks its claims"
    )
    rep.add_argument("task", help=f"one of {', '.join(reproduce_names())}, or all (the three tasks and one report)")
    rep.add_argument(
        "--paper", action="store_true", help="the paper-scale grid (for a GPU or a cluster) instead of the laptop one"
    )
    rep.add_argument(
        "--report-only", action="store_true", help="redraw the figures and report from the run directories; run nothing"
    )
    _add_sweep_run_flags(rep)

    dl = sub.add_parser("download", help="download a data set's official files (needs internet)")
    dl.add_argument("dataset", choices=["mnist", "cifar10", "shakespeare"])
    dl.add_argument("--dir", default="data", help="where to put the files (default: ./data)")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    import samedge.experiment.world as world
    from samedge.experiment.analysis.figures import plot_run
    from samedge.experiment.config import TASKS, RunConfig, build_config
    from samedge.experiment.run import launcher
    from samedge.experiment.run.runner import run
    from samedge.experiment.store.layout import RunDir

    overrides = {f.name: getattr(args, f.name) for f in fields(RunConfig) if f.name != "task"}
    if args.resume:
        given = [k for k, v in overrides.items() if v is not None]
        if given or args.preset or args.config or args.out or args.overwrite:
            what = f"--{given[0].replace('_', '-')}" if given else "--preset/--config/--out/--overwrite"
            raise ConfigError(f"{what} cannot be combined with --resume: a resumed run keeps its saved settings")
        cfg = RunDir(args.resume).read_config()
        if args.task is not None and args.task != cfg.task:
            raise ConfigError(f"{args.resume} is a {cfg.task} run, not {args.task}")
        out = Path(args.resume)
    else:
        if args.task is None:
            raise ConfigError(f"name a task ({', '.join(TASKS)}) or give --resume RUN_DIR")
        cfg = build_config(args.task, preset=args.preset, config_file=args.config, overrides=overrides)
        out = Path(args.out) if args.out else RunDir.default_for(cfg).path
    nproc = _check_nproc(args.nproc, cfg)
    if nproc > 1 and world.env_world_size() == 1:  # the launcher: start and watch the workers
        return launcher.launch(nproc, args.argv, out)
    with world.session(cfg.device):
        result = run(cfg, out, overwrite=args.overwrite, progress=not args.no_progress, resume=bool(args.resume))
        if not world.is_writer():
            return EXIT_DIVERGED if result.diverged else EXIT_INTERRUPTED if result.summary.get("interrupted") else 0
    if not args.no_plots and result.summary.get("measurements"):
        plot_run(out)
    _report(result.summary, out)
    if result.summary.get("interrupted"):
        return EXIT_INTERRUPTED
    return EXIT_DIVERGED if result.diverged else EXIT_OK


def _check_nproc(nproc: int | None, cfg: Any) -> int:
    """The number of processes asked for (1 without ``--nproc``), checked against the data sizes
    and against a ``torchrun`` world this process may already be in."""
    import samedge.experiment.world as world

    size = world.env_world_size()
    if nproc is None:
        return size
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    if size > 1 and nproc != size:
        raise ConfigError(f"--nproc {nproc} differs from the WORLD_SIZE {size} this process was started in")
    for name in ("n_train", "batch_size", "eval_batch_size"):
        value = getattr(cfg, name)
        if value and value < nproc:
            raise ConfigError(f"config field '{name}' ({value}) is below --nproc {nproc}: every process needs examples")
    return nproc


def _cmd_flatness(args: argparse.Namespace) -> int:
    from samedge.experiment.analysis.flatness import default_dir, flatness
    from samedge.experiment.config import RunConfig, build_config

    overrides = {f.name: getattr(args, f.name) for f in fields(RunConfig) if f.name != "task"}
    if overrides.get("optimizer") is not None:
        raise ConfigError("--optimizer cannot be given to flatness: it runs gd and sam")
    if not 0 < args.depart < 1:
        raise ConfigError(f"--depart must be in (0, 1), got {args.depart}")
    cfg = build_config(args.task, preset=args.preset, config_file=args.config, overrides=overrides)
    out = Path(args.out) if args.out else default_dir(cfg)
    result = flatness(cfg, out, overwrite=args.overwrite, progress=not args.no_progress, depart=args.depart)
    if result.diverged is not None:
        print(f"samedge: {result.diverged} (see {out}); choose a smaller eta", file=sys.stderr)
        return EXIT_DIVERGED
    print(f"output: {out} (gd/, sam/, flatness.json, flatness.png)")
    for line in result.lines:
        print(line)
    return EXIT_OK


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


def _cmd_measure(args: argparse.Namespace) -> int:
    import json

    from samedge.experiment.run.remeasure import remeasure

    if not 0 < args.eig_tol < 1:
        raise ConfigError(f"--eig-tol must be in (0, 1), got {args.eig_tol}")
    if args.eig_k < 1 or args.eig_max_iter < 1:
        raise ConfigError("--eig-k and --eig-max-iter must be >= 1")
    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"{args.run_dir} is not a directory")
    out = remeasure(args.run_dir, k=args.eig_k, tol=args.eig_tol, method=args.eig_method, max_iter=args.eig_max_iter)
    if out["note"]:
        print(f"samedge: note: {out['note']}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    print(f"{out['task']} run {out['run_dir']} at step {out['step']} ({out['method']}, {out['hvps']} HVPs):")
    for i, (lam, r, b) in enumerate(zip(out["eigenvalues"], out["relative_residuals"], out["relative_bounds"]), 1):
        print(f"  lambda_{i} = {lam:.8g}  (relative residual {_fmt(r, '.1e')}, bound {_fmt(b, '.1e')})")
    if not out["converged"]:
        print(f"  not converged to {out['tol']:g} within {args.eig_max_iter} HVPs")
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    from samedge.experiment.analysis.figures import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return EXIT_OK


def _cmd_edge(args: argparse.Namespace) -> int:
    from samedge.core.method import METHOD_KINDS, Method

    out: dict = {}
    hyper = {name: getattr(args, name) for name in Method.HYPERPARAMETERS}
    try:
        for kind in METHOD_KINDS:
            method = Method(kind, args.eta, args.rho if Method.takes_rho(kind) else 0.0, args.momentum, **hyper)
            if method.preconditioned:  # one threshold, on the preconditioned (effective) sharpness
                out[f"{kind}_edge"] = method.threshold
                continue
            if method.normalized and args.grad_norm is None and args.rho > 0:
                raise ConfigError(f"--grad-norm is needed for the {method.edge_name} when --rho > 0")
            out[f"{kind}_edge"] = method.edge(0.0 if args.grad_norm is None else args.grad_norm)
    except ConfigError:
        raise
    except ValueError as err:  # the method refuses the values typed: bad input
        raise ConfigError(str(err)) from None
    if args.base != "sgd":
        out["threshold"] = out["gd_edge"]
        out["compared_with"] = {
            "gd": "top eigenvalue of P^-1/2 (H + lambda I) P^-1/2 (the preconditioned sharpness)",
            "sam": f"top eigenvalue of P^-1/2 (H + (rho/||g||) H^2 + lambda I) P^-1/2 (rho {args.rho:g})",
            "usam": f"top eigenvalue of P^-1/2 (H + rho H^2 + lambda I) P^-1/2 (rho {args.rho:g})",
        }
    elif args.weight_decay or args.dampening or args.nesterov:
        out["threshold"] = Method("gd", args.eta, 0.0, args.momentum, **hyper).threshold  # on H + lambda I
    for name, value in out.items():  # numbers leave samedge finite, or not at all
        if isinstance(value, dict):
            continue
        if not math.isfinite(value):
            raise ConfigError(f"the {name} for --eta {args.eta:g} is {value} (not a finite number); --eta is too small")
    if args.json:
        print(json.dumps(out, allow_nan=False))
    else:
        for k, v in out.items():
            if isinstance(v, dict):
                for kind, what in v.items():
                    print(f"{kind + ' compares':10s} {what}")
            else:
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
    from samedge.experiment.config import RunConfig
    from samedge.experiment.sweeps.spec import SweepSpec, load_sweep_file, parse_grid_arg

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
        _refuse_clash(spec.grid, base)
        spec.base.update(base)
        spec.grid.update(grid)
        spec.__post_init__()
    else:
        _refuse_clash(grid, base)
        spec = SweepSpec(
            args.target,
            base,
            grid,
            preset=args.preset,
            config_file=str(Path(args.config).resolve()) if args.config else None,
        )
    return spec


def _refuse_clash(grid: dict, flags: dict) -> None:
    clash = sorted(set(grid) & set(flags))
    if clash:
        raise ConfigError(f"setting '{clash[0]}' is both varied (--grid) and fixed (--{clash[0].replace('_', '-')})")


def _threads_per_run(spec, args: argparse.Namespace) -> None:
    """``--threads-per-run N`` is the ``threads`` setting of every run (checked before anything is
    written; with ``--threads`` too, the two must agree)."""
    n = args.threads_per_run
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--threads-per-run must be >= 1, got {n}")
    given = getattr(args, "threads", None)
    if given is not None and given != n:
        raise ConfigError(f"--threads {given} and --threads-per-run {n} disagree; give one")
    if "threads" in spec.grid:
        raise ConfigError("setting 'threads' is both varied (grid) and fixed (--threads-per-run)")
    spec.base["threads"] = n


def _run_sweep_cli(spec, out: Path, args: argparse.Namespace) -> tuple[int, Any]:
    """Run a sweep from the command line and print its outcome: the exit code and the
    :class:`~samedge.experiment.sweeps.driver.SweepOutcome`.  The whole command (executor, threads,
    every point's settings, the sweep directory's definition) is checked before anything is written."""
    from samedge.experiment.store.layout import RunDir
    from samedge.experiment.sweeps.driver import run_sweep
    from samedge.experiment.sweeps.executors import executor_class
    from samedge.experiment.sweeps.spec import prepare_sweep_dir

    _refuse_other_executors_flags(args)
    executor = executor_class(args.executor).from_arguments(args)
    executor.check()
    _threads_per_run(spec, args)
    points = prepare_sweep_dir(out, spec, spec.points())
    done = run_sweep(out, points, executor=executor, progress=not args.no_progress)
    if args.plots:
        from samedge.experiment.analysis.figures import plot_run

        for p in points:
            if RunDir(out / p.name).metrics.exists():
                plot_run(out / p.name)
    kinds = ("done", "diverged", "failed", "error", "submitted")
    counts = ", ".join(f"{done.count(s)} {s}" for s in kinds if done.count(s))
    print(f"sweep directory: {out} ({len(points)} runs: {counts}; {done.skipped} already finished)")
    print(f"summary: {out / 'sweep.csv'}")
    for name, status in done.statuses.items():
        if status in ("failed", "error"):
            reason = done.outcomes.get(name, {}).get("reason", "")
            print(f"  {name}: {status}" + (f": {reason}" if reason else ""))
    if done.count("submitted"):
        print(f"{done.count('submitted')} runs left to their jobs; the same command again collects them")
        for name, status in done.statuses.items():
            if status == "submitted":
                print(f"  {name}: {done.outcomes.get(name, {}).get('reason', '')}")
    return done.exit_code(), done  # as samedge run exits: 1 a bug, 4 the environment, 2 bad input


def _refuse_other_executors_flags(args: argparse.Namespace) -> None:
    """A flag of an executor other than ``--executor``'s is refused, not silently ignored."""
    for name, actions in getattr(args, "executor_flags", {}).items():
        if name == args.executor:
            continue
        for action in actions:
            if getattr(args, action.dest, action.default) != action.default:
                raise ConfigError(f"{action.option_strings[0]} is a flag of --executor {name}, not {args.executor}")


def _cmd_sweep(args: argparse.Namespace) -> int:
    spec = _sweep_spec(args)
    out = Path(args.out) if args.out else Path("sweeps") / "-".join([spec.task, *spec.varied_names()])
    return _run_sweep_cli(spec, out, args)[0]


def _cmd_compare(args: argparse.Namespace) -> int:
    from samedge.experiment.analysis.overlay import overlay_runs

    for path in overlay_runs(args.dirs, args.out):
        print(path)
    return EXIT_OK


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from samedge.experiment.analysis.overlay import overlay_runs
    from samedge.experiment.analysis.report import PAPER_TASKS, load_reproduce_spec, write_paper_report, write_report
    from samedge.experiment.sweeps.spec import is_sweep_dir

    every = args.task == "all"
    tasks = PAPER_TASKS if every else (args.task,)
    specs = {task: load_reproduce_spec(task, paper=args.paper) for task in tasks}  # all refused before any runs
    base = Path(args.out) if args.out else Path("reproduce") / (args.task + ("-paper" if args.paper else ""))
    code = EXIT_OK
    for task in tasks:
        out = base / task if every else base
        if not args.report_only:
            ran, done = _run_sweep_cli(specs[task], out, args)
            code = code or ran
            if done.count("submitted"):
                print(f"{task}: figures and report when its jobs have finished (the same command again)")
                continue
        elif not is_sweep_dir(out):
            if not every:
                raise ConfigError(f"{out} holds no sweep yet; run `samedge reproduce {task}` first")
            continue
        overlay_runs([str(out)], None)
        if not every:  # `reproduce all` writes one report, every task's section in it
            for path in write_report(out):
                print(path)
    if every:
        for path in write_paper_report(base, tasks):
            print(path)
    return code


#: subcommand -> handler(args) -> exit code
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "flatness": _cmd_flatness,
    "measure": _cmd_measure,
    "plot": _cmd_plot,
    "edge": _cmd_edge,
    "download": _cmd_download,
    "sweep": _cmd_sweep,
    "compare": _cmd_compare,
    "reproduce": _cmd_reproduce,
}


def _refuse_locked_early(argv: Sequence[str]) -> None:
    """``run --resume DIR`` or ``run --out DIR`` on a directory another process is writing is
    refused before torch is imported (the runner takes the lock itself; this only answers sooner)."""
    from samedge.experiment.store.lock import check_unlocked

    if not argv or argv[0] != "run":
        return
    from samedge.experiment.world import env_place

    if env_place().world_size > 1:  # a worker of a run over many processes: rank 0 locks
        return
    for i, arg in enumerate(argv):
        for flag in ("--resume", "--out"):
            if arg == flag and i + 1 < len(argv):
                check_unlocked(argv[i + 1])
            elif arg.startswith(flag + "="):
                check_unlocked(arg[len(flag) + 1 :])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from samedge.experiment.world import env_place

        env_place()  # an inconsistent WORLD_SIZE/RANK/SAMEDGE_DIST_TIMEOUT is refused before anything runs
        _refuse_locked_early(argv)
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as stop:  # argparse: --help (0) or a usage error (2, message already printed)
            return int(stop.code or 0)
        args.argv = list(argv)  # for the workers of --nproc
        handler = COMMANDS[args.command]
        return handler(args)
    except BadInput as err:
        if _is_rank0():  # over many processes every rank raises it; rank 0 says it
            print(f"samedge: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # the machine refused: permissions, a full disk, a vanished path
        from samedge.experiment.store.files import describe_os_error

        print(f"samedge: error: {describe_os_error(err)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        print("samedge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if not _lost_peer(err):
            raise  # a bug of samedge's: its traceback
        # a rank whose peer died: the launcher (or torchrun) names the dead rank; this one says one line
        print(
            f"samedge: error: rank lost its peers ({type(err).__name__}); see the dead rank's message", file=sys.stderr
        )
        return EXIT_WORKER_LOST


def _lost_peer(err: BaseException) -> bool:
    if "torch" not in sys.modules:
        return False
    from samedge.experiment.world import lost_peer

    return lost_peer(err)


def _is_rank0() -> bool:
    """Whether this process speaks for a run: rank 0 of a run over many processes, or the only one
    (read from the environment torchrun and ``--nproc`` set, without importing torch); a process
    whose environment is inconsistent speaks for itself."""
    from samedge.experiment.world import env_place

    try:
        return env_place().is_writer
    except BadInput:
        return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
