"""Trust, round two: what the environment can say (rank, world size, timeouts, a matplotlib
backend) and numbers that leave samedge, each a one-line answer or a correct run."""

import json
import subprocess
import sys

import pytest
from helpers import rows_without_time

from samedge.errors import ConfigError
from samedge.experiment.cli import main
from samedge.experiment.world import env_place

TINY = ["--n-train", "200", "--n-test", "100", "--steps", "10", "--measure-every", "5", "--width", "16", "--depth", "2"]
TINY += ["--no-progress", "--no-plots"]


def test_the_environment_decides_rank_and_world_size_in_one_place():
    assert env_place({}).world_size == 1 and env_place({}).is_writer
    # a stray RANK with one process (a shell inside a cluster job): still the only, writing process
    assert env_place({"RANK": "3"}).is_writer
    assert env_place({"WORLD_SIZE": "1", "RANK": "1"}).is_writer
    place = env_place({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "1", "SAMEDGE_DIST_TIMEOUT": "30"})
    assert (place.rank, place.world_size, place.local_rank, place.timeout_s, place.is_writer) == (2, 4, 1, 30.0, False)
    for env, words in [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({"WORLD_SIZE": "2"}, "RANK is not"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "outside [0, WORLD_SIZE=2)"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x' is not an integer"),
        ({"SAMEDGE_DIST_TIMEOUT": "abc"}, "positive number"),
        ({"SAMEDGE_DIST_TIMEOUT": "0"}, "positive number"),
        ({"SAMEDGE_DIST_TIMEOUT": "nan"}, "positive number"),
    ]:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace(")", r"\)")):
            env_place(env)


@pytest.mark.parametrize(
    "name,value",
    [("WORLD_SIZE", "abc"), ("WORLD_SIZE", "2"), ("SAMEDGE_DIST_TIMEOUT", "abc"), ("SAMEDGE_DIST_TIMEOUT", "0")],
)
def test_an_inconsistent_environment_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, name, value):
    monkeypatch.setenv(name, value)
    monkeypatch.delenv("RANK", raising=False)
    assert main(["run", "mnist", *TINY, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("samedge: error: ") and err.count("\n") == 1 and name in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_stray_rank_does_not_silence_a_single_process_run(tmp_path, monkeypatch, capsys):
    assert main(["run", "mnist", *TINY, "--out", str(tmp_path / "plain")]) == 0
    monkeypatch.setenv("RANK", "1")
    assert main(["run", "mnist", *TINY, "--out", str(tmp_path / "rank1")]) == 0
    out = capsys.readouterr().out
    assert "final train loss" in out  # the report is printed, not swallowed as a silent rank
    assert rows_without_time(tmp_path / "rank1" / "metrics.csv") == rows_without_time(
        tmp_path / "plain" / "metrics.csv"
    )
    assert (tmp_path / "rank1" / "summary.json").exists()
    # a bad setting under a stray RANK is said, not swallowed
    assert main(["run", "mnist", "--eta", "-1", *TINY, "--out", str(tmp_path / "bad")]) == 2
    assert "eta" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unknown_matplotlib_backend_does_not_stop_the_figures(tmp_path):
    code = "from samedge.experiment.analysis.figures import plt; print(plt.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], env={"MPLBACKEND": "nonsense", "PATH": ""}, capture_output=True)
    assert out.returncode == 0, out.stderr.decode()[-300:]
    assert out.stdout.decode().strip().lower() == "agg"


def test_edge_numbers_leave_finite_or_not_at_all(capsys):
    assert main(["edge", "--eta", "1e-320", "--json"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "not a finite number" in out.err and out.err.count("\n") == 1
    assert main(["edge", "--eta", "0.1", "--rho", "0.1", "--grad-norm", "1", "--json"]) == 0
    edges = json.loads(capsys.readouterr().out)
    assert edges == {"gd_edge": 20.0, "sam_edge": 10.0, "usam_edge": pytest.approx(4 / (0.1 * (1 + 3)))}


FLAT = ["flatness", "mnist", "--steps", "6", "--measure-every", "3", "--trace-probes", "4", "--n-train", "200"]
FLAT += ["--n-test", "100", "--width", "16", "--depth", "2", "--no-progress"]


@pytest.mark.slow
def test_flatness_keeps_a_users_files_continues_and_says_divergence(tmp_path, monkeypatch, capsys):
    # a user's file named like the check's own is not replaced, even with --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "flatness.json").write_text("mine\n")
    assert main([*FLAT, "--out", str(mine), "--overwrite"]) == 2
    assert (mine / "flatness.json").read_text() == "mine\n" and sorted(p.name for p in mine.iterdir()) == [
        "flatness.json"
    ]
    assert "not written by samedge" in capsys.readouterr().err

    # Ctrl-C in the SAM run: 130, and the same command continues to the result of an uninterrupted check
    import samedge.experiment.run.runner as runner

    out, ref = tmp_path / "f", tmp_path / "ref"
    assert main([*FLAT, "--out", str(ref)]) == 0
    real_run = runner.run

    def interrupted(cfg, path, **kw):
        if cfg.optimizer == "sam":

            def stop(step):
                if step == 3:
                    raise KeyboardInterrupt

            kw["on_step"] = stop
        return real_run(cfg, path, **kw)

    monkeypatch.setattr(runner, "run", interrupted)
    assert main([*FLAT, "--out", str(out)]) == 130
    monkeypatch.setattr(runner, "run", real_run)
    capsys.readouterr()
    assert main([*FLAT, "--out", str(out)]) == 0
    for name in ("gd", "sam"):
        assert rows_without_time(out / name / "metrics.csv") == rows_without_time(ref / name / "metrics.csv")
    report = json.loads((out / "flatness.json").read_text())["report"]
    assert report == json.loads((ref / "flatness.json").read_text())["report"]
    # another setting over an existing check: refused, naming it
    assert main([*FLAT, "--eta", "0.05", "--out", str(out)]) == 2
    assert "eta" in capsys.readouterr().err

    # a divergence is exit 3, as in samedge run
    assert main([*FLAT, "--eta", "50", "--out", str(tmp_path / "div")]) == 3
    assert "diverged" in capsys.readouterr().err


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("measure") / "m"
    args = ["run", "mnist", *TINY[:4], "--steps", "30", "--measure-every", "5", "--checkpoint-every", "20"]
    assert main([*args, "--width", "16", "--depth", "2", "--no-progress", "--no-plots", "--out", str(out)]) == 0
    return out


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.slow
def test_measure_is_a_reader_that_says_which_step_it_used(measured_run, tmp_path, capsys):
    import fcntl
    import os
    import shutil

    run = tmp_path / "m"
    shutil.copytree(measured_run, run)
    assert main(["measure", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 30
    blob = bytearray((run / "checkpoint.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (run / "checkpoint.pt").write_bytes(bytes(blob))
    before = _snapshot(run)
    assert main(["measure", str(run), "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["step"] == 20 and "checkpoint.prev.pt (step 20)" in result["note"] and "step 20" in out.err
    assert _snapshot(run) == before  # nothing renamed, nothing written
    # a run another process is writing is refused, naming it
    fd = os.open(run / "run.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert main(["measure", str(run)]) == 2
        assert "in use by another samedge process" in capsys.readouterr().err
    finally:
        os.close(fd)
    for flags, words in (
        (["--eig-k", "100000"], "below the number of parameters"),
        (["--eig-k", "5", "--eig-max-iter", "2"], "below --eig-k"),
    ):
        assert main(["measure", str(run), *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
    assert _snapshot(run) == before


def test_library_errors_say_what_is_wrong():
    import torch

    import samedge

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    x_nan = x.clone()
    x_nan[0, 0] = float("nan")
    mse = torch.nn.MSELoss()
    cases = [
        (lambda: samedge.SharpnessTracker(model, mse, (x_nan, y)).measure(eta=0.1, rho=0.05), ValueError, "not finite"),
        (lambda: samedge.SharpnessTracker(model, mse, (x, y), tol=float("nan")), ValueError, "tol must be a finite"),
        (lambda: samedge.SharpnessTracker(model, mse, (x, y), max_iter=0), ValueError, "max_iter must be >= 1"),
        (lambda: samedge.SAM(model.parameters(), lr=0.1, rho="0.05"), ValueError, "rho must be a number"),
        (lambda: samedge.SAM(model.parameters(), lr=float("inf")), ValueError, "lr must be a finite"),
        (lambda: samedge.SharpnessTracker("model", mse, (x, y)), TypeError, "torch.nn.Module"),
        (
            lambda: samedge.SharpnessTracker(model, lambda o, t: 1.0, (x, y)).measure(eta=0.1),
            TypeError,
            "scalar tensor",
        ),
        (lambda: samedge.SharpnessTracker(model, mse, (x, y)).measure(eta=1e-320), ValueError, "not a finite number"),
        (lambda: samedge.Method("gd", 1e-320), ValueError, "not a finite number"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=words):
            call()


def test_an_interrupted_overwrite_leaves_nothing_the_next_call_keeps(tmp_path):
    from samedge.experiment.store.create import create_run_dir

    run = tmp_path / "r"
    run.mkdir()
    (tmp_path / ".r.old-4242").mkdir()  # an overwrite killed after moving the old run aside
    (tmp_path / ".r.old-4242" / "metrics.csv").write_text("old\n")
    (tmp_path / ".r.new-abc").mkdir()  # ... or while staging the new one
    create_run_dir(run).release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_download_offline_is_an_environment_error_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    import samedge.data.mnist as mnist

    monkeypatch.setattr(mnist, "MNIST_MIRRORS", ((tmp_path / "nowhere").as_uri(),))
    monkeypatch.setattr(mnist.download_mnist, "__defaults__", (mnist.MNIST_MIRRORS,))
    assert main(["download", "mnist", "--dir", str(tmp_path / "data" / "mnist")]) == 4
    err = capsys.readouterr().err
    assert err.startswith("samedge: error: could not download") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []
