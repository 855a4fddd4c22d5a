"""Runs over the adaptive bases resume bit for bit: the rule's moments and step count and the warm
solvers of the preconditioned and effective readings travel in the checkpoint."""

import signal
import subprocess
import sys
import time

import pytest
from helpers import rows_without_time
from test_resume import SMALL, run_interrupted

from samedge.experiment.cli import main

ADAM = ["run", "mnist", "--steps", "16", "--measure-every", "2", "--checkpoint-every", "3", "--base", "adam"]
ADAM += ["--optimizer", "gd", "--eta", "0.002", *SMALL]
SAM_ADAMW = ["run", "mnist", "--steps", "10", "--measure-every", "2", "--base", "adamw", "--weight-decay", "0.1"]
SAM_ADAMW += ["--optimizer", "sam", "--rho", "0.05", "--eta", "0.001", "--beta1", "0.8", *SMALL]


@pytest.mark.parametrize("args", [ADAM, SAM_ADAMW], ids=["adam", "sam-adamw"])
def test_interrupted_adaptive_runs_resume_to_identical_rows(tmp_path, args):
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main([*args, "--out", str(ref)]) == 0
    reference = rows_without_time(ref / "metrics.csv")
    assert reference[0]["preconditioned_sharpness"] == "nan"  # no preconditioner before the first step
    assert all(float(r["preconditioned_sharpness"]) > 0 for r in reference[1:])
    if "sam" in args:
        assert all(float(r["effective_sharpness"]) >= float(r["preconditioned_sharpness"]) for r in reference[1:])
        ratio = [float(r["effective_sharpness"]) / float(r["sam_edge"]) for r in reference[1:]]
    else:
        ratio = [float(r["preconditioned_sharpness"]) / float(r["sam_edge"]) for r in reference[1:]]
    assert ratio == pytest.approx([float(r["sharpness_over_edge"]) for r in reference[1:]], rel=1e-12)
    run_interrupted(args, out, 5)
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert rows_without_time(out / "metrics.csv") == reference


@pytest.mark.slow
def test_adam_resume_after_sigkill_gives_identical_rows(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main([*ADAM, "--out", str(ref)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "samedge", *ADAM, "--out", str(out)])
    deadline = time.time() + 600  # a loaded machine starts python slowly
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert (out / "checkpoint.pt").exists(), "no checkpoint was written in time"
    time.sleep(0.3)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert rows_without_time(out / "metrics.csv") == rows_without_time(ref / "metrics.csv")
