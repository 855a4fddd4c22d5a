"""Sweeps through submitit (marker ``slurm``; skipped without the slurm extra) on submitit's local
executor, the code path of SLURM with the jobs as processes here: each run's metrics.csv equals
the serial executor's, also after a job was preempted (checkpointed and requeued) or killed and
the sweep called again; bad input is refused before anything is written or submitted."""

import csv
import importlib.util
import json
import math
import os
import signal
import time

import pytest

submitit = pytest.importorskip("submitit")

from helpers import rows_without_time as rows  # noqa: E402

from samedge.experiment.cli import main  # noqa: E402
from samedge.experiment.sweeps.executors import submitit_slurm  # noqa: E402
from samedge.experiment.sweeps.executors.submitit_slurm import JOBS_DIR, parse_slurm_time  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TINY = ["--steps", "120", "--measure-every", "10", "--n-train", "200", "--n-test", "100", "--width", "32"]
TINY += ["--depth", "2", "--no-progress"]
LOCAL = ["--executor", "submitit", "--submitit-cluster", "local"]


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "S"
    assert main(["sweep", "mnist", "--grid", "rho=0.05,0.1", *TINY, "--executor", "serial", "--out", str(out)]) == 0
    return out


def statuses(out):
    with open(out / "sweep.csv", newline="") as f:
        return {r["name"]: r["status"] for r in csv.DictReader(f)}


def submissions(out):
    return sorted(p.name for p in (out / JOBS_DIR).iterdir() if p.is_dir())


def wait_for(condition, what, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_local_jobs_give_the_serial_metrics_and_a_second_call_skips_them(serial, tmp_path, capsys):
    out = tmp_path / "L"
    args = ["sweep", "mnist", "--grid", "rho=0.05,0.1", *TINY, *LOCAL, "--out", str(out)]
    assert main(args) == 0
    for name in ("rho0.05", "rho0.1"):
        assert rows(out / name / "metrics.csv") == rows(serial / name / "metrics.csv"), name
    assert statuses(out) == {"rho0.05": "done", "rho0.1": "done"}
    jobs = json.loads((out / JOBS_DIR / "jobs.json").read_text())["jobs"]
    assert sorted(jobs) == ["rho0.05", "rho0.1"] and {j["cluster"] for j in jobs.values()} == {"local"}
    capsys.readouterr()
    assert main(args) == 0
    assert "2 already finished" in capsys.readouterr().out
    assert submissions(out) == ["1"]  # nothing submitted again


def test_debug_cluster_runs_the_jobs_in_this_process(serial, tmp_path):
    out = tmp_path / "D"
    args = ["sweep", "mnist", "--grid", "rho=0.05", *TINY, "--executor", "submitit", "--submitit-cluster", "debug"]
    assert main([*args, "--out", str(out)]) == 0
    assert rows(out / "rho0.05" / "metrics.csv") == rows(serial / "rho0.05" / "metrics.csv")


def test_preempted_and_killed_jobs_resume_to_the_serial_rows(serial, tmp_path, capsys):
    """--no-wait submits two jobs and returns.  One gets submitit's preemption signal: it
    checkpoints at the step it is at (checkpoint_every=0: no other checkpoint) and is requeued.
    The other is SIGKILLed after a checkpoint.  The same command again (waiting) attaches to the
    first, submits the second again, and both end with the rows of an uninterrupted run."""
    out = tmp_path / "P"
    args = ["sweep", "mnist", "--grid", "checkpoint_every=0,10", "--rho", "0.05", *TINY, *LOCAL, "--out", str(out)]
    assert main([*args, "--no-wait"]) == 0
    said = capsys.readouterr().out
    assert "2 runs left to their jobs" in said and "checkpoint_every0: local job" in said
    assert statuses(out) == {"checkpoint_every0": "submitted", "checkpoint_every10": "submitted"}
    preempted, killed = out / "checkpoint_every0", out / "checkpoint_every10"

    def measured(run, n):
        path = run / "metrics.csv"
        return path.exists() and len(path.read_text().splitlines()) > n

    wait_for(lambda: measured(preempted, 2), "the first run under way")
    usr = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
    os.kill(int((preempted / "run.lock").read_text()), usr)
    wait_for(lambda: (killed / "checkpoint.pt").exists(), "the second run's first checkpoint")
    job_id = json.loads((out / JOBS_DIR / "jobs.json").read_text())["jobs"][killed.name]["job_id"]
    os.kill(int(job_id), signal.SIGKILL)  # the job's controller, then its task
    os.kill(int((killed / "run.lock").read_text()), signal.SIGKILL)
    assert not (killed / "summary.json").exists()  # killed midway

    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"local job {job_id} of {killed.name} ended without a result" in err
    for run in (preempted, killed):
        assert rows(run / "metrics.csv") == rows(serial / "rho0.05" / "metrics.csv"), run.name
    assert statuses(out) == {preempted.name: "done", killed.name: "done"}
    summary = json.loads((preempted / "summary.json").read_text())
    assert 0 < summary["resumed_from_step"] < 120  # from the checkpoint the signal wrote
    logs = "".join(p.read_text() for p in (out / JOBS_DIR / "1").glob("*_log.out"))
    assert "Requeued job" in logs
    assert json.loads((killed / "summary.json").read_text())["resumed_from_step"] % 10 == 0
    assert len(list((out / JOBS_DIR / "2").glob("*_submitted.pkl"))) == 1  # the killed one only


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--grid", "rho=0.05,x"], "--grid rho: 'x' is not a valid float"),
        (["--grid", "nope=1"], "unknown setting 'nope'"),
        (["--submitit-cluster", "nope"], "invalid choice: 'nope'"),
        (["--slurm-param", "account"], "--slurm-param 'account': expected KEY=VALUE"),
        (["--slurm-param", "time=10"], "use --slurm-time"),
        (["--slurm-param", "array=0-3"], "submitit sets --array"),
        (["--slurm-param", "qos=a", "--slurm-param", "qos=b"], "--slurm-param qos is given twice"),
        (["--slurm-time", "0:30"], "under a minute"),
        (["--slurm-time", "soon"], "expected MINUTES"),
        (["--slurm-array-parallelism", "0"], "must be >= 1"),
        (["--slurm-cpus-per-task", "1", "--threads-per-run", "2"], "below --threads-per-run 2"),
        (["--submitit-cluster", "debug", "--no-wait"], "--no-wait needs jobs that run by themselves"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    base = ["sweep", "mnist", "--grid", "rho=0.05", *TINY, "--executor", "submitit", "--submitit-cluster", "local"]
    assert main([*base, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("samedge") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_flags_of_another_executor_are_refused(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["sweep", "mnist", "--grid", "rho=0.05", *TINY, "--no-wait", "--out", str(out)]) == 2
    assert "--no-wait is a flag of --executor submitit, not local" in capsys.readouterr().err
    assert not out.exists()


def test_without_submitit_or_slurm_the_executor_says_what_is_missing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bad"
    args = ["sweep", "mnist", "--grid", "rho=0.05", *TINY, "--executor", "submitit", "--out", str(out)]
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, srun or sacct
    assert main(args) == 2
    assert "--submitit-cluster slurm needs SLURM's sbatch, srun, sacct on PATH" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a))
    assert main(args) == 2
    assert 'pip install -c constraints.txt -e ".[slurm]"' in capsys.readouterr().err
    assert not out.exists()


def test_slurm_time_is_read_as_slurm_reads_it():
    assert parse_slurm_time("90") == 90
    assert parse_slurm_time("1:30") == 2  # minutes:seconds, rounded up
    assert parse_slurm_time("02:00:00") == 120
    assert parse_slurm_time("1-0") == 1440
    assert parse_slurm_time("1-02:30") == 1590
    assert parse_slurm_time("2-00:00:30") == 2881


FAKE = {  # SLURM's commands as this test drives them
    "sbatch": 'n=$(wc -l < "$D/sbatch.calls"); echo "$1" >> "$D/sbatch.calls"; echo "Submitted batch job $((4242 + n))"',
    "sacct": 'echo "JobID|State|NodeList"; cat "$D/sacct.out"',
    "squeue": 'cat "$D/squeue.out"',
    "srun": "exit 1",
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    d = tmp_path / "bin"
    d.mkdir()
    for name, body in FAKE.items():
        (d / name).write_text(f'#!/bin/sh\nD="{d}"\n{body}\n')
        (d / name).chmod(0o755)
    for name in ("sbatch.calls", "sacct.out", "squeue.out"):
        (d / name).write_text("")
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit.SlurmJob, "watcher", type(submitit.SlurmJob.watcher)(delay_s=600))
    monkeypatch.setattr(submitit_slurm, "RESULT_GRACE_S", 0.0)
    monkeypatch.setattr(submitit_slurm, "_SQUEUE", submitit_slurm._Squeue())  # nothing cached from another test
    return d


def test_slurm_gets_one_job_array_and_a_later_call_attaches_collects_or_resubmits(fake_slurm, tmp_path, capsys):
    """Without a cluster: fake sbatch, sacct and squeue.  The flags reach the sbatch script of one
    array; a call while the jobs are queued submits nothing; then a job that left a failure is
    reported with it, and one that ended without a result (cancelled) is submitted again."""
    out = tmp_path / "sw"
    args = ["sweep", "mnist", "--grid", "rho=0.05,0.1", *TINY, "--executor", "submitit", "--out", str(out)]
    args += ["--slurm-partition", "gpu", "--slurm-time", "4:00:00", "--slurm-param", "account=lab"]
    args += ["--slurm-array-parallelism", "1", "--slurm-gpus-per-node", "1", "--no-wait"]
    assert main(args) == 0
    assert "rho0.1: slurm job 4242_1" in capsys.readouterr().out
    script = (out / JOBS_DIR / "1" / "4242_submission.sh").read_text()
    for line in ("partition=gpu", "time=240", "account=lab", "array=0-1%1", "gpus-per-node=1", "cpus-per-task=1"):
        assert f"#SBATCH --{line}\n" in script, line
    assert "#SBATCH --signal=USR2@90" in script and "-m submitit.core._submit" in script
    assert statuses(out) == {"rho0.05": "submitted", "rho0.1": "submitted"}

    (fake_slurm / "sacct.out").write_text("4242_0|RUNNING|n1\n4242_1|PENDING|\n")
    assert main(args) == 0
    assert len((fake_slurm / "sbatch.calls").read_text().splitlines()) == 1  # attached, not submitted again

    from submitit.core.utils import cloudpickle_dump

    cloudpickle_dump(
        ("success", {"status": "failed", "reason": "bad data"}), out / JOBS_DIR / "1" / "4242_0_0_result.pkl"
    )
    (fake_slurm / "sacct.out").write_text("4242_0|COMPLETED|n1\n4242_1|CANCELLED|n2\n")
    assert main(args) == 2
    said = capsys.readouterr()
    assert "rho0.05: failed: bad data" in said.out and "rho0.1: slurm job 4243" in said.out
    assert "slurm job 4242_1 of rho0.1 ended without a result (CANCELLED)" in said.err
    assert submissions(out) == ["1", "2"] and (out / JOBS_DIR / "2" / "4243_submission.sh").exists()
    assert statuses(out) == {"rho0.05": "failed", "rho0.1": "submitted"}

    # a job sacct does not know (accounting off) is looked for with squeue, a while after its submission
    (fake_slurm / "sacct.out").write_text("")
    (fake_slurm / "squeue.out").write_text("4243\n")
    jobs_file = out / JOBS_DIR / "jobs.json"
    book = json.loads(jobs_file.read_text())
    book["jobs"]["rho0.1"]["submitted_at"] = time.time() - 3600
    jobs_file.write_text(json.dumps(book))
    assert main(args) == 0  # rho0.05's failure was reported: retried now
    assert len((fake_slurm / "sbatch.calls").read_text().splitlines()) == 3  # rho0.05 only: 4243 is in squeue
    (fake_slurm / "squeue.out").write_text("")
    submitit_slurm._SQUEUE.at = -math.inf  # asked again at once
    capsys.readouterr()
    assert main(args) == 0
    assert "slurm job 4243 of rho0.1 ended without a result (not in sacct or squeue)" in capsys.readouterr().err
    assert len((fake_slurm / "sbatch.calls").read_text().splitlines()) == 4  # 4244 (rho0.05) is recent: kept


def test_reproduce_with_no_wait_leaves_the_figures_to_the_next_call(fake_slurm, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", "mnist", "--executor", "submitit", "--no-wait", "--no-progress", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "10 runs left to their jobs" in said and "mnist: figures and report when its jobs have finished" in said
    assert not (out / "report.md").exists() and not (out / "compare").exists()
    assert "#SBATCH --array=0-9%10" in (out / JOBS_DIR / "1" / "4242_submission.sh").read_text()
