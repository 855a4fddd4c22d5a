"""layers.csv and the batch-sharpness columns in runs: contents, settings, and exact resume (after
Ctrl-C and after SIGKILL)."""

import collections
import csv
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import rows_without_time
from test_resume import SMALL, run_interrupted

from samedge.errors import ConfigError
from samedge.experiment.cli import main
from samedge.experiment.config import build_config
from samedge.experiment.store.metrics import base_columns

MINI = ["run", "mnist", "--steps", "12", "--measure-every", "2", "--checkpoint-every", "3", "--batch-size", "50"]
LAYERS = [*MINI, "--layer-sharpness-every", "4", "--batch-sharpness-batches", "3", *SMALL]


def _layers(path):
    return list(csv.DictReader(open(path)))


def test_default_run_writes_layers_csv_and_keeps_metrics_columns(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "mnist", "--steps", "4", "--measure-every", "2", *SMALL[:-1], "--out", str(out)]) == 0
    rows = _layers(out / "layers.csv")
    by = collections.defaultdict(float)
    for r in rows:
        by[r["step"]] += float(r["mass"])
        assert r["sharpness"] == "" and r["interlacing"] == ""
    assert sorted(by, key=int) == ["0", "2", "4"] and all(abs(v - 1) < 1e-9 for v in by.values())
    assert {r["block"] for r in rows} == {"net.1", "net.3", "net.5"}  # depth 3 (the Sequential looked through)
    shares = collections.defaultdict(float)
    for r in rows:
        shares[r["step"]] += float(r["rayleigh_share"])
    assert all(abs(v - 1) < 1e-9 for v in shares.values())
    header = next(csv.reader(open(out / "metrics.csv")))
    assert header == base_columns()  # full batch: no new metrics column
    assert (out / "layers.png").exists() and (out / "layers.pdf").exists()


def test_layer_groups_and_off(tmp_path):
    out = tmp_path / "g"
    args = ["run", "mnist", "--steps", "2", "--measure-every", "2", *SMALL, "--layer-groups", "first=net.1; last=net.5"]
    assert main([*args, "--out", str(out)]) == 0
    assert [r["block"] for r in _layers(out / "layers.csv")][:3] == ["first", "last", "other"]
    off = tmp_path / "off"
    assert main([*args[:-1], "off", "--out", str(off)]) == 0
    assert not (off / "layers.csv").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"layer_groups": "a="}, "layer_groups"),
        ({"layer_sharpness_every": 3, "measure_every": 2}, "multiple of measure_every"),
        ({"layer_sharpness_every": 2, "measure_every": 2, "layer_groups": "off"}, "needs blocks"),
        ({"batch_sharpness_batches": 4}, "needs 'batch_size'"),
    ],
)
def test_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config("mnist", overrides=overrides)


def test_batch_sharpness_default_by_batch_size():
    assert build_config("mnist").batch_sharpness_count == 0
    assert build_config("mnist", overrides={"batch_size": 64}).batch_sharpness_count == 8
    assert build_config("mnist", overrides={"batch_size": 64, "batch_sharpness_batches": 0}).batch_sharpness_count == 0


@pytest.fixture(scope="module")
def layers_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("layers_ref") / "run"
    assert main([*LAYERS, "--out", str(out)]) == 0
    return rows_without_time(out / "metrics.csv"), (out / "layers.csv").read_text()


def test_minibatch_run_records_block_eigenvalues_and_batch_sharpness(layers_reference):
    metrics, text = layers_reference
    assert all(float(r["batch_sharpness"]) > 0 and float(r["batch_sharpness_stderr"]) > 0 for r in metrics)
    assert all(int(r["batch_sharpness_hvps"]) == 6 for r in metrics)  # SAM: two HVPs per batch
    assert [bool(r["layer_hvps"]) for r in metrics] == [
        s in ("0", "4", "8", "12") for s in (r["step"] for r in metrics)
    ]
    rows = list(csv.DictReader(text.splitlines()))
    solved = [r for r in rows if r["sharpness"]]
    assert {r["step"] for r in solved} == {"0", "4", "8", "12"}
    assert all(r["interlacing"] == "1" and float(r["sharpness_over_top"]) <= 1 + 1e-3 for r in solved)


def test_layers_csv_resumes_identically_after_ctrl_c(tmp_path, layers_reference):
    out = tmp_path / "run"
    run_interrupted(LAYERS, out, 7)
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert rows_without_time(out / "metrics.csv") == layers_reference[0]
    assert (out / "layers.csv").read_text() == layers_reference[1]


@pytest.mark.slow
def test_layers_csv_resumes_identically_after_sigkill(tmp_path, layers_reference):
    out = tmp_path / "run"
    rng = random.Random(7)
    killed = False
    for attempt in range(3):
        cmd = (
            [*LAYERS, "--out", str(out)]
            if attempt == 0
            else ["run", "--resume", str(out), "--no-progress", "--no-plots"]
        )
        proc = subprocess.Popen([sys.executable, "-m", "samedge", *cmd])
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed = True
        proc.wait()
    assert killed, "the run finished before it could be killed"
    resume = ["run", "--resume", str(out), "--no-progress", "--no-plots"]
    assert subprocess.run([sys.executable, "-m", "samedge", *resume]).returncode == 0
    assert rows_without_time(out / "metrics.csv") == layers_reference[0]
    assert (out / "layers.csv").read_text() == layers_reference[1]


@pytest.mark.slow
def test_nproc_2_gives_the_same_block_eigenvalues_and_batch_sharpness(tmp_path, layers_reference):
    """Two processes (each minibatch and each probe batch split over the ranks) against one: the
    same readings, block eigenvalues and batch sharpness up to float32 summation order."""
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "samedge", *LAYERS, "--nproc", "2", "--out", str(out)]
    assert subprocess.run(cmd, env=env, timeout=600).returncode == 0
    one, two = layers_reference[0], rows_without_time(out / "metrics.csv")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for col in ("sharpness", "batch_sharpness", "batch_sharpness_stderr", "batch_step_sharpness", "train_loss"):
        for ra, rb in zip(one, two):
            assert float(rb[col]) == pytest.approx(float(ra[col]), rel=2e-3), (ra["step"], col)
    ref = list(csv.DictReader(layers_reference[1].splitlines()))
    got = _layers(out / "layers.csv")
    assert [(r["step"], r["block"]) for r in ref] == [(r["step"], r["block"]) for r in got]
    for ra, rb in zip(ref, got):
        assert float(rb["mass"]) == pytest.approx(float(ra["mass"]), abs=2e-3)
        if ra["sharpness"]:
            assert float(rb["sharpness"]) == pytest.approx(float(ra["sharpness"]), rel=2e-3)
            assert rb["interlacing"] == "1"
