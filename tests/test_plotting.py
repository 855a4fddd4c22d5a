"""Figures: the y-axis is not squashed by a run's initial transient far above its edge."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from samedge.experiment.analysis.figures import FIGURES, _clip_initial_transient, plot_run  # noqa: E402
from samedge.experiment.store.metrics import MetricsWriter, base_columns  # noqa: E402


def _rows(sharpness, edge=4.0):
    return [
        {"step": 10.0 * i, "sharpness": s, "sam_edge": edge, "sharpness_over_edge": s / edge}
        for i, s in enumerate(sharpness)
    ]


def test_clip_keeps_everything_after_the_transient_in_view():
    rows = _rows([180.0, 30.0, 4.2, 3.0, 3.8, 4.1, 3.9])
    fig, ax = plt.subplots()
    ax.plot([r["step"] for r in rows], [r["sharpness"] for r in rows])
    ax.set_ylim(bottom=0)
    _clip_initial_transient(ax, rows, [[r["sharpness"] for r in rows], [r["sam_edge"] for r in rows]])
    assert math.isclose(ax.get_ylim()[1], 1.15 * 4.2)  # settles at row 2 (ratio 1.05); max after it 4.2
    assert any("off scale" in t.get_text() for t in ax.texts)
    plt.close(fig)


def test_no_clip_without_a_transient():
    rows = _rows([1.0, 2.0, 3.5, 4.0, 4.1])
    fig, ax = plt.subplots()
    ax.plot([r["step"] for r in rows], [r["sharpness"] for r in rows])
    before = ax.get_ylim()
    _clip_initial_transient(ax, rows, [[r["sharpness"] for r in rows]])
    assert ax.get_ylim() == before and not ax.texts
    plt.close(fig)


@pytest.mark.slow
def test_plot_run_draws_every_figure_with_evaluation_columns(tmp_path):
    cols = base_columns(test_each_measurement=True, eval_batch=True)
    with MetricsWriter(tmp_path / "metrics.csv", cols) as w:
        for i, s in enumerate([180.0, 30.0, 4.2, 3.0, 3.8]):
            row = {c: 0.5 for c in cols}
            row.update(
                step=10 * i,
                sharpness=s,
                sam_edge=4.0,
                sharpness_over_edge=s / 4.0,
                eval_sharpness=s * 0.9,
                eval_edge=4.1,
                eval_sharpness_over_edge=s * 0.9 / 4.1,
                gd_edge=20.0,
                train_loss=2.0 - 0.1 * i,
            )
            w.write(row)
    (tmp_path / "config.json").write_text(
        '{"config": {"task": "shakespeare", "optimizer": "sam", "eta": 0.1, "rho": 0.3, "batch_size": 32}}'
    )
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{n}.{e}" for n in FIGURES for e in ("png", "pdf"))
    assert all(p.stat().st_size > 0 for p in written)
