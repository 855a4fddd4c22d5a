"""``samedge reproduce TASK``: the paper's comparisons for a task as one sweep (a preset in
``samedge/experiment/sweeps/grids/``), the comparison figures, and a report (``report.md`` and a
self-contained ``report.html`` with the figures embedded) that checks each claim of the paper
against the measured numbers."""

from __future__ import annotations

import base64
import html
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samedge.errors import ConfigError, RunDirError
from samedge.experiment.analysis.claims import CLAIM_NAMES, Claim, check_claims, flatness_pairs
from samedge.experiment.sweeps.spec import SweepSpec, load_sweep_file

__all__ = [
    "reproduce_names",
    "load_reproduce_spec",
    "write_report",
    "write_paper_report",
    "check_claims",
    "Claim",
    "PAPER_TASKS",
]

#: the paper's three experiments, in its order (``samedge reproduce all``)
PAPER_TASKS = ("mnist", "cifar10", "shakespeare")


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

if TYPE_CHECKING:
    from samedge.experiment.analysis.overlay import ComparedRun


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


def _flatness_figure(sweep: Path, runs: list[ComparedRun]) -> Path | None:
    """GD and SAM from one initialization (the first pair): sharpness, trace and test error
    against steps and against the loss, as ``samedge flatness`` draws them."""
    from samedge.experiment.analysis.flatness import plot_flatness

    pairs = flatness_pairs(runs)
    if not pairs:
        return None
    gd, sam = pairs[0]
    (sweep / "compare").mkdir(exist_ok=True)
    title = f"{sam.settings.task}  eta={sam.method.eta:g}  rho={sam.method.rho:g} (SAM), seed {sam.settings.seed}"
    plot_flatness(sweep / "compare", gd.rows, sam.rows, title=title)
    return sweep / "compare" / "flatness.png"


def _run_table(runs: list[ComparedRun]) -> tuple[list[str], list[list[str]]]:
    head = [h for h, _ in _TABLE]
    return head, [[str(v) if (v := get(r)) is not None else "" for _, get in _TABLE] for r in runs]


def _command() -> str:
    return "samedge " + " ".join(sys.argv[1:]) if sys.argv[1:] else "samedge reproduce"


def _md_task(sweep: Path, runs: list[ComparedRun], claims: list[Claim], level: str, link: str) -> list[str]:
    head, cells = _run_table(runs)
    figures = sorted((sweep / "compare").glob("*.png"))
    md = [f"{level} Claims checked on these runs", ""]
    md += ["| claim | holds | measured | figure |", "|---|---|---|---|"]
    md += [f"| {c.text} | **{c.verdict}** | {c.evidence} | [{c.figure}]({link}compare/{c.figure}) |" for c in claims]
    md += ["", f"{level} Runs", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(row) + " |" for row in cells]
    md += ["", f"{level} Figures", ""] + [f"![{p.stem}]({link}compare/{p.name})" for p in figures] + [""]
    return md


def _html_task(sweep: Path, runs: list[ComparedRun], claims: list[Claim], level: str) -> list[str]:
    e = html.escape
    head, cells = _run_table(runs)
    task = runs[0].settings.task
    page = [
        f"<{level}>Claims checked on these runs</{level}><table><tr><th>claim</th><th>holds</th>"
        "<th>measured</th><th>figure</th></tr>"
    ]
    for c in claims:
        page.append(
            f"<tr><td>{e(c.text)}</td><td class='{c.verdict.replace(' ', '-')}'><b>{c.verdict}</b></td>"
            f"<td>{e(c.evidence)}</td><td><a href='#{e(task)}-{e(c.figure)}'>{e(c.figure)}</a></td></tr>"
        )
    page.append(f"</table><{level}>Runs</{level}><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
    page += ["<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in cells]
    page.append(f"</table><{level}>Figures</{level}>")
    for p in sorted((sweep / "compare").glob("*.png")):
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        page.append(
            f"<h4 id='{e(task)}-{e(p.name)}'>{e(p.name)}</h4><img alt='{e(p.stem)}' src='data:image/png;base64,{data}'>"
        )
    return page


_STYLE = (
    "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
    "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}.yes{color:green}"
    ".no{color:#b00}.not-tested{color:#777}img{max-width:100%}</style>"
)


def _load(sweep: Path) -> tuple[list[ComparedRun], list[str]]:
    from samedge.experiment.analysis.overlay import load_runs

    runs, varied, _ = load_runs([sweep])
    return runs, varied


def write_report(sweep: Path) -> list[Path]:
    """``report.md`` and ``report.html`` (figures embedded) in ``sweep`` from its runs and the
    figures in ``sweep/compare``."""
    runs, varied = _load(sweep)
    claims = check_claims(runs)
    _flatness_figure(sweep, runs)
    task = runs[0].settings.task
    md = [f"# samedge reproduce: {task}", ""]
    md += [f"Command: `{_command()}`; varied settings: {', '.join(varied) or 'none'}.", ""]
    md += _md_task(sweep, runs, claims, "##", "")
    e = html.escape
    body = [
        f"<h1>samedge reproduce: {e(task)}</h1>",
        f"<p>Command: <code>{e(_command())}</code>; varied settings: {e(', '.join(varied) or 'none')}.</p>",
        *_html_task(sweep, runs, claims, "h2"),
    ]
    return _write_reports(sweep, md, f"samedge reproduce {task}", body)


def _write_reports(folder: Path, md: list[str], title: str, body: list[str]) -> list[Path]:
    """``folder/report.md`` from its lines and the self-contained ``folder/report.html`` around ``body``."""
    md_path, html_path = folder / "report.md", folder / "report.html"
    md_path.write_text("\n".join(md), encoding="utf-8")
    head = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}</head><body>"
    html_path.write_text("\n".join([head, *body, "</body></html>"]), encoding="utf-8")
    return [md_path, html_path]


def write_paper_report(out: Path, tasks: tuple[str, ...] = PAPER_TASKS) -> list[Path]:
    """``out/report.md`` and ``out/report.html``: first one table of every claim on every task
    (yes/no, the number behind it and its spread over seeds), then a section per task.  Drawn
    from the run directories under ``out/<task>/`` alone."""
    sections: dict[str, tuple[Path, list[ComparedRun], list[Claim]]] = {}
    missing = []
    for task in tasks:
        sweep = out / task
        try:
            runs, _ = _load(sweep)
        except RunDirError:
            missing.append(task)
            continue
        _flatness_figure(sweep, runs)
        sections[task] = (sweep, runs, check_claims(runs))
    if not sections:
        raise RunDirError(f"{out} holds no task's runs yet ({', '.join(tasks)}); run `samedge reproduce all` first")
    names = list(sections)
    md = ["# The paper in one report: samedge reproduce all", ""]
    md += [
        f"Command: `{_command()}`. Tasks: {', '.join(names)}"
        + (f"; no runs yet: {', '.join(missing)}" if missing else "")
        + ".",
        "",
    ]
    md += [
        "## Claims x tasks",
        "",
        "Each cell: does the claim hold on that task's runs (yes/no), and the number behind it "
        "(median over runs or seeds, with the range and count). The task sections below give every number.",
        "",
    ]
    md += ["| claim | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, key in enumerate(CLAIM_NAMES):
        cells = []
        for task in names:
            c = sections[task][2][i]
            cells.append(f"**{c.verdict}**" + (f": {c.cell}" if c.holds is not None else ""))
        md.append(f"| {CLAIM_NAMES[key]} | " + " | ".join(cells) + " |")
    md.append("")
    for task, (sweep, runs, claims) in sections.items():
        md += [f"## {task}", "", f"Sweep directory: `{task}/` ({len(runs)} runs).", ""]
        md += _md_task(sweep, runs, claims, "###", f"{task}/")
    e = html.escape
    page = [
        "<h1>The paper in one report: samedge reproduce all</h1>",
        f"<p>Command: <code>{e(_command())}</code>.</p><h2>Claims x tasks</h2><table><tr><th>claim</th>"
        + "".join(f"<th>{e(t)}</th>" for t in names)
        + "</tr>",
    ]
    for i, key in enumerate(CLAIM_NAMES):
        row = f"<tr><td>{e(CLAIM_NAMES[key])}</td>"
        for task in names:
            c = sections[task][2][i]
            row += (
                f"<td class='{c.verdict.replace(' ', '-')}'><b>{c.verdict}</b>"
                + (f": {e(c.cell)}" if c.holds is not None else "")
                + "</td>"
            )
        page.append(row + "</tr>")
    page.append("</table>")
    for task, (sweep, runs, claims) in sections.items():
        page.append(f"<h2 id='{e(task)}'>{e(task)}</h2>")
        page += _html_task(sweep, runs, claims, "h3")
    return _write_reports(out, md, "samedge reproduce all", page)
