"""Sweeps on Ray (marker ``ray``; skipped without the ray extra): one local cluster of 2 CPUs for
the module; each run's metrics.csv equals the serial executor's; bad input is recorded, not
retried."""

import csv

import pytest

ray = pytest.importorskip("ray")

from helpers import rows_without_time as rows  # noqa: E402

from samedge.experiment.cli import main  # noqa: E402
from samedge.experiment.sweeps.driver import run_sweep  # noqa: E402
from samedge.experiment.sweeps.executors.ray import RAY_MAX_RETRIES  # noqa: E402
from samedge.experiment.sweeps.spec import SweepSpec, prepare_sweep_dir  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = ["--steps", "20", "--measure-every", "5", "--n-train", "100", "--n-test", "50", "--width", "16", "--depth", "2"]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_runs_give_the_serial_metrics(tmp_path):
    args = ["sweep", "mnist", "--grid", "rho=0.05,0.2", "--grid", "seed=0,1", *TINY, "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "S")]) == 0
    assert main([*args, "--executor", "ray", "--out", str(tmp_path / "R")]) == 0  # uses the module's cluster
    names = sorted(p.parent.name for p in (tmp_path / "S").glob("*/metrics.csv"))
    assert len(names) == 4
    for name in names:
        assert rows(tmp_path / "R" / name / "metrics.csv") == rows(tmp_path / "S" / name / "metrics.csv"), name
    with open(tmp_path / "R" / "sweep.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["done"] * 4
    assert ray.is_initialized()  # the sweep left the cluster it did not start running


def test_bad_input_on_ray_is_recorded_and_not_retried(tmp_path):
    spec = SweepSpec("mnist", {"steps": 4, "data": str(tmp_path / "missing")}, {"seed": [0]})
    out = tmp_path / "sw"
    points = prepare_sweep_dir(out, spec, spec.points())
    done = run_sweep(out, points, executor="ray", progress=False)
    assert done.statuses == {"seed0": "failed"}
    assert RAY_MAX_RETRIES > 0  # retries exist, for dead workers only (retry_exceptions=False)
    with open(out / "sweep.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "failed" and "missing" in row["reason"]
