"""``samedge reproduce TASK``: the paper's comparisons for a task as one sweep (a preset in
``samedge/experiment/sweeps/grids/``), the comparison figures, and a report (``report.md`` and a
self-contained ``report.html`` with the figures embedded) that checks each claim of the paper
against the measured numbers."""

from __future__ import annotations

import base64
import html
import math
import statistics
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samedge.errors import ConfigError
from samedge.experiment.store.metrics import edge_reached_index
from samedge.experiment.sweeps.spec import SweepSpec, load_sweep_file

__all__ = ["reproduce_names", "load_reproduce_spec", "write_report", "check_claims", "Claim"]


def _folder():
    return resources.files("samedge.experiment.sweeps") / "grids"


def reproduce_names() -> list[str]:
    """Tasks with a reproduce grid (``TASK.toml``; ``TASK-paper.toml`` is its paper-scale variant)."""
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".toml") and "-paper" not in p.name)


def load_reproduce_spec(task: str, paper: bool = False) -> SweepSpec:
    if task not in reproduce_names():
        raise ConfigError(f"no reproduce grid for {task!r}; choose one of {', '.join(reproduce_names())}")
    name = f"{task}-paper.toml" if paper else f"{task}.toml"
    with resources.as_file(_folder() / name) as path:
        if not path.exists():
            raise ConfigError(f"no paper-scale reproduce grid for {task!r}")
        return load_sweep_file(path)


# --- the report -------------------------------------------------------------------------------

#: a run tracks its edge when the median sharpness/edge after reaching 90% of it lies in this band
TRACK_BAND = (0.9, 1.1)
#: "far below 2/eta": the SAM-edge (median after reaching it) is at most this fraction of 2/eta
FAR_BELOW = 0.5


@dataclass
class Claim:
    text: str
    holds: bool | None  # None: the sweep has no run that can test it
    evidence: str
    figure: str

    @property
    def verdict(self) -> str:
        return {True: "yes", False: "no", None: "not tested"}[self.holds]


if TYPE_CHECKING:
    from samedge.experiment.analysis.overlay import ComparedRun


def _tail(run: ComparedRun) -> list[dict]:
    """The measurements from the one where the run reached 90% of its edge."""
    k = edge_reached_index([r.get("sharpness_over_edge") for r in run.rows])
    return [] if k is None else run.rows[k:]


def _tracks(run: ComparedRun) -> bool:
    med = run.summary.get("ratio_median")
    return isinstance(med, (int, float)) and TRACK_BAND[0] <= med <= TRACK_BAND[1]


def _corr(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3:
        return math.nan
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:  # a constant series
        return math.nan


def check_claims(runs: list[ComparedRun]) -> list[Claim]:
    """Each claim of the paper, checked on the measured runs."""
    sam = [r for r in runs if r.method.perturbs and r.config.get("optimizer") == "sam"]
    gd = [r for r in runs if not r.method.perturbs]
    claims = []

    tracking = [r for r in sam if _tracks(r)]
    ev = "; ".join(f"{r.name}: median {r.summary.get('ratio_median') or math.nan:.3f}" for r in sam)
    claims.append(
        Claim(
            "Under SAM the sharpness reaches the SAM-edge and tracks it (median sharpness/edge afterwards in "
            f"[{TRACK_BAND[0]}, {TRACK_BAND[1]}] for at least 2/3 of the SAM runs)",
            None if not sam else 3 * len(tracking) >= 2 * len(sam),
            f"{len(tracking)} of {len(sam)} SAM runs track their edge ({ev})",
            "compare_ratio.png",
        )
    )

    below = []
    for r in sam:
        tail = _tail(r)
        if tail:
            below.append((r, statistics.median(float(x["sam_edge"]) for x in tail) / r.method.gd_edge))
    claims.append(
        Claim(
            f"The SAM-edge lies far below 2/eta (at most {FAR_BELOW:g} x 2/eta while the sharpness tracks it)",
            None if not below else all(q <= FAR_BELOW for _, q in below),
            "SAM-edge / (2/eta): " + ", ".join(f"{r.name} {q:.3f}" for r, q in below),
            "compare_sharpness.png",
        )
    )

    corrs = []
    for r in sam:
        tail = _tail(r)
        g = [float(x["grad_norm"]) for x in tail]
        e = [float(x["sam_edge"]) for x in tail]
        s = [float(x["sharpness"]) for x in tail]
        if len(tail) >= 3 and max(g) > 0:
            corrs.append((r, max(e) / min(e), _corr(s, e)))
    moving = [c for c in corrs if c[1] >= 1.1 and c[2] >= 0.5]
    claims.append(
        Claim(
            "The SAM-edge moves with ||g|| and the sharpness follows it (after the edge is reached the edge varies "
            "by at least 10% and the correlation of sharpness and edge is at least 0.5, in most SAM runs)",
            None if not corrs else 2 * len(moving) > len(corrs),
            "edge max/min, corr(sharpness, edge): "
            + ", ".join(f"{r.name} {span:.2f}, {c:.2f}" for r, span, c in corrs),
            "compare_sharpness.png",
        )
    )

    # GD at a small eta (there for the same-eta comparison) may not reach 2/eta within the run:
    # the claim is tested on the GD runs that reach it, and those that do not are named
    reached = [r for r in gd if r.summary.get("edge_reached_step") is not None]
    hovering = [r for r in reached if _tracks(r)]
    short = [r for r in gd if r not in reached]
    claims.append(
        Claim(
            f"GD's sharpness rises to 2/eta and hovers there (median sharpness/(2/eta) in [{TRACK_BAND[0]}, "
            f"{TRACK_BAND[1]}] after reaching it)",
            None if not reached else len(hovering) == len(reached),
            f"{len(hovering)} of {len(reached)} GD runs that reached 90% of 2/eta hover: "
            + ", ".join(f"{r.name} median {r.summary.get('ratio_median'):.3f}" for r in reached)
            + "".join(
                f"; {r.name} did not reach 2/eta = {r.method.gd_edge:.3g} (final sharpness "
                f"{_f(r.summary.get('final_sharpness'), '.3g')})"
                for r in short
            ),
            "compare_ratio.png",
        )
    )

    pairs = []
    for r in sam:
        same_eta = [q for q in gd if math.isclose(q.method.eta, r.method.eta)]
        if same_eta and isinstance(r.summary.get("final_sharpness"), (int, float)):
            ref = statistics.median(float(q.summary["final_sharpness"]) for q in same_eta)
            pairs.append((r, float(r.summary["final_sharpness"]), ref))
    claims.append(
        Claim(
            "SAM's sharpness ends below GD's at the same eta",
            None if not pairs else all(s < g for _, s, g in pairs),
            "final sharpness SAM vs GD (median over seeds): "
            + ", ".join(f"{r.name} {s:.3g} vs {g:.3g}" for r, s, g in pairs),
            "compare_vs_rho.png" if any("rho" in r.config for r in runs) else "compare_sharpness.png",
        )
    )
    return claims


_TABLE = [
    ("run", lambda r: r.name),
    ("optimizer", lambda r: r.config.get("optimizer")),
    ("eta", lambda r: f"{r.method.eta:g}"),
    ("rho", lambda r: f"{r.method.rho:g}"),
    ("seed", lambda r: r.config.get("seed")),
    ("steps", lambda r: r.summary.get("final_step")),
    ("edge reached at", lambda r: r.summary.get("edge_reached_step")),
    ("median sharpness/edge", lambda r: _f(r.summary.get("ratio_median"), ".3f")),
    ("IQR", lambda r: _f(r.summary.get("ratio_iqr"), ".3f")),
    ("final sharpness", lambda r: _f(r.summary.get("final_sharpness"))),
    ("final edge", lambda r: _f(r.summary.get("final_edge"))),
    ("2/eta", lambda r: _f(r.method.gd_edge)),
    ("final train loss", lambda r: _f(r.summary.get("final_train_loss"))),
    ("test error", lambda r: _f(r.summary.get("test_error"), ".3f")),
    ("HVPs", lambda r: r.summary.get("total_hvps")),
    ("wall s", lambda r: _f(r.summary.get("elapsed_s"), ".0f")),
]


def _f(x: Any, spec: str = ".4g") -> str:
    return "" if not isinstance(x, (int, float)) else format(x, spec)


def write_report(sweep: Path) -> list[Path]:
    """``report.md`` and ``report.html`` (figures embedded) in ``sweep`` from its runs and the
    figures in ``sweep/compare``."""
    from samedge.experiment.analysis.overlay import load_runs

    runs, varied, _ = load_runs([sweep])
    claims = check_claims(runs)
    figures = sorted((sweep / "compare").glob("compare_*.png"))
    head = [h for h, _ in _TABLE]
    cells = [[str(v) if (v := get(r)) is not None else "" for _, get in _TABLE] for r in runs]
    command = "samedge " + " ".join(sys.argv[1:]) if sys.argv[1:] else "samedge reproduce"

    md = [f"# samedge reproduce: {runs[0].config.get('task', '')}", ""]
    md += [f"Command: `{command}`; varied settings: {', '.join(varied) or 'none'}.", ""]
    md += ["## Claims of the paper, checked on these runs", ""]
    md += ["| claim | holds | measured | figure |", "|---|---|---|---|"]
    md += [f"| {c.text} | **{c.verdict}** | {c.evidence} | [{c.figure}](compare/{c.figure}) |" for c in claims]
    md += ["", "## Runs", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(row) + " |" for row in cells]
    md += ["", "## Figures", ""] + [f"![{p.stem}](compare/{p.name})" for p in figures] + [""]
    md_path = sweep / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")

    e = html.escape
    page = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>samedge reproduce {e(str(runs[0].config.get('task', '')))}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
        "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}.yes{color:green}.no{color:#b00}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>samedge reproduce: {e(str(runs[0].config.get('task', '')))}</h1>",
        f"<p>Command: <code>{e(command)}</code>; varied settings: {e(', '.join(varied) or 'none')}.</p>",
        "<h2>Claims of the paper, checked on these runs</h2><table><tr><th>claim</th><th>holds</th>"
        "<th>measured</th><th>figure</th></tr>",
    ]
    for c in claims:
        page.append(
            f"<tr><td>{e(c.text)}</td><td class='{c.verdict}'><b>{c.verdict}</b></td><td>{e(c.evidence)}</td>"
            f"<td><a href='#{e(c.figure)}'>{e(c.figure)}</a></td></tr>"
        )
    page.append("</table><h2>Runs</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
    page += ["<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in cells]
    page.append("</table><h2>Figures</h2>")
    for p in figures:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        page.append(f"<h3 id='{e(p.name)}'>{e(p.name)}</h3><img alt='{e(p.stem)}' src='data:image/png;base64,{data}'>")
    page.append("</body></html>")
    html_path = sweep / "report.html"
    html_path.write_text("\n".join(page), encoding="utf-8")
    return [md_path, html_path]
