"""Sweeps (the default local executor and the serial one): grid expansion and naming, skip and
resume (after a real SIGKILL, after Ctrl-C), failures recorded with status and reason, sweep.csv,
comparison figures and the reproduce report."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import rows_without_time as metrics_rows

from samedge.errors import ConfigError
from samedge.experiment.analysis import overlay as compare_mod
from samedge.experiment.analysis.report import check_claims, load_reproduce_spec, reproduce_names
from samedge.experiment.cli import main
from samedge.experiment.config import build_config
from samedge.experiment.run.runner import run
from samedge.experiment.sweeps.spec import SweepSpec, load_sweep_file, parse_grid_arg, point_name

TINY = ["--steps", "20", "--measure-every", "5", "--n-train", "100", "--n-test", "50", "--width", "16", "--depth", "2"]


def sweep_csv(out):
    with open(out / "sweep.csv", newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


# --- definitions ------------------------------------------------------------------------------


def test_grid_argument_is_typed_by_the_setting():
    assert parse_grid_arg("rho=0,0.05,0.1") == ("rho", [0.0, 0.05, 0.1])
    assert parse_grid_arg("seed=0,1") == ("seed", [0, 1])
    assert parse_grid_arg("optimizer=gd,sam") == ("optimizer", ["gd", "sam"])
    assert parse_grid_arg("measure-perturbed=true,false") == ("measure_perturbed", [True, False])
    assert parse_grid_arg("batch_size=none,32") == ("batch_size", [None, 32])
    for bad, what in [
        ("seed=0,x", "not a valid int"),
        ("rho", "expected NAME=V1,V2"),
        ("etta=1", "unknown setting 'etta'"),
        ("task=mnist", "cannot be varied"),
        ("seed=1,1", "repeats"),
    ]:
        with pytest.raises(ConfigError, match=what):
            parse_grid_arg(bad)


def test_grid_is_the_cartesian_product_with_names_from_varied_settings():
    spec = SweepSpec("mnist", {"steps": 7}, {"rho": [0.05, 0.1], "seed": [0, 1, 2]}, [{"optimizer": "gd", "eta": 0.8}])
    points = spec.points()
    assert [p.name for p in points] == [
        "rho0.05-seed0",
        "rho0.05-seed1",
        "rho0.05-seed2",
        "rho0.1-seed0",
        "rho0.1-seed1",
        "rho0.1-seed2",
        "optimizer-gd-eta0.8",
    ]
    for p in points[:6]:
        assert p.config is not None
        assert (p.config.rho, p.config.seed, p.config.steps) == (p.varied["rho"], p.varied["seed"], 7)
        assert p.config.optimizer == "sam" and p.config.eta == 0.1  # the task preset's
    gd = points[6].config
    assert gd is not None and (gd.optimizer, gd.eta, gd.rho) == ("gd", 0.8, 0.0)
    assert point_name({"data": "a/b c"}) == "data-a_b_c"
    assert spec.varied_names() == ["rho", "seed", "optimizer", "eta"]


def test_refused_settings_become_failed_points_and_clashing_names_are_refused():
    points = SweepSpec("mnist", {"rho": 0.1}, {"optimizer": ["gd", "sam"]}).points()
    assert points[0].config is None and "rho" in points[0].error
    assert points[1].config is not None
    with pytest.raises(ConfigError, match="both named"):
        SweepSpec("mnist", {}, {}, [{"seed": 1}, {"seed": 1}]).points()
    with pytest.raises(ConfigError, match="unknown task"):
        SweepSpec("imagenet")


def test_a_flag_of_another_executor_is_refused(tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", "mnist", "--grid", "seed=0", *TINY, "--cpus", "2", "--out", str(out)]) == 2
    assert "--cpus is a flag of --executor ray, not local" in capsys.readouterr().err
    assert not out.exists()


def test_sweep_file(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(
        'task = "mnist"\n[base]\nsteps = 5\n[grid]\nrho = [0.05, 0.2]\n[[runs]]\noptimizer = "gd"\neta = 0.8\n'
    )
    spec = load_sweep_file(f)
    assert [p.name for p in spec.points()] == ["rho0.05", "rho0.2", "optimizer-gd-eta0.8"]
    f.write_text('task = "mnist"\n[grid]\nrho = 0.1\n')
    with pytest.raises(ConfigError, match="non-empty list"):
        load_sweep_file(f)
    f.write_text('task = "mnist"\nsteps = 5\n')
    with pytest.raises(ConfigError, match="unknown key 'steps'"):
        load_sweep_file(f)
    for name in reproduce_names():  # the shipped grids expand into valid runs with SAM and GD
        for paper in (False, True):
            pts = load_reproduce_spec(name, paper=paper).points()
            assert all(p.config is not None for p in pts)
            assert {p.config.optimizer for p in pts if p.config} == {"sam", "gd"}


# --- a real sweep (the default executor: two runs at a time) -----------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sw") / "sweep"
    args = ["sweep", "mnist", "--grid", "rho=0.05,0.2", "--grid", "seed=0,1", *TINY, "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    return out, args


@pytest.mark.slow
def test_sweep_runs_every_point_like_samedge_run(sweep):
    out, _ = sweep
    rows = sweep_csv(out)
    assert sorted(rows) == ["rho0.05-seed0", "rho0.05-seed1", "rho0.2-seed0", "rho0.2-seed1"]
    for name, row in rows.items():
        assert row["status"] == "done" and row["reason"] == ""
        summary = json.loads((out / name / "summary.json").read_text())
        assert float(row["final_sharpness"]) == summary["final_sharpness"]
        assert float(row["test_error"]) == summary["test_error"]
        assert int(row["total_hvps"]) == summary["total_hvps"]
        assert float(row["rho"]) == json.loads((out / name / "config.json").read_text())["config"]["rho"]
    # the same settings run alone (one torch thread, as the sweep's runs) give the same rows
    cfg = build_config("mnist", overrides={"steps": 20, "measure_every": 5, "n_train": 100, "n_test": 50})
    cfg = cfg.replace(width=16, depth=2, rho=0.2, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run(cfg, out.parent / "alone", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert metrics_rows(alone.run_dir / "metrics.csv") == metrics_rows(out / "rho0.2-seed1" / "metrics.csv")
    definition = json.loads((out / "sweep.json").read_text())
    assert definition["definitions"][0]["grid"] == {"rho": [0.05, 0.2], "seed": [0, 1]}


@pytest.mark.slow
def test_second_call_skips_finished_runs(sweep, capsys):
    out, args = sweep
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.csv")}
    t = time.perf_counter()
    assert main([*args, "--no-progress"]) == 0
    assert time.perf_counter() - t < 2.0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.csv")} == before
    assert "4 already finished" in capsys.readouterr().out


@pytest.mark.slow
def test_other_definition_is_refused_and_new_points_are_added(sweep, capsys):
    out, args = sweep
    saved = (out / "sweep.json").read_text()
    changed = [a if a != "20" else "21" for a in args]  # --steps 21
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "already holds run 'rho0.05-seed0' with steps = 20, but this sweep gives 21" in err
    assert (out / "sweep.json").read_text() == saved
    other = out.parent / "other"
    other.mkdir()
    (other / "x.txt").write_text("keep")
    assert main([*args[:-1], str(other)]) == 2
    assert "not a sweep directory" in capsys.readouterr().err and (other / "x.txt").exists()


@pytest.mark.slow
def test_failures_and_divergence_are_recorded_and_the_others_go_on(tmp_path, capsys):
    out = tmp_path / "sw"
    code = main(
        ["sweep", "mnist", "--grid", "optimizer=gd,sam", "--grid", "eta=0.1,500", "--rho", "0.1", *TINY]
        + ["--out", str(out), "--no-progress"]
    )
    assert code == 2  # some runs failed on bad input
    rows = sweep_csv(out)
    for eta in ("0.1", "500"):
        gd = rows[f"optimizer-gd-eta{eta}"]
        assert gd["status"] == "failed" and "'rho' must be 0" in gd["reason"]
        assert not (out / f"optimizer-gd-eta{eta}").exists()
    assert rows["optimizer-sam-eta0.1"]["status"] == "done"
    diverged = rows["optimizer-sam-eta500"]
    assert diverged["status"] == "diverged" and "non-finite" in diverged["reason"]
    assert json.loads((out / "optimizer-sam-eta500" / "summary.json").read_text())["diverged"] is True
    assert "optimizer-gd-eta0.1: failed" in capsys.readouterr().out
    # a second call: the diverged run is not retried, the failed ones fail again with the same reason
    mtime = (out / "optimizer-sam-eta500" / "metrics.csv").stat().st_mtime_ns
    assert (
        main(
            ["sweep", "mnist", "--grid", "optimizer=gd,sam", "--grid", "eta=0.1,500", "--rho", "0.1", *TINY]
            + ["--out", str(out), "--no-progress"]
        )
        == 2
    )
    assert (out / "optimizer-sam-eta500" / "metrics.csv").stat().st_mtime_ns == mtime
    assert sweep_csv(out)["optimizer-gd-eta500"]["status"] == "failed"


@pytest.mark.slow
def test_bad_data_is_a_failed_run(tmp_path):
    out = tmp_path / "sw"
    assert (
        main(["sweep", "mnist", "--grid", "seed=0,1", "--data", str(tmp_path / "nope"), *TINY, "--out", str(out)]) == 2
    )
    rows = sweep_csv(out)
    assert [r["status"] for r in rows.values()] == ["failed", "failed"]
    assert all("nope" in r["reason"] for r in rows.values())


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_metrics(tmp_path, sweep):
    """SIGKILL of a serial sweep's process once one run has finished and the next one is under way
    (after a checkpoint); started again it finishes with the uninterrupted sweep's rows."""
    ref, args = sweep
    out = tmp_path / "killed"
    grid_args = [a for a in args[1:] if a not in ("--out", str(ref))]
    # one run after another in the sweep's process, which dies with it (the local executor's
    # workers checkpoint instead: test_local_workers_checkpoint_and_end_with_the_sweep)
    cmd = [sys.executable, "-m", "samedge", "sweep", *grid_args, "--checkpoint-every", "5", "--executor", "serial"]
    cmd += ["--out", str(out)]
    ref_cmd_args = [*args[:-1], str(tmp_path / "ref"), "--checkpoint-every", "5", "--no-progress"]
    assert main(ref_cmd_args) == 0  # checkpoint_every is part of the run's settings: a reference with it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    second = out / "rho0.05-seed1"
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "rho0.05-seed0" / "summary.json").exists() and (second / "checkpoint.pt").exists():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (second / "checkpoint.pt").exists() and not (second / "summary.json").exists()
    assert main(["sweep", *grid_args, "--checkpoint-every", "5", "--out", str(out), "--no-progress"]) == 0
    for name in sweep_csv(tmp_path / "ref"):
        assert metrics_rows(out / name / "metrics.csv") == metrics_rows(tmp_path / "ref" / name / "metrics.csv"), name
    assert {r["status"] for r in sweep_csv(out).values()} == {"done"}


def _children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _gone(pids, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _proc_state(p)]:
            return True
        time.sleep(0.1)
    return False


def _proc_state(pid):
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL])
def test_local_workers_checkpoint_and_end_with_the_sweep(tmp_path, sweep, stop):
    """The default executor runs two points at once in worker processes.  Ctrl-C (SIGINT) to the
    sweep: exit 130 after each running point checkpointed; SIGKILL: the workers, told by the
    kernel, checkpoint and end rather than run on alone.  Either way no worker is left, and the
    same command finishes with the uninterrupted sweep's rows."""
    ref, args = sweep
    out = tmp_path / "stopped"
    # runs long enough (a few seconds) to be stopped while the first two are under way
    grid_args = [a for a in args[1:] if a not in ("--out", str(ref))] + ["--steps", "300", "--checkpoint-every", "5"]
    cmd = [sys.executable, "-m", "samedge", "sweep", *grid_args, "--jobs", "2"]
    assert main(["sweep", *grid_args, "--out", str(tmp_path / "ref"), "--no-progress"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    first, second = out / "rho0.05-seed0", out / "rho0.05-seed1"
    deadline = time.time() + 120
    while time.time() < deadline and not ((first / "checkpoint.pt").exists() and (second / "checkpoint.pt").exists()):
        time.sleep(0.01)
    workers = _children(proc.pid)
    assert len(workers) >= 2, "two points run at once in worker processes"
    proc.send_signal(stop)
    code = proc.wait(120)
    assert code == (130 if stop == signal.SIGINT else -signal.SIGKILL)
    assert _gone(workers), "a worker outlived the sweep"
    assert not (out / "rho0.2-seed1" / "summary.json").exists(), "stopped before the end"
    assert main(["sweep", *grid_args, "--out", str(out), "--no-progress"]) == 0
    for name in sweep_csv(tmp_path / "ref"):
        assert metrics_rows(out / name / "metrics.csv") == metrics_rows(tmp_path / "ref" / name / "metrics.csv"), name


@pytest.mark.slow
def test_local_and_serial_executors_give_the_same_runs(tmp_path, sweep):
    ref, args = sweep  # run by the default executor, two at a time
    grid_args = [a for a in args[1:] if a not in ("--out", str(ref))]
    out = tmp_path / "serial"
    assert main(["sweep", *grid_args, "--executor", "serial", "--out", str(out), "--no-progress"]) == 0
    for name in sweep_csv(ref):
        assert metrics_rows(out / name / "metrics.csv") == metrics_rows(ref / name / "metrics.csv"), name


def test_jobs_is_checked_and_belongs_to_the_local_executor(tmp_path, capsys):
    assert main(["sweep", "mnist", "--grid", "seed=0", *TINY, "--jobs", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err
    args = ["sweep", "mnist", "--grid", "seed=0", *TINY, "--jobs", "2", "--executor", "serial"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    assert "--jobs is a flag of --executor local, not serial" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- comparison figures and the report ---------------------------------------------------------


@pytest.mark.slow
def test_compare_draws_one_line_per_run_and_edge(sweep, monkeypatch, tmp_path):
    out, _ = sweep
    drawn = {}
    save = compare_mod._save

    def spy(fig, path):
        drawn[path.name] = [(len(ax.lines), len(ax.containers)) for ax in fig.axes]
        return save(fig, path)

    monkeypatch.setattr(compare_mod, "_save", spy)
    paths = compare_mod.overlay_runs([out], tmp_path / "figs")
    assert {p.name for p in paths} == {"compare_sharpness.png", "compare_ratio.png", "compare_vs_rho.png"}
    assert all(p.stat().st_size > 0 for p in paths)
    # 4 sharpness curves, 4 SAM-edges (dashed), one 2/eta (all eta = 0.1)
    assert drawn["compare_sharpness.png"] == [(4 + 4 + 1, 0)]
    assert drawn["compare_ratio.png"] == [(4 + 1, 0)]  # 4 ratios and the line at 1
    # against rho: one error-bar series (median over the 2 seeds) per panel; the ratio panel has a line at 1
    assert [c for _, c in drawn["compare_vs_rho.png"]] == [1, 1, 1]
    # run directories given one by one: the varied settings are found from their configs
    runs, varied, sweep_dir = compare_mod.load_runs([out / "rho0.05-seed0", out / "rho0.2-seed1"])
    assert sweep_dir is None and varied == ["rho", "seed"]
    assert main(["compare", str(out / "rho0.05-seed0"), str(out / "rho0.2-seed0"), "--out", str(tmp_path / "two")]) == 0
    assert (tmp_path / "two" / "compare_vs_rho.png").exists()
    assert main(["compare", str(tmp_path / "nothing")]) == 2


def _fake_run(name, optimizer, eta, rho, sharp, edge, grad_norm, seed=0, loss=None, trace=None, test_error=0.2):
    from samedge.experiment.analysis.overlay import ComparedRun
    from samedge.experiment.config import build_config
    from samedge.experiment.store.metrics import summarize

    n = len(sharp)
    loss = loss or [1.0] * n
    rows = [
        {
            "step": float(10 * i),
            "sharpness": s,
            "sam_edge": e,
            "grad_norm": g,
            "sharpness_over_edge": s / e,
            "train_loss": loss[i],
            "train_accuracy": 0.5,
            "trace": None if trace is None else trace[i],
            "hvps": 1.0,
            "eig_converged": 1.0,
        }
        for i, (s, e, g) in enumerate(zip(sharp, edge, grad_norm))
    ]
    cfg = build_config("mnist", overrides={"optimizer": optimizer, "eta": eta, "rho": rho, "seed": seed})
    return ComparedRun(name, Path(name), cfg, rows, {**summarize(rows), "test_error": test_error})


def test_claims_are_checked_against_the_numbers():
    edge = [4.0, 3.0, 2.5, 2.2, 2.0, 1.9]
    loss = [1.0, 0.6, 0.4, 0.25, 0.15, 0.1]
    gd = _fake_run(
        "gd",
        "gd",
        0.1,
        0.0,
        [10, 19, 20.5, 19.8, 20.1, 20.0],
        [20.0] * 6,
        [1] * 6,
        loss=loss,
        trace=[100, 150, 160, 170, 170, 170],
        test_error=0.20,
    )
    sam = _fake_run(
        "rho0.1",
        "sam",
        0.1,
        0.1,
        [10, 2.9, 2.5, 2.2, 2.05, 1.85],
        edge,
        [1, 1, 1, 1, 1, 1],
        loss=loss,
        trace=[100, 60, 50, 45, 40, 40],
        test_error=0.15,
    )
    sharper = [x / 2 for x in edge]
    sam2 = _fake_run(
        "rho0.2",
        "sam",
        0.1,
        0.2,
        [10, 1.45, 1.25, 1.1, 1.0, 0.93],
        sharper,
        [1] * 6,
        loss=loss,
        trace=[100, 50, 40, 35, 30, 30],
        test_error=0.16,
    )
    claims = {c.key: c for c in check_claims([sam, sam2, gd])}
    assert {k: c.verdict for k, c in claims.items()} == {
        "tracks": "yes",
        "edge_moves": "yes",
        "gd_hovers": "yes",
        "rho_lower": "yes",
        "flatter_early": "yes",
        "test": "yes",
    }
    assert "2 of 2 SAM runs track" in claims["tracks"].evidence
    # at equal training loss SAM's sharpness is a small fraction of GD's, parting at the second reading (step 10)
    assert "step 10" in claims["flatter_early"].evidence
    assert "SAM minus GD -0.045 (-0.05 to -0.04, n=2)" in claims["test"].evidence
    # a SAM run that never reaches its edge and a GD run below 2/eta: the claims fail or are not tested, with numbers
    flat = _fake_run("flat", "sam", 0.1, 0.1, [1.0] * 6, edge, [1] * 6, test_error=0.3)
    low = _fake_run("low", "gd", 0.1, 0.0, [1.0] * 6, [20.0] * 6, [1] * 6, test_error=0.2)
    claims = {c.key: c for c in check_claims([flat, low])}
    assert {k: c.verdict for k, c in claims.items()} == {
        "tracks": "no",
        "edge_moves": "not tested",
        "gd_hovers": "not tested",
        "rho_lower": "not tested",
        "flatter_early": "not tested",
        "test": "no",
    }
    assert "low 1 of 20" in claims["gd_hovers"].evidence
    assert "0 of 1 SAM runs" in claims["tracks"].evidence and "SAM minus GD +0.1" in claims["test"].evidence


@pytest.mark.slow
def test_report_writes_markdown_and_self_contained_html(sweep, tmp_path):
    from samedge.experiment.analysis.report import write_report

    out, _ = sweep
    compare_mod.overlay_runs([out])
    md, page = write_report(out)
    text = md.read_text()
    assert "| run |" in text and "rho0.2-seed1" in text and "SAM-edge" in text
    html = page.read_text()
    figures = len(list((out / "compare").glob("*.png")))
    assert figures >= 3 and html.count("data:image/png;base64,") == figures and "src='compare/" not in html


@pytest.mark.slow
def test_line_progress_off_a_terminal(tmp_path, capsys):
    cfg = build_config("mnist", overrides={"steps": 4, "measure_every": 2, "n_train": 50, "n_test": 20})
    run(cfg.replace(width=8, depth=2), tmp_path / "r", progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [ln.split(":")[0] for ln in err.splitlines()] == ["step 0/4", "step 2/4", "step 4/4"]


@pytest.mark.slow
def test_the_paper_report_has_a_cell_for_every_claim_and_task(tmp_path, capsys):
    from samedge.experiment.analysis.claims import CLAIM_NAMES

    out = tmp_path / "rep"
    # GD and SAM at two rho from the same two initializations, with the trace: every claim is testable
    sweep_file = tmp_path / "mnist.toml"
    sweep_file.write_text(
        'task = "mnist"\n[base]\nsteps = 12\nmeasure_every = 3\ntrace_every = 6\ntrace_probes = 4\nn_train = 100\n'
        "n_test = 50\nwidth = 16\ndepth = 2\n[grid]\nrho = [0.05, 0.1]\nseed = [0, 1]\n"
        '[[runs]]\noptimizer = "gd"\nseed = 0\n[[runs]]\noptimizer = "gd"\nseed = 1\n'
    )
    assert main(["sweep", str(sweep_file), "--out", str(out / "mnist"), "--no-progress"]) == 0
    capsys.readouterr()
    # the report is drawn from the run directories alone; tasks without runs are named, not invented
    assert main(["reproduce", "all", "--report-only", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    # one report, every task's section in it
    assert sorted(str(p.relative_to(out)) for p in out.rglob("report.*")) == ["report.html", "report.md"]
    table = md[md.index("## Claims x tasks") : md.index("## mnist")]
    for text in CLAIM_NAMES.values():
        row = next(line for line in table.splitlines() if line.startswith(f"| {text} |"))
        assert row.count("**yes**") + row.count("**no**") + row.count("**not tested**") == 1
    assert "no runs yet: cifar10, shakespeare" in md and "flatness.png" in md
    html = (out / "report.html").read_text()
    assert "src='compare/" not in html and 'src="http' not in html and html.count("data:image/png;base64,") >= 4
    before = md
    assert main(["reproduce", "all", "--report-only", "--out", str(out)]) == 0
    assert (out / "report.md").read_text() == before  # redrawn, the same numbers
