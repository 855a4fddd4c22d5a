"""Sweeps keep the run directory's promises (issue 29, sweep and settings side): one status source
per point, refreshed on every pass; many processes on one sweep directory; a refused call writes
nothing; the thread count is a setting (recorded, fixed per sweep, and `samedge run --threads N`
reruns a sweep's point byte for byte); damaged run directories are not "done"; the exit codes of
`samedge run` inside a sweep."""

import csv
import errno
import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import rows_without_time as metrics_rows

from samedge.errors import ConfigError
from samedge.experiment.cli import main
from samedge.experiment.config import RunConfig, build_config
from samedge.experiment.store.lock import lock_holder
from samedge.experiment.sweeps.spec import SweepSpec, load_sweep_file, point_state, run_state, write_sweep_csv
from samedge.experiment.sweeps.sweepdir import SweepDir

TINY = ["--steps", "10", "--measure-every", "5", "--n-train", "60", "--n-test", "20", "--width", "8", "--depth", "2"]


@pytest.fixture(autouse=True)
def keep_threads():
    """A run with a ``threads`` setting sets the process's torch threads: restored for the next test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def sweep_csv(out):
    with open(out / "sweep.csv", newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def sweep(out, *extra):
    return main(
        ["sweep", "mnist", "--grid", "rho=0.05,0.1", *TINY, "--checkpoint-every", "5", *extra]
        + ["--out", str(out), "--no-progress"]
    )


@pytest.fixture
def done_sweep(tmp_path):
    out = tmp_path / "sw"
    assert sweep(out) == 0
    return out


def hold_lock(run_dir):
    """Hold ``run_dir``'s run lock as another process would (a separate open file: flock conflicts)."""
    import fcntl

    fd = os.open(run_dir / "run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


# --- 14: the thread count is a setting -----------------------------------------------------------


def test_threads_is_a_setting_applied_by_the_runner(tmp_path):
    from samedge.experiment.run.runner import run

    assert RunConfig().threads is None  # torch's default: what samedge run did before
    with pytest.raises(ConfigError, match="'threads' must be in \\[1, 4096\\]"):
        build_config("mnist", overrides={"threads": 0})
    cfg = build_config("mnist", overrides={"steps": 2, "measure_every": 2, "n_train": 30, "n_test": 10, "threads": 1})
    seen = []
    torch.set_num_threads(2)
    run(
        cfg.replace(width=8, depth=2),
        tmp_path / "r",
        progress=False,
        on_step=lambda t: seen.append(torch.get_num_threads()),
    )
    assert seen and set(seen) == {1}
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["threads"] == 1


def test_a_sweep_point_reruns_byte_for_byte_with_samedge_run_threads(tmp_path):
    out = tmp_path / "sw"
    assert main(["sweep", "mnist", "--grid", "seed=4", *TINY, "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "seed4" / "config.json").read_text())["config"]["threads"] == 1
    alone = tmp_path / "alone"
    assert (
        main(
            ["run", "mnist", "--seed", "4", "--threads", "1", *TINY, "--out", str(alone), "--no-progress", "--no-plots"]
        )
        == 0
    )
    assert metrics_rows(alone / "metrics.csv") == metrics_rows(out / "seed4" / "metrics.csv")
    saved = json.loads((alone / "config.json").read_text())["config"]
    assert saved == json.loads((out / "seed4" / "config.json").read_text())["config"]


def test_threads_per_run_is_each_points_setting_and_fixed_for_a_sweep(done_sweep, capsys):
    spec = SweepSpec("mnist", {}, {"rho": [0.1]})
    assert [p.config.threads for p in spec.points() if p.config] == [1]  # a sweep's default
    assert sweep(done_sweep, "--threads-per-run", "2") == 2
    err = capsys.readouterr().err
    assert "with threads = 1, but this sweep gives 2" in err and "--threads-per-run 1" in err
    assert sweep(done_sweep, "--threads-per-run", "1") == 0  # the same count: all finished
    assert sweep(done_sweep, "--threads", "2", "--threads-per-run", "3") == 2
    assert "disagree" in capsys.readouterr().err


# --- 3: one status source per point, refreshed on every pass ------------------------------------


def test_a_failed_point_finished_later_is_no_longer_failed(done_sweep, capsys):
    point = done_sweep / "rho0.1"
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "summary.json"):
        (point / name).unlink()
    (point / "notes.txt").write_text("mine")  # a foreign file: the point cannot be started over
    assert sweep(done_sweep) == 2
    row = sweep_csv(done_sweep)["rho0.1"]
    assert row["status"] == "failed" and "notes.txt" in row["reason"]
    assert "rho0.1: failed: " in capsys.readouterr().out
    assert SweepDir(done_sweep).read_status()["rho0.1"]["status"] == "failed"
    # finished by hand (the same settings the sweep recorded), then the sweep again
    (point / "notes.txt").unlink()
    settings = json.loads((point / "config.json").read_text())["config"]
    from samedge.experiment.config import from_mapping
    from samedge.experiment.run.runner import run

    run(from_mapping(settings), point, overwrite=True, progress=False)
    write_sweep_csv(done_sweep)  # any reader: the run directory outranks the stale record
    assert sweep_csv(done_sweep)["rho0.1"]["status"] == "done"
    assert sweep(done_sweep) == 0
    assert {r["status"] for r in sweep_csv(done_sweep).values()} == {"done"}
    assert "rho0.1" not in SweepDir(done_sweep).read_status()  # the record ended with the run


# --- 4: many processes on one sweep directory ----------------------------------------------------


def test_a_point_another_process_runs_is_waited_for_not_failed(done_sweep, capsys):
    point = done_sweep / "rho0.1"
    (point / "summary.json").unlink()  # unfinished: this sweep would resume it
    fd = hold_lock(point)
    assert lock_holder(point) is not None and run_state(point) == "running"
    write_sweep_csv(done_sweep)
    assert sweep_csv(done_sweep)["rho0.1"]["status"] == "running"
    threading.Timer(1.0, os.close, [fd]).start()  # the other process ends without finishing it
    assert sweep(done_sweep) == 0
    assert "rho0.1 is being run by another process" in capsys.readouterr().err
    assert lock_holder(point) is None
    assert {r["status"] for r in sweep_csv(done_sweep).values()} == {"done"}


@pytest.mark.slow
def test_two_sweeps_into_one_directory_at_once(tmp_path):
    out = tmp_path / "dual"
    cmd = [sys.executable, "-m", "samedge", "sweep", "mnist", "--grid", "rho=0.05,0.1", "--grid", "seed=0,1", *TINY]
    cmd += ["--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True) for _ in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert not any("Traceback" in log for log in logs)
    rows = sweep_csv(out)
    assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"done"}
    assert len(json.loads((out / "sweep.json").read_text())["points"]) == 4
    assert not list(out.glob("*.tmp"))


def test_the_sweep_lock_is_reentrant_and_kept_out_of_the_way(tmp_path):
    d = SweepDir(tmp_path)
    with d.locked(), d.locked():  # nested in one process: no deadlock
        d.record_status("a", {"status": "failed", "reason": "x"})
    assert d.read_status() == {"a": {"status": "failed", "reason": "x"}}
    d.record_status("a", None)
    assert d.read_status() == {} and d.is_empty() is False  # status.json is a sweep's file
    (tmp_path / "status.json").unlink()
    assert d.is_empty()  # only the lock: an empty sweep directory


def test_a_damaged_sweep_definition_is_refused_naming_it(tmp_path, capsys):
    out = tmp_path / "sw"
    out.mkdir()
    for text in ("garbage", "[1, 2]", '{"task": "mnist", "points": [{"name": "a"}]}'):
        (out / "sweep.json").write_text(text)
        assert main(["sweep", "mnist", "--grid", "rho=0.1", *TINY, "--out", str(out)]) == 2
        assert "sweep.json is not a readable sweep definition" in capsys.readouterr().err
        assert sorted(os.listdir(out)) == ["sweep.json"]


# --- 6: a refused call writes nothing ------------------------------------------------------------


def test_a_refused_sweep_call_writes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    bad = [
        ["sweep", "mnist", "--grid", "rho=0.1", *TINY, "--threads-per-run", "0"],
        ["sweep", "mnist", "--grid", "rho=-1", *TINY],  # no point can run
        ["sweep", "mnist", "--grid", "rho=abc", *TINY],
        ["sweep", "mnist", "--grid", "rho=0.1", "--config", str(tmp_path / "missing.toml"), *TINY],
        ["sweep", "mnist", "--grid", "rho=0.1", "--executor", "ray", "--cpus", "0", *TINY],
        ["reproduce", "mnist", "--threads-per-run", "0"],
    ]
    for args in bad:
        assert main([*args, "--out", str(out), "--no-progress"]) == 2, args
        assert not out.exists(), args
    assert "does not exist" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    for cmd in (["sweep", "mnist", "--grid", "rho=0.1", *TINY], ["reproduce", "mnist"]):
        assert main([*cmd, "--executor", "ray", "--out", str(out), "--no-progress"]) == 2
        assert not out.exists() and "needs Ray" in capsys.readouterr().err


def test_refused_points_are_reported_not_recorded(tmp_path, capsys):
    out = tmp_path / "sw"
    args = ["sweep", "mnist", "--grid", "optimizer=gd,sam", "--rho", "0.1", *TINY, "--no-progress"]
    assert main([*args, "--out", str(out)]) == 2  # gd with an explicit rho is refused; sam runs
    assert sweep_csv(out)["optimizer-gd"]["status"] == "failed"
    assert [p["name"] for p in json.loads((out / "sweep.json").read_text())["points"]] == ["optimizer-sam"]
    # the corrected command is accepted and does not carry the refused point
    fixed = ["sweep", "mnist", "--grid", "optimizer=sam", "--rho", "0.1", *TINY, "--no-progress", "--out", str(out)]
    assert main(fixed) == 0
    assert list(sweep_csv(out)) == ["optimizer-sam"]


# --- 7: damaged run directories are not "done" ---------------------------------------------------


def test_damaged_config_or_checkpoint_is_not_done(done_sweep, capsys):
    point = done_sweep / "rho0.1"
    assert run_state(point) == "done"
    ckpt = point / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit: torch may still load it; its digest does not match
    ckpt.write_bytes(bytes(data))
    assert run_state(point) == "resume"
    rows = metrics_rows(point / "metrics.csv")
    assert sweep(done_sweep) == 0  # resumed from checkpoint.prev.pt to the same rows
    assert metrics_rows(point / "metrics.csv") == rows and (point / "checkpoint.pt.corrupt").exists()
    assert run_state(point) == "done"
    saved = json.loads((point / "config.json").read_text())
    (point / "config.json").write_text("garbage")
    state = point_state(point)
    assert state.state == "damaged" and "config.json" in state.reason
    capsys.readouterr()
    assert sweep(done_sweep) == 2
    assert "rho0.1: failed: " in capsys.readouterr().out and "config.json" in sweep_csv(done_sweep)["rho0.1"]["reason"]
    saved["config"]["steps"] = 99  # a run directory holding other settings than its point's
    (point / "config.json").write_text(json.dumps(saved))
    settings = json.loads((done_sweep / "sweep.json").read_text())["points"][1]["settings"]
    assert "steps = 99" in point_state(point, settings).reason


# --- 8: the definition's own conflicts -----------------------------------------------------------


def test_sweep_file_with_a_setting_in_base_and_grid_is_refused(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('task = "mnist"\n[base]\nrho = 0.1\n[grid]\nrho = [0.05, 0.2]\n')
    with pytest.raises(ConfigError, match="'rho' is in both \\[base\\] and \\[grid\\]"):
        load_sweep_file(f)
    with pytest.raises(ConfigError, match="'seed' is both fixed"):
        SweepSpec("mnist", {"seed": 1}, {"seed": [0, 1]})
    f.write_text('task = "mnist"\n[base]\nrho = 0.1\n[grid]\nseed = [0, 1]\n')
    assert main(["sweep", str(f), "--grid", "rho=0.05", "--out", str(tmp_path / "o")]) == 2  # --grid over [base]
    assert not (tmp_path / "o").exists()


def test_a_deleted_config_file_of_an_existing_sweep_is_named(tmp_path, capsys):
    base = tmp_path / "base.toml"
    base.write_text("steps = 10\nmeasure_every = 5\nn_train = 60\nn_test = 20\nwidth = 8\ndepth = 2\n")
    out = tmp_path / "sw"
    args = ["sweep", "mnist", "--grid", "seed=0", "--config", str(base), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    base.unlink()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"config file {base} does not exist" in err and "already holds" not in err


# --- 9: the machine's refusals inside a sweep ----------------------------------------------------


def test_an_environment_error_in_a_point_is_exit_4_with_the_path(tmp_path, monkeypatch, capsys):
    import samedge.experiment.run.runner as runner

    real = runner.run

    def full_disk(cfg, run_dir, **kw):
        if Path(run_dir).name == "rho0.1":
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(run_dir) / "metrics.csv"))
        return real(cfg, run_dir, **kw)

    monkeypatch.setattr(runner, "run", full_disk)
    out = tmp_path / "sw"
    assert sweep(out, "--executor", "serial") == 4  # in this process, where the patch is
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    line = next(ln for ln in captured.out.splitlines() if "rho0.1" in ln and "failed" in ln)
    assert "No space left on device" in line and "metrics.csv" in line
    row = sweep_csv(out)["rho0.1"]
    assert row["status"] == "failed" and "No space left on device" in row["reason"]
    assert sweep_csv(out)["rho0.05"]["status"] == "done"  # the others go on
    monkeypatch.setattr(runner, "run", real)
    assert sweep(out) == 0  # the disk has room again: the point runs


# --- sweep directories of an earlier samedge ----------------------------------------------------


def test_a_sweep_written_before_threads_and_with_a_refused_point_goes_on(done_sweep):
    """Its records and runs lack ``threads`` (not a changed setting), and it recorded a point whose
    settings were refused (dropped: nothing to run)."""
    definition = json.loads((done_sweep / "sweep.json").read_text())
    for rec in definition["points"]:
        del rec["settings"]["threads"]
    definition["points"].append(
        {"name": "old", "varied": {"eta": -1}, "settings": {"varied": {"eta": -1}, "error": "x"}}
    )
    (done_sweep / "sweep.json").write_text(json.dumps(definition))
    for run_dir in (done_sweep / "rho0.05", done_sweep / "rho0.1"):
        saved = json.loads((run_dir / "config.json").read_text())
        del saved["config"]["threads"]
        (run_dir / "config.json").write_text(json.dumps(saved))
    assert sweep(done_sweep) == 0
    assert sorted(sweep_csv(done_sweep)) == ["rho0.05", "rho0.1"]
    assert {r["status"] for r in sweep_csv(done_sweep).values()} == {"done"}
    assert [p["settings"]["threads"] for p in json.loads((done_sweep / "sweep.json").read_text())["points"]] == [1, 1]
