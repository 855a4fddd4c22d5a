"""Figures of a run, drawn from its ``metrics.csv`` and ``config.json`` alone (PNG and PDF).

Kept apart from training: ``samedge plot RUN_DIR`` redraws them at any time, also for a run that
is still going or was interrupted.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

# samedge draws to files with Agg whatever MPLBACKEND says, so a backend matplotlib does not know
# (read at its import) must not stop it: the variable is set aside while matplotlib loads.
_backend = os.environ.pop("MPLBACKEND", None)
import matplotlib  # noqa: E402

if _backend is not None:
    os.environ["MPLBACKEND"] = _backend

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from samedge.core.method import Method  # noqa: E402
from samedge.errors import RunDirError  # noqa: E402
from samedge.experiment.config import RunConfig  # noqa: E402
from samedge.experiment.store.density import read_density  # noqa: E402
from samedge.experiment.store.layers import read_layers  # noqa: E402
from samedge.experiment.store.layout import RunDir  # noqa: E402
from samedge.experiment.store.metrics import edge_reached_index, read_metrics  # noqa: E402

__all__ = ["plot_run", "plot_density", "plot_layers", "FIGURES"]

FIGURES = ("sharpness", "sharpness_vs_edge", "alignment", "loss", "grad_norm")


def _secant_series(run_dir: Path) -> tuple[list[float], list[float]] | None:
    """Steps and per-step secant estimates from ``steps.csv`` (None without that file or an estimate)."""
    path = RunDir(run_dir).steps
    if not path.exists():
        return None
    rows = read_metrics(path)
    values = [r.get("sharpness_secant") for r in rows]
    if not any(v is not None for v in values):
        return None
    return [float(r["step"] or 0) for r in rows], [math.nan if v is None else float(v) for v in values]


def _edge_label(method: Method) -> str:
    return method.edge_name if method.perturbs else r"$2/\eta$"


def _column(rows, name):
    return [r.get(name) for r in rows]


def _save(fig, run_dir: Path, name: str) -> list[Path]:
    paths = [RunDir(run_dir).figure(name, "png"), RunDir(run_dir).figure(name, "pdf")]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


save_figure = _save


def _clip_initial_transient(ax, rows, series: list[list]) -> None:
    """Keep an initial spike from squashing the figure.  When a run starts far above its edge (the
    Transformer's sharpness at initialization is ~40x its SAM-edge), the y-axis ends a little above
    everything from the settling point on (:func:`~samedge.experiment.store.metrics.edge_reached_index`) and a note
    gives the off-scale maximum."""
    start = edge_reached_index([r.get("sharpness_over_edge") for r in rows])
    if not start:  # None (never settled) or 0 (no transient)
        return
    values = [v for col in series for v in col if v is not None and v == v]
    later = [v for col in series for v in col[start:] if v is not None and v == v]
    if not later or max(values) <= 1.5 * max(later):
        return
    top = 1.15 * max(later)
    ax.set_ylim(top=top)
    ax.annotate(
        f"off scale before step {rows[start]['step']:g} (max {max(values):.4g})",
        xy=(0.02, 0.97),
        xycoords="axes fraction",
        va="top",
        fontsize=8,
        color="gray",
    )


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure of ``run_dir``; returns the files written."""
    run_dir = Path(run_dir)
    files = RunDir(run_dir)
    if not files.metrics.exists():
        raise RunDirError(f"{run_dir} has no {files.METRICS}; is it a samedge run directory?")
    rows = read_metrics(files.metrics, required=("step", "sharpness"))
    if not rows:
        raise RunDirError(f"{files.metrics} has no measurements yet")
    cfg = files.read_config()
    method = cfg.method()
    title = f"{cfg.task} {method.kind.upper()}  eta={method.eta:g}" + (
        f"  rho={method.rho:g}" if method.perturbs else ""
    )
    written: list[Path] = []
    for draw in (_plot_sharpness, _plot_sharpness_vs_edge, _plot_alignment, _plot_loss, _plot_grad_norm):
        written += draw(run_dir, rows, cfg, title)
    if "trace" in rows[0]:
        written += _plot_trace(run_dir, rows, title)
    if RunDir(run_dir).density.exists():
        written += plot_density(run_dir, title)
    if RunDir(run_dir).layers.exists():
        written += plot_layers(run_dir, title)
    return written


def _plot_sharpness(run_dir: Path, rows: list, cfg: RunConfig, title: str) -> list[Path]:
    """lambda_1 (and the per-step secant estimate, lambda_2.., at w+e) against the edges."""
    method, steps = cfg.method(), _column(rows, "step")
    extra_eigs = sorted(k for k in rows[0] if k.startswith("lambda_"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    secant = _secant_series(run_dir)
    if secant is not None:
        ax.plot(*secant, color="tab:blue", lw=0.6, alpha=0.6, label=r"$\lambda_1$ per step (secant estimate)")
    ax.plot(
        steps,
        _column(rows, "sharpness"),
        "o-",
        ms=2.5,
        lw=1.0,
        color="tab:blue",
        label=r"$\lambda_1$ (sharpness, Lanczos)",
    )
    for name in extra_eigs:
        ax.plot(steps, _column(rows, name), color="tab:blue", alpha=0.35, lw=0.8, label=rf"$\lambda_{{{name[7:]}}}$")
    adaptive = {  # preconditioned bases: what their threshold bounds (gd_edge/sam_edge are that threshold)
        "preconditioned_sharpness": r"$\lambda_1(P^{-1/2} H P^{-1/2})$",
        "effective_sharpness": r"$\lambda_1(P^{-1/2}(H + \frac{\rho}{\|g\|}H^2)P^{-1/2})$",
    }
    for name, label in adaptive.items():
        if name in rows[0]:
            ax.plot(steps, _column(rows, name), lw=1.0, label=label)
    if method.perturbs and not method.preconditioned:
        ax.plot(steps, _column(rows, "sam_edge"), color="tab:green", label=_edge_label(method))
    ax.plot(
        steps,
        _column(rows, "gd_edge"),
        color="tab:purple",
        ls="--",
        label="threshold" if method.preconditioned else r"$2/\eta$" if not cfg.momentum else r"$(2+2\beta)/\eta$",
    )
    if "sharpness_perturbed" in rows[0]:
        ax.plot(
            steps,
            _column(rows, "sharpness_perturbed"),
            color="tab:orange",
            lw=0.8,
            label=r"$\lambda_1$ at $w+\epsilon$",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_ylim(bottom=0)
    _clip_initial_transient(ax, rows, [_column(rows, c) for c in ("sharpness", "sam_edge", "gd_edge")])
    ax.set_title(title)
    ax.legend()
    return _save(fig, run_dir, "sharpness")


#: columns an adaptive base's edge bounds, most specific first, with their labels
_COMPARED = (
    ("effective_sharpness", r"$\lambda_1(P^{-1/2}(H + sH^2)P^{-1/2})$"),
    ("preconditioned_sharpness", r"$\lambda_1(P^{-1/2} H P^{-1/2})$"),
)


def _plot_sharpness_vs_edge(run_dir: Path, rows: list, cfg: RunConfig, title: str) -> list[Path]:
    """What the edge bounds (lambda_1, or an adaptive base's preconditioned or effective sharpness)
    and the edge (minibatch and evaluation batch), and their ratio."""
    method, steps = cfg.method(), _column(rows, "step")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    has_eval = "eval_sharpness" in rows[0]
    minibatch = " (minibatch)" if cfg.batch_size else ""
    # what the edge bounds: the effective or preconditioned sharpness of an adaptive base, else lambda_1(H)
    compared, name = next(
        ((c, label) for c, label in _COMPARED if c in rows[0] and any(r.get(c) is not None for r in rows)),
        ("sharpness", r"$\lambda_1$"),
    )
    ax1.plot(steps, _column(rows, compared), color="tab:blue", label=name + minibatch)
    ax1.plot(steps, _column(rows, "sam_edge"), color="tab:green", label=_edge_label(method) + minibatch)
    series = [_column(rows, compared), _column(rows, "sam_edge")]
    if has_eval:
        ax1.plot(
            steps,
            _column(rows, "eval_sharpness"),
            color="tab:blue",
            ls="--",
            lw=0.9,
            label=r"$\lambda_1$ (evaluation batch)",
        )
        ax1.plot(
            steps,
            _column(rows, "eval_edge"),
            color="tab:green",
            ls="--",
            lw=0.9,
            label=_edge_label(method) + " (evaluation batch)",
        )
        series += [_column(rows, "eval_sharpness"), _column(rows, "eval_edge")]
    ax1.set_ylabel("Hessian eigenvalue")
    ax1.set_ylim(bottom=0)
    _clip_initial_transient(ax1, rows, series)
    ax1.set_title(title)
    ax1.legend()
    ax2.plot(steps, _column(rows, "sharpness_over_edge"), color="black", label="minibatch" if has_eval else None)
    if has_eval:
        ax2.plot(
            steps, _column(rows, "eval_sharpness_over_edge"), color="black", ls="--", lw=0.9, label="evaluation batch"
        )
        ax2.legend(fontsize=8)
    _clip_initial_transient(ax2, rows, [_column(rows, "sharpness_over_edge")])
    ax2.axhline(1.0, color="gray", ls=":")
    ax2.axhspan(0.9, 1.1, color="gray", alpha=0.15)
    ax2.set_ylabel("sharpness / edge")
    ax2.set_xlabel("step")
    return _save(fig, run_dir, "sharpness_vs_edge")


def _plot_alignment(run_dir: Path, rows: list, cfg: RunConfig, title: str) -> list[Path]:
    """How the gradient and SAM's gradient align with the top eigenvector."""
    steps = _column(rows, "step")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(steps, _column(rows, "grad_alignment"), color="tab:blue", label=r"$|\cos(g, v_1)|$")
    ax.plot(steps, _column(rows, "sam_grad_alignment"), color="tab:green", label=r"$|\cos(g_{SAM}, v_1)|$")
    ax.set_xlabel("step")
    ax.set_ylabel("alignment with top eigenvector")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend()
    return _save(fig, run_dir, "alignment")


def _plot_loss(run_dir: Path, rows: list, cfg: RunConfig, title: str) -> list[Path]:
    """Train (and test) loss."""
    steps = _column(rows, "step")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(steps, _column(rows, "train_loss"), color="tab:blue", label="train loss")
    if "test_loss" in rows[0]:
        ax.plot(steps, _column(rows, "test_loss"), color="tab:red", label="test loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    return _save(fig, run_dir, "loss")


def _plot_grad_norm(run_dir: Path, rows: list, cfg: RunConfig, title: str) -> list[Path]:
    """The gradient norm the SAM-edge depends on."""
    steps = _column(rows, "step")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(steps, _column(rows, "grad_norm"), color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(r"$\|g\|$")
    ax.set_title(title)
    return _save(fig, run_dir, "grad_norm")


def _plot_trace(run_dir: Path, rows, title: str) -> list[Path]:
    traced = [r for r in rows if r.get("trace") is not None]
    if not traced:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    steps = [r["step"] for r in traced]
    ax.errorbar(
        steps,
        _column(traced, "trace"),
        yerr=[2 * (s or 0) for s in _column(traced, "trace_stderr")],
        color="tab:red",
        capsize=2,
        label=r"tr$(H)$ (Hutchinson, $\pm 2$ s.e.)",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("Hessian trace")
    ax.set_title(title)
    ax.legend()
    return _save(fig, run_dir, "trace")


def plot_density(run_dir: str | Path, title: str = "") -> list[Path]:
    """``density.png/.pdf``: the SLQ spectral density of each reading in ``density.csv``,
    Gaussian-smoothed (width 1% of the eigenvalue range), on a log scale as Ghorbani et al."""
    run_dir = Path(run_dir)
    readings = read_density(RunDir(run_dir).density)
    if not readings:
        return []
    lo = min(float(n.min()) for n, _ in readings.values())
    hi = max(float(n.max()) for n, _ in readings.values())
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    grid = np.linspace(lo - pad, hi + pad, 2000)
    sigma = 0.01 * (hi - lo) if hi > lo else 0.01
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cmap = plt.get_cmap("viridis")
    steps = sorted(readings)
    peak = 0.0
    for i, step in enumerate(steps):
        nodes, weights = readings[step]
        z = (grid[:, None] - nodes[None, :]) / sigma
        dens = (np.exp(-0.5 * z**2) @ weights) / (sigma * np.sqrt(2 * np.pi))
        peak = max(peak, float(dens.max()))
        ax.plot(grid, dens, color=cmap(i / max(len(steps) - 1, 1)), lw=1, label=f"step {step}")
    ax.set_yscale("log")
    ax.set_ylim(1e-5 * peak, 2 * peak)
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density (SLQ, smoothed)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2 if len(steps) > 6 else 1)
    return _save(fig, run_dir, "density")


def plot_layers(run_dir: str | Path, title: str = "") -> list[Path]:
    """``layers.png/.pdf``: the top eigenvector's mass per block over the steps (stacked areas,
    summing to 1), from ``layers.csv``; with block eigenvalues, a second panel of
    ``lambda_max(H_BB) / lambda_1`` per block."""
    run_dir = Path(run_dir)
    rows = read_layers(RunDir(run_dir).layers)
    if not rows:
        return []
    steps = sorted({int(r["step"]) for r in rows})
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    mass = {b: {int(r["step"]): r["mass"] for r in rows if r["block"] == b} for b in blocks}
    series = np.array([[mass[b].get(t) or 0.0 for t in steps] for b in blocks])
    sharp = [r for r in rows if r.get("sharpness_over_top") is not None]
    fig, axes = plt.subplots(2 if sharp else 1, 1, figsize=(6.4, 6.4 if sharp else 4.2), sharex=True, squeeze=False)
    ax = axes[0][0]
    colors = plt.get_cmap("tab20")(np.arange(len(blocks)) % 20)
    if len(steps) > 1:
        ax.stackplot(steps, series, labels=blocks, colors=colors)
    else:
        ax.bar(steps, series[:, 0], bottom=np.cumsum(series[:, 0]) - series[:, 0], color=colors, label=blocks)
    ax.set_ylim(0, 1)
    ax.set_ylabel(r"mass $\|v_1[B]\|^2$")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2 if len(blocks) > 8 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if sharp:
        bx = axes[1][0]
        for b, c in zip(blocks, colors):
            pts = [(int(r["step"]), r["sharpness_over_top"]) for r in sharp if r["block"] == b]
            if pts:
                bx.plot(*zip(*pts), marker="o", ms=3, color=c, label=b)
        bx.axhline(1.0, color="gray", ls="--", lw=1)
        bx.set_ylabel(r"$\lambda_{max}(H_{BB}) / \lambda_1$")
    axes[-1][0].set_xlabel("step")
    return _save(fig, run_dir, "layers")
