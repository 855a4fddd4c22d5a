"""End-to-end: the CLI on the embedded MNIST digits, run directories, bad input."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from independent import top_eigenvalue

from samedge.core.thresholds import sam_edge
from samedge.experiment.cli import main
from samedge.experiment.config import build_config
from samedge.experiment.tasks import build_task

SMALL = ["--n-train", "200", "--n-test", "100", "--width", "32", "--depth", "3", "--no-progress"]
REQUIRED_COLUMNS = [
    "step",
    "train_loss",
    "grad_norm",
    "sharpness",
    "gd_edge",
    "sam_edge",
    "sharpness_over_edge",
    "grad_alignment",
    "sam_grad_alignment",
    "hvps",
    "elapsed_s",
]


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_edge_command_matches_formula(capsys):
    code, out, _ = run_cli(["edge", "--eta", "0.1", "--rho", "0.05", "--grad-norm", "0.03", "--json"], capsys)
    assert code == 0
    values = json.loads(out)
    g = 0.03
    closed = (g / (2 * 0.05)) * (math.sqrt(1 + 8 * 0.05 / (0.1 * g)) - 1)
    assert values["sam_edge"] == pytest.approx(closed, rel=1e-12)
    assert values["gd_edge"] == pytest.approx(20.0, rel=1e-15)
    assert values["usam_edge"] == pytest.approx(4 / (0.1 * (1 + math.sqrt(1 + 8 * 0.05 / 0.1))), rel=1e-12)


@pytest.mark.slow
def test_short_run_writes_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        ["run", "mnist", "--steps", "20", "--measure-every", "5", "--out", str(out), *SMALL], capsys
    )
    assert code == 0, stdout
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["steps"] == 20 and config["config"]["width"] == 32
    assert config["config"]["optimizer"] == "sam" and config["config"]["eta"] == 0.1
    assert "torch" in config["versions"] and "embedded" in config["data_source"]
    rows = read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 5, 10, 15, 20]
    for col in REQUIRED_COLUMNS:
        assert col in rows[0]
    for r in rows:
        edge = sam_edge(0.1, 0.1, float(r["grad_norm"]))
        assert float(r["sam_edge"]) == pytest.approx(edge, rel=1e-12)
        assert float(r["gd_edge"]) == pytest.approx(20.0)
        assert float(r["sharpness_over_edge"]) == pytest.approx(float(r["sharpness"]) / edge, rel=1e-12)
        assert 0 <= float(r["grad_alignment"]) <= 1 and 0 <= float(r["sam_grad_alignment"]) <= 1
        assert r["eig_converged"] == "1" and float(r["eig_residual"]) <= 1e-3
    summary = json.loads((out / "summary.json").read_text())
    for key in ("ratio_median", "ratio_iqr", "edge_reached_step", "final_train_loss", "test_error", "diverged"):
        assert key in summary
    assert summary["diverged"] is False
    assert summary["final_train_loss"] == pytest.approx(float(rows[-1]["train_loss"]))
    for name in ("sharpness", "sharpness_vs_edge", "alignment", "loss", "grad_norm"):
        assert (out / f"{name}.png").stat().st_size > 1000
        assert (out / f"{name}.pdf").stat().st_size > 1000
    assert "run directory" in stdout


def test_sharpness_at_initialization_matches_independent_eigsh(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run_cli(
        ["run", "mnist", "--steps", "0", "--out", str(out), "--dtype", "float64", "--no-plots", *SMALL], capsys
    )
    assert code == 0
    recorded = float(read_csv(out / "metrics.csv")[0]["sharpness"])
    cfg = build_config("mnist", overrides=dict(n_train=200, n_test=100, width=32, depth=3, dtype="float64"))
    task = build_task(cfg)
    params = task.train.parameters()
    top = top_eigenvalue(lambda v: task.train.hvp(params, v), params)
    assert recorded == pytest.approx(top, rel=1e-4)


def test_same_seed_same_metrics(tmp_path, capsys):
    args = ["run", "mnist", "--steps", "12", "--measure-every", "4", "--no-plots", *SMALL]
    assert run_cli([*args, "--out", str(tmp_path / "a")], capsys)[0] == 0
    assert run_cli([*args, "--out", str(tmp_path / "b")], capsys)[0] == 0
    a, b = read_csv(tmp_path / "a" / "metrics.csv"), read_csv(tmp_path / "b" / "metrics.csv")
    for ra, rb in zip(a, b):
        ra.pop("elapsed_s"), rb.pop("elapsed_s")
        assert ra == rb
    assert len(a) == len(b) == 4
    assert run_cli([*args, "--out", str(tmp_path / "c"), "--seed", "1"], capsys)[0] == 0
    c = read_csv(tmp_path / "c" / "metrics.csv")
    assert c[0]["train_loss"] != a[0]["train_loss"]


def test_existing_run_directory_is_not_clobbered(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "mnist", "--steps", "2", "--measure-every", "1", "--no-plots", "--out", str(out), *SMALL]
    assert run_cli(args, capsys)[0] == 0
    before = (out / "metrics.csv").read_bytes()
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert err.count("\n") == 1
    assert (out / "metrics.csv").read_bytes() == before
    assert run_cli([*args, "--overwrite"], capsys)[0] == 0
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    code, _, err = run_cli(["run", "mnist", "--steps", "1", "--out", str(other), "--overwrite", *SMALL], capsys)
    assert code == 2 and "not a samedge run directory" in err
    assert (other / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--eta", "-1"], "eta"),
        (["--eta", "0"], "eta"),
        (["--rho", "-0.1"], "rho"),
        (["--optimizer", "adam"], "optimizer"),
        (["--momentum", "1.5"], "momentum"),
        (["--measure-every", "0"], "measure_every"),
        (["--optimizer", "gd", "--rho", "0.1"], "rho"),
        (["--eta", "abc"], "--eta"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--data", "/nonexistent/mnist-dir"], "/nonexistent/mnist-dir"),
        (["--n-train", "4900", "--n-test", "1000"], "5000"),
    ],
)
def test_bad_input_one_line_error_nothing_written(tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    code = main(["run", "mnist", "--steps", "1", "--out", str(out), *SMALL, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert err.strip().count("\n") == 0, err
    assert not out.exists()


def test_unknown_task(capsys):
    code, _, err = run_cli(["run", "imagenet"], capsys)
    assert code == 2 and "imagenet" in err


def test_config_file_and_errors(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'optimizer = "usam"\nrho = 0.5\nsteps = 3\nmeasure_every = 3\nn_train = 200\nn_test = 100\nwidth = 16\ndepth = 2\n'
    )
    out = tmp_path / "run"
    code, _, _ = run_cli(
        ["run", "mnist", "--config", str(cfg), "--eta", "0.05", "--out", str(out), "--no-plots", "--no-progress"],
        capsys,
    )
    assert code == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["optimizer"] == "usam" and saved["rho"] == 0.5 and saved["eta"] == 0.05 and saved["width"] == 16
    rows = read_csv(out / "metrics.csv")
    assert float(rows[0]["sam_edge"]) == pytest.approx(4 / (0.05 * (1 + math.sqrt(1 + 8 * 0.5 / 0.05))), rel=1e-12)

    bad = tmp_path / "bad.toml"
    bad.write_text("eta = = 1\n")
    code, _, err = run_cli(["run", "mnist", "--config", str(bad), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "not valid TOML" in err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("etta = 0.1\n")
    code, _, err = run_cli(["run", "mnist", "--config", str(unknown), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "etta" in err
    code, _, err = run_cli(
        ["run", "mnist", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "x")], capsys
    )
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_divergence_stops_and_is_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        [
            "run",
            "mnist",
            "--optimizer",
            "gd",
            "--eta",
            "500",
            "--steps",
            "50",
            "--measure-every",
            "1",
            "--out",
            str(out),
            *SMALL,
        ],
        capsys,
    )
    assert code == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] is True
    assert 0 < summary["diverged_step"] < 50
    assert summary["last_good_step"] == summary["diverged_step"] - 1
    import torch

    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == summary["last_good_step"]
    assert all(torch.isfinite(p).all() for p in saved["params"])
    assert "DIVERGED" in stdout
    rows = read_csv(out / "metrics.csv")
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)


@pytest.mark.slow
def test_gd_preset_and_plot_command(tmp_path, capsys):
    out = tmp_path / "gd"
    code, _, _ = run_cli(
        ["run", "mnist", "--preset", "mnist-gd", "--steps", "4", "--measure-every", "2", "--out", str(out), *SMALL],
        capsys,
    )
    assert code == 0
    rows = read_csv(out / "metrics.csv")
    assert all(float(r["sam_edge"]) == pytest.approx(2 / 0.8) for r in rows)  # GD's edge is 2/eta
    (out / "loss.png").unlink()
    code, stdout, _ = run_cli(["plot", str(out)], capsys)
    assert code == 0 and (out / "loss.png").exists() and "loss.png" in stdout
    code, _, err = run_cli(["plot", str(tmp_path)], capsys)
    assert code == 2 and "metrics.csv" in err


def test_sharpness_at_the_perturbed_point(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "run",
        "mnist",
        "--steps",
        "0",
        "--measure-perturbed",
        "--dtype",
        "float64",
        "--eig-tol",
        "1e-8",
        "--no-plots",
    ]
    assert run_cli([*args, "--out", str(out), *SMALL], capsys)[0] == 0
    row = read_csv(out / "metrics.csv")[0]
    cfg = build_config("mnist", overrides=dict(n_train=200, n_test=100, width=32, depth=3, dtype="float64"))
    task = build_task(cfg)
    params = task.train.parameters()
    g = task.train.grad(params)
    g_norm = float(torch.sqrt(sum((t * t).sum() for t in g)))
    perturbed = tuple(p + cfg.rho * t / g_norm for p, t in zip(params, g))
    top = top_eigenvalue(lambda v: task.train.hvp(perturbed, v), perturbed)
    assert float(row["sharpness_perturbed"]) == pytest.approx(top, rel=1e-6)
    assert float(row["sharpness_perturbed"]) != pytest.approx(float(row["sharpness"]), rel=1e-6)


def test_bad_input_is_exit_2_and_an_internal_error_is_exit_1_with_traceback(monkeypatch, capsys):
    """A BadInput is the user's to fix (exit 2, one line); anything else is a bug of ours: it is
    never reported as bad input, even a ValueError."""
    from samedge.errors import DataError
    from samedge.experiment import cli

    def bad_input(args):
        raise DataError("file x.gz is truncated")

    def internal(args):
        raise ValueError("an internal inconsistency")  # a ValueError of ours, not of the user's

    monkeypatch.setitem(cli.COMMANDS, "edge", bad_input)
    assert cli.main(["edge", "--eta", "0.1"]) == 2
    assert capsys.readouterr().err == "samedge: error: file x.gz is truncated\n"
    monkeypatch.setitem(cli.COMMANDS, "edge", internal)
    with pytest.raises(ValueError, match="internal inconsistency"):
        cli.main(["edge", "--eta", "0.1"])


@pytest.mark.slow
def test_internal_error_exits_1_with_traceback_in_a_real_process(tmp_path):
    """Through the installed command: an injected bug ends in a traceback and exit 1."""
    script = (
        "import sys; from samedge.experiment import cli\n"
        "def boom(args): raise RuntimeError('injected bug')\n"
        "cli.COMMANDS['edge'] = boom\n"
        "sys.exit(cli.main(['edge', '--eta', '0.1']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: injected bug" in proc.stderr
    assert "samedge: error" not in proc.stderr


@pytest.mark.slow
def test_measure_command_at_the_saved_weights_matches_a_dense_hessian(tmp_path, capsys):
    import torch

    from samedge.experiment.store.checkpoint import load_checkpoint
    from samedge.experiment.store.layout import RunDir
    from samedge.experiment.tasks import build_task

    out = tmp_path / "run"
    # a hidden layer: a linear model's Hessian repeats each eigenvalue 10 times (one per class)
    small = ["--n-train", "60", "--n-test", "20", "--width", "3", "--depth", "2", "--dtype", "float64"]
    code, stdout, _ = run_cli(
        ["run", "mnist", "--steps", "6", "--measure-every", "3", "--out", str(out), "--no-plots"]
        + small
        + ["--no-progress"],
        capsys,
    )
    assert code == 0, stdout
    code, stdout, err = run_cli(["measure", str(out), "--eig-k", "3", "--eig-tol", "1e-9", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["step"] == 6 and doc["finished"] and doc["k"] == 3 and doc["hvps"] > 0
    # independent: the dense float64 Hessian of the loss at the checkpoint's weights
    cfg = RunDir(out).read_config()
    task = build_task(cfg)
    params = load_checkpoint(out, cfg.to_dict(), task.train.parameters()).params
    names = list(task.train.names)
    (x, y), loss_fn = task.train.chunks[0], task.train.loss_fn
    assert len(task.train.chunks) == 1
    sizes = [p.numel() for p in params]

    def loss_of(flat):
        ps = [t.view_as(p) for t, p in zip(flat.split(sizes), params)]
        return loss_fn(torch.func.functional_call(task.model, dict(zip(names, ps)), (x,)), y)

    dense = torch.linalg.eigvalsh(torch.func.hessian(loss_of)(torch.cat([p.reshape(-1) for p in params])))
    top = dense.flip(0)[:3].tolist()
    for got, want, bound in zip(doc["eigenvalues"], top, doc["bounds"]):
        assert got == pytest.approx(want, rel=1e-8)
        assert abs(got - want) <= max(bound, 1e-12 * abs(want))
    # the run's last reading is the same quantity, within its recorded bound
    last = read_csv(out / "metrics.csv")[-1]
    assert int(last["step"]) == 6
    assert abs(float(last["sharpness"]) - top[0]) <= float(last["eig_bound"]) * abs(top[0]) + 1e-12
    assert float(last["eig_bound"]) <= float(last["eig_residual"])
    # bad input: one line, exit 2
    code, _, err = run_cli(["measure", str(tmp_path / "nothing")], capsys)
    assert code == 2 and err.startswith("samedge: error:") and err.count("\n") == 1
    code, _, err = run_cli(["measure", str(out), "--eig-method", "nope"], capsys)
    assert code == 2 and "nope" in err


def test_summary_accounts_gradients_hvps_and_wall_time(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "mnist", "--steps", "4", "--measure-every", "2", "--out", str(out), "--no-plots"]
    code, stdout, _ = run_cli([*args, "--n-train", "40", "--n-test", "10", "--width", "4", "--depth", "2"], capsys)
    assert code == 0, stdout
    cost = json.loads((out / "summary.json").read_text())["cost"]
    rows = read_csv(out / "metrics.csv")
    # SAM: the gradient at w_t and at w_t + e, for each of the 5 loops (steps 0..4; the last stops before the update)
    assert cost["train_gradients"] == 2 * 5
    assert cost["measure_hvps"] == sum(int(r["hvps"]) for r in rows)
    assert cost["measure_gradients"] == 0
    assert 0 < cost["train_seconds"] and 0 < cost["measure_seconds"]
    assert cost["train_share"] + cost["measure_share"] <= 1.0
    assert cost["measure_share"] == pytest.approx(cost["measure_seconds"] / cost["wall_seconds"])
