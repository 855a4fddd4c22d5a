"""The paper's claims, each checked on one task's runs with the number behind it and its spread
over seeds.

A claim that a task's runs cannot test (no GD run at SAM's step size, one rho only) is "not tested",
never "yes".  A claim that does not hold is reported as not holding, with its numbers.  For a
minibatch task (Shakespeare) the tracking claims use the step's minibatch -- the sharpness SAM's
step sees, as the paper measures it -- and the flatness claim uses the fixed evaluation batch's
sharpness (the same batch for GD and SAM) against the test loss (the one loss measured on a fixed
set at every reading; the minibatch training loss is a different batch at every step).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from samedge.experiment.store.metrics import edge_reached_index

if TYPE_CHECKING:
    from samedge.experiment.analysis.overlay import ComparedRun

__all__ = ["Claim", "check_claims", "CLAIM_NAMES", "TRACK_BAND", "FAR_BELOW", "DEPART", "flatness_pairs"]

#: a run tracks its edge when the median sharpness/edge after reaching 90% of it lies in this band
TRACK_BAND = (0.9, 1.1)
#: "far below 2/eta": the SAM-edge (median after reaching it) is at most this fraction of 2/eta
FAR_BELOW = 0.5
#: SAM and GD "part" at the first common reading where their sharpness differs by more than this
DEPART = 0.10
#: loss levels at which SAM and GD are compared: fractions of the way from the initial loss to the
#: higher of the two final losses (on a log scale), early training first
LOSS_LEVELS = (0.2, 0.4, 0.6, 0.8, 1.0)

#: the claims, in the report's order: short name -> statement
CLAIM_NAMES = {
    "tracks": "SAM's sharpness reaches its SAM-edge and tracks it, while 2/eta is far above",
    "edge_moves": "The SAM-edge moves with ||g|| within a run and the sharpness follows it",
    "gd_hovers": "GD's sharpness rises to 2/eta and hovers there",
    "rho_lower": "Larger rho gives lower sharpness",
    "flatter_early": "SAM is in flatter regions than GD from early in training, at equal loss (lambda_1 and trace)",
    "test": "SAM's test error (Shakespeare: test loss) against GD's at the end",
}


@dataclass
class Claim:
    key: str
    holds: bool | None  # None: the runs cannot test it
    evidence: str  # the numbers behind the verdict, with the spread over seeds
    figure: str
    cell: str = ""  # the short number for the claim x task table

    @property
    def text(self) -> str:
        return CLAIM_NAMES[self.key]

    @property
    def verdict(self) -> str:
        return {True: "yes", False: "no", None: "not tested"}[self.holds]


def _num(x: object) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _spread(values: Sequence[float], spec: str = ".3g") -> str:
    """``median (min to max, n)`` of ``values``."""
    vals = sorted(v for v in values if math.isfinite(v))
    if not vals:
        return "n/a"
    med = statistics.median(vals)
    if len(vals) == 1:
        return format(med, spec)
    return f"{med:{spec}} ({vals[0]:{spec}} to {vals[-1]:{spec}}, n={len(vals)})"


def _tail(run: ComparedRun, column: str = "sharpness_over_edge") -> list[dict]:
    """The readings from the one where the run reached 90% of its edge."""
    k = edge_reached_index([r.get(column) for r in run.rows])
    return [] if k is None else run.rows[k:]


def _tracks(run: ComparedRun) -> bool:
    med = _num(run.summary.get("ratio_median"))
    return med is not None and TRACK_BAND[0] <= med <= TRACK_BAND[1]


def _corr(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3:
        return math.nan
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:  # a constant series
        return math.nan


def _is_sam(r: ComparedRun) -> bool:
    return r.settings.optimizer == "sam" and r.method.perturbs


def _is_gd(r: ComparedRun) -> bool:
    return not r.method.perturbs


def _minibatch(runs: Sequence[ComparedRun]) -> bool:
    return any(r.settings.batch_size for r in runs)


def _claim_tracks(runs: Sequence[ComparedRun]) -> Claim:
    sam = [r for r in runs if _is_sam(r)]
    medians = [m for r in sam if (m := _num(r.summary.get("ratio_median"))) is not None]
    iqrs = [i for r in sam if (i := _num(r.summary.get("ratio_iqr"))) is not None]
    far = []
    for r in sam:
        tail = _tail(r)
        if tail:
            far.append(r.method.gd_edge / statistics.median(float(x["sam_edge"]) for x in tail))
    tracking = [r for r in sam if _tracks(r)]
    holds = None if not sam else 3 * len(tracking) >= 2 * len(sam) and bool(far) and min(far) >= 1 / FAR_BELOW
    which = "the step's minibatch " if _minibatch(runs) else ""
    evidence = (
        f"{len(tracking)} of {len(sam)} SAM runs track their edge ({which}sharpness/edge median after first reaching "
        f"90% of it: {_spread(medians)}; IQR {_spread(iqrs)}); 2/eta over the SAM-edge there: {_spread(far)} "
        f"(far above: at least {1 / FAR_BELOW:g})"
    )
    return Claim("tracks", holds, evidence, "compare_ratio.png", f"{_spread(medians)}; 2/eta {_spread(far, '.2g')}x")


def _claim_edge_moves(runs: Sequence[ComparedRun]) -> Claim:
    spans, corrs = [], []
    for r in runs:
        if not _is_sam(r):
            continue
        tail = _tail(r)
        e = [float(x["sam_edge"]) for x in tail]
        s = [float(x["sharpness"]) for x in tail]
        if len(tail) >= 3 and min(e) > 0:
            spans.append(max(e) / min(e))
            corrs.append(_corr(s, e))
    moving = [1 for span, c in zip(spans, corrs) if span >= 1.1 and c >= 0.5]
    holds = None if not spans else 2 * len(moving) > len(spans)
    evidence = (
        f"{len(moving)} of {len(spans)} SAM runs: the edge moves by at least 10% after it is reached (max/min "
        f"{_spread(spans)}) and the sharpness follows it (correlation {_spread(corrs, '.2f')}; at least 0.5)"
    )
    return Claim(
        "edge_moves",
        holds,
        evidence,
        "compare_sharpness.png",
        f"edge x{_spread(spans, '.2f')}, r {_spread(corrs, '.2f')}",
    )


def _claim_gd_hovers(runs: Sequence[ComparedRun]) -> Claim:
    gd = [r for r in runs if _is_gd(r)]
    reached = [r for r in gd if r.summary.get("edge_reached_step") is not None]
    hovering = [r for r in reached if _tracks(r)]
    medians = [m for r in reached if (m := _num(r.summary.get("ratio_median"))) is not None]
    short = [r for r in gd if r not in reached]
    holds = None if not reached else len(hovering) == len(reached)
    evidence = (
        f"{len(hovering)} of {len(reached)} GD runs that reached 90% of 2/eta hover in [{TRACK_BAND[0]}, "
        f"{TRACK_BAND[1]}] (median sharpness/(2/eta) {_spread(medians)})"
    )
    if short:
        finals = ", ".join(
            f"{r.name} {(_num(r.summary.get('final_sharpness')) or math.nan):.3g} of {r.method.gd_edge:.3g}"
            for r in short
        )
        evidence += f"; {len(short)} did not reach 2/eta within the run (final sharpness of 2/eta: {finals})"
    return Claim("gd_hovers", holds, evidence, "compare_ratio.png", _spread(medians))


def _late_sharpness(run: ComparedRun) -> float | None:
    """The median sharpness over the second half of the run's readings (steadier than the last)."""
    values = [v for r in run.rows if (v := _num(r.get("sharpness"))) is not None]
    if not values:
        return None
    return statistics.median(values[len(values) // 2 :])


def _claim_rho_lower(runs: Sequence[ComparedRun]) -> Claim:
    by_seed: dict[tuple, dict[float, float]] = {}
    for r in runs:
        if not _is_sam(r):
            continue
        late = _late_sharpness(r)
        if late is not None:
            by_seed.setdefault((r.settings.seed, r.method.eta), {})[r.method.rho] = late
    series = [dict(sorted(v.items())) for v in by_seed.values() if len(v) >= 2]
    monotone = [all(a > b for a, b in zip(list(s.values()), list(s.values())[1:])) for s in series]
    drops = [list(s.values())[-1] / list(s.values())[0] for s in series]
    holds = None if not series else all(monotone)
    rhos = sorted({rho for s in series for rho in s})
    evidence = (
        f"sharpness (median over the second half of each run) falls as rho grows ({', '.join(f'{x:g}' for x in rhos)}) "
        f"in {sum(monotone)} of {len(series)} seeds; largest rho over smallest: {_spread(drops)}"
    )
    return Claim("rho_lower", holds, evidence, "compare_vs_rho.png", f"x{_spread(drops, '.2f')}")


def flatness_pairs(runs: Sequence[ComparedRun]) -> list[tuple[ComparedRun, ComparedRun]]:
    """(GD, SAM) pairs from one initialization: the same seed and eta, SAM at every rho."""
    gd = {(r.settings.seed, r.method.eta): r for r in runs if _is_gd(r)}
    return [
        (gd[(r.settings.seed, r.method.eta)], r) for r in runs if _is_sam(r) and (r.settings.seed, r.method.eta) in gd
    ]


def _series(run: ComparedRun, loss: str, value: str) -> list[tuple[float, float]]:
    out = []
    for r in run.rows:
        x, y = _num(r.get(loss)), _num(r.get(value))
        if x is not None and y is not None:
            out.append((x, y))
    return out


def _at_loss(series: list[tuple[float, float]], level: float) -> float | None:
    """The value at the first reading whose loss is at or below ``level`` (None: never)."""
    return next((v for loss, v in series if loss <= level), None)


def _compare_at_equal_loss(gd: ComparedRun, sam: ComparedRun, loss: str, value: str) -> list[tuple[float, float]]:
    """(fraction of the way, SAM/GD ratio of ``value``) at the :data:`LOSS_LEVELS`."""
    g, s = _series(gd, loss, value), _series(sam, loss, value)
    if len(g) < 2 or len(s) < 2:
        return []
    start = max(g[0][0], s[0][0])
    end = max(min(x for x, _ in g), min(x for x, _ in s))
    if not (start > end > 0):
        return []
    out = []
    for frac in LOSS_LEVELS:
        level = math.exp(math.log(start) + frac * (math.log(end) - math.log(start)))
        a, b = _at_loss(g, level), _at_loss(s, level)
        if a is not None and b is not None and a > 0:
            out.append((frac, b / a))
    return out


def _departure(gd: ComparedRun, sam: ComparedRun, value: str) -> tuple[int | None, float | None]:
    """The step where SAM's ``value`` first differs from GD's by more than :data:`DEPART`, and
    GD's loss there over its initial loss."""
    by_step = {int(r["step"] or 0): r for r in sam.rows}
    first_loss = _num(gd.rows[0].get("train_loss")) if gd.rows else None
    for r in gd.rows:
        q = by_step.get(int(r["step"] or 0))
        a, b = _num(r.get(value)), _num(q.get(value)) if q else None
        if a and b is not None and abs(b / a - 1) > DEPART:
            loss = _num(r.get("train_loss"))
            return int(r["step"] or 0), (loss / first_loss if loss and first_loss else None)
    return None, None


def _claim_flatter_early(runs: Sequence[ComparedRun]) -> Claim:
    minibatch = _minibatch(runs)
    loss = "test_loss" if minibatch else "train_loss"
    value = "eval_sharpness" if minibatch else "sharpness"
    pairs = flatness_pairs(runs)
    lam, tr, departs, depart_loss, early = [], [], [], [], []
    flatter = 0
    for gd, sam in pairs:
        ratios = _compare_at_equal_loss(gd, sam, loss, value)
        traces = _compare_at_equal_loss(gd, sam, loss, "trace")
        if not ratios:
            continue
        lam += [q for _, q in ratios]
        tr += [q for _, q in traces]
        early.append(ratios[0][1])
        step, frac = _departure(gd, sam, value)
        if step is not None:
            departs.append(float(step))
        if frac is not None:
            depart_loss.append(frac)
        lower = all(q < 1 for _, q in ratios[1:]) and (not traces or sum(q < 1 for _, q in traces) * 2 > len(traces))
        flatter += lower
    tested = len(early)
    holds = None if not tested else 2 * flatter > tested
    which = "evaluation-batch sharpness against the test loss" if minibatch else "sharpness against the training loss"
    evidence = (
        f"{flatter} of {tested} GD/SAM pairs from one initialization: SAM/GD {which} at equal loss, from 20% of "
        f"the way (log scale) from the initial loss to the final one: {_spread(lam)} (at 20%: {_spread(early)}); "
        f"trace SAM/GD {_spread(tr)}; the two part (sharpness {DEPART:.0%} apart) at step {_spread(departs, '.0f')}, "
        f"where GD's training loss is {_spread(depart_loss, '.2f')} of its initial loss"
    )
    return Claim(
        "flatter_early", holds, evidence, "flatness.png", f"{_spread(lam, '.2f')}; step {_spread(departs, '.0f')}"
    )


def _claim_test(runs: Sequence[ComparedRun]) -> Claim:
    minibatch = _minibatch(runs)
    key = "test_loss" if minibatch else "test_error"
    diffs, sam_vals, gd_vals = [], [], []
    for gd, sam in flatness_pairs(runs):
        a, b = _num(gd.summary.get(key)), _num(sam.summary.get(key))
        if a is not None and b is not None:
            diffs.append(b - a)
            sam_vals.append(b)
            gd_vals.append(a)
    holds = None if not diffs else statistics.median(diffs) < 0
    what = "test loss" if minibatch else "test error"
    evidence = (
        f"{what} at the end, SAM {_spread(sam_vals)} vs GD at the same eta and seed {_spread(gd_vals)}; "
        f"SAM minus GD {_spread(diffs, '+.3g')} (yes: SAM lower in the median pair)"
    )
    return Claim("test", holds, evidence, "compare_vs_rho.png", f"{_spread(diffs, '+.2g')}")


_CHECKS: dict[str, Callable[[Sequence[ComparedRun]], Claim]] = {
    "tracks": _claim_tracks,
    "edge_moves": _claim_edge_moves,
    "gd_hovers": _claim_gd_hovers,
    "rho_lower": _claim_rho_lower,
    "flatter_early": _claim_flatter_early,
    "test": _claim_test,
}


def check_claims(runs: Sequence[ComparedRun]) -> list[Claim]:
    """Each claim of the paper, checked on one task's measured runs."""
    return [check(runs) for check in _CHECKS.values()]
