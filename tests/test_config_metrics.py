"""Config validation, presets, metrics CSV and summary."""

import math

import numpy as np
import pytest

from samedge.experiment.config import ConfigError, RunConfig, build_config, preset_names
from samedge.experiment.store.metrics import MetricsWriter, base_columns, edge_reached_index, read_metrics, summarize


def test_defaults_and_presets():
    cfg = build_config("mnist")
    assert (cfg.optimizer, cfg.eta, cfg.rho, cfg.depth, cfg.width, cfg.n_train) == ("sam", 0.1, 0.1, 4, 256, 2000)
    assert {"mnist", "mnist-gd"} <= set(preset_names())
    gd = build_config("mnist", preset="mnist-gd")
    assert gd.optimizer == "gd" and gd.rho == 0.0
    assert build_config("mnist", overrides={"eta": 0.2, "seed": None}).eta == 0.2


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"eta": -1.0}, "'eta' must be > 0"),
        ({"eta": float("nan")}, "'eta' must be a finite number"),
        ({"rho": -0.5}, "'rho' must be >= 0"),
        ({"momentum": 1.0}, "'momentum' must be in [0, 1)"),
        ({"steps": -3}, "'steps' must be >= 0"),
        ({"steps": 2.5}, "'steps' must be an integer"),
        ({"steps": True}, "'steps' must be an integer"),
        ({"optimizer": "adam"}, "'optimizer' must be one of gd, sam, usam"),
        ({"loss": "hinge"}, "'loss' must be one of mse, xent"),
        ({"eig_method": "power", "eig_k": 2}, "'eig_k' must be 1"),
        ({"measure_perturbed": "yes"}, "true or false"),
        ({"dtype": "float16"}, "'dtype' must be one of"),
    ],
)
def test_bad_values_name_the_field(changes, needle):
    with pytest.raises(ConfigError) as err:
        RunConfig().replace(**changes)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_and_task():
    with pytest.raises(ConfigError, match="unknown config key 'etta'"):
        build_config("mnist", overrides={"etta": 0.1})
    with pytest.raises(ConfigError, match="unknown task 'imagenet'"):
        build_config("imagenet")
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("mnist", preset="nope")


def test_metrics_roundtrip_and_partial_last_line(tmp_path):
    cols = base_columns(eig_k=2)
    assert "lambda_2" in cols and cols[0] == "step" and cols[-1] == "elapsed_s"
    path = tmp_path / "metrics.csv"
    row = {c: 0.0 for c in cols}
    with MetricsWriter(path, cols) as w:
        for step in range(3):
            w.write({**row, "step": step, "sharpness": 0.1 * step + 1 / 3, "eig_converged": True})
    with open(path, "a") as f:
        f.write("3,0.5,0.")  # a row cut off by a crash
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[2]["sharpness"] == 0.2 + 1 / 3  # repr round-trips floats exactly
    with MetricsWriter(path, cols) as w:  # reopening appends, no second header
        pass
    assert path.read_text().count("step,") == 1


def test_summary_statistics():
    ratios = [0.3, 0.5, 0.95, 1.0, 1.1, 0.9, 1.05]
    rows = [
        {
            "step": float(10 * i),
            "sharpness_over_edge": q,
            "train_loss": 1.0 / (i + 1),
            "train_accuracy": 0.5,
            "sharpness": q,
            "sam_edge": 1.0,
            "hvps": 5.0,
            "eig_converged": 1.0,
        }
        for i, q in enumerate(ratios)
    ]
    s = summarize(rows)
    assert s["edge_reached_step"] == 20
    tail = sorted(ratios[2:])
    assert s["ratio_median"] == pytest.approx(tail[2])
    assert s["ratio_q25"] == pytest.approx(0.95) and s["ratio_q75"] == pytest.approx(1.05)
    assert s["total_hvps"] == 35 and s["all_eigensolves_converged"] is True
    never = summarize([{**r, "sharpness_over_edge": 0.1} for r in rows])
    assert never["edge_reached_step"] is None and never["ratio_median"] is None
    assert math.isclose(never["final_train_loss"], 1 / 7)


def _ratio_rows(ratios):
    return [
        {
            "step": float(10 * i),
            "sharpness_over_edge": q,
            "train_loss": 1.0,
            "train_accuracy": 0.5,
            "sharpness": q,
            "sam_edge": 1.0,
            "hvps": 1.0,
            "eig_converged": 1.0,
        }
        for i, q in enumerate(ratios)
    ]


def test_summary_skips_an_initial_transient_above_the_edge():
    # Starts 40x above the edge (the Transformer at init), collapses below, climbs back to track it.
    ratios = [40.0, 3.0, 1.05, 0.5, 0.7, 0.92, 1.0, 1.02, 0.98]
    s = summarize(_ratio_rows(ratios))
    assert s["started_above_edge"] is True
    assert edge_reached_index(ratios) == 2  # first ratio <= 1.2 from which one is >= 0.9
    assert s["edge_reached_step"] == 20
    assert s["ratio_median"] == pytest.approx(float(np.median(ratios[2:])))
    # Never back under 1.2: never reached.
    assert summarize(_ratio_rows([40.0, 5.0, 2.0]))["edge_reached_step"] is None
    # A start up to 1.2x the edge counts from the first row (CIFAR-10's GD starts at 1.11-1.20x).
    assert edge_reached_index([1.05, 0.8, 1.0]) == 0
    assert summarize(_ratio_rows([1.05, 0.8, 1.0]))["started_above_edge"] is False
    assert edge_reached_index([1.19, 0.99, 1.0]) == 0
    assert edge_reached_index([1.21, 1.3, 0.99, 1.0]) == 2
    assert edge_reached_index([None, float("nan"), 0.95]) == 2
