"""Hessian trace (Hutchinson) and spectral density (SLQ) against dense float64 Hessians."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn
from torch.func import functional_call

from samedge import SharpnessTracker, hessian_density, hessian_trace, hutchinson_trace, slq_density
from samedge.core.losses import get_loss
from samedge.core.objective import Objective
from samedge.core.params import flatten, unflatten

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(activation=nn.Tanh, seed=0, chunk_size=None):
    """A 6-10-3 MLP in float64 on 40 random examples, MSE on one-hot targets (103 parameters),
    and its dense Hessian by torch.autograd.functional.hessian."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), activation(), nn.Linear(10, 3)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    loss = get_loss("mse")
    obj = Objective.from_tensors(model, loss, x, y, chunk_size)
    params = obj.parameters()
    names = [n for n, _ in model.named_parameters()]

    def f(flat):
        return loss(functional_call(model, dict(zip(names, unflatten(flat, params))), (x,)), y)

    H = torch.autograd.functional.hessian(f, flatten(params))
    return obj, params, H


def hutchinson_sd(H):
    """Standard deviation of one Rademacher probe's ``z^T H z``: ``sqrt(2 sum_{i != j} H_ij^2)``."""
    off = H - torch.diag(torch.diagonal(H))
    return math.sqrt(2 * float((off**2).sum()))


@pytest.mark.slow
@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
def test_trace_within_its_error_of_the_dense_trace(activation):
    obj, params, H = small_net(activation, chunk_size=16)
    exact = float(torch.trace(H))
    probes = 400
    est = hessian_trace(obj, params, probes=probes, generator=torch.Generator().manual_seed(0))
    assert est.matvecs == probes and est.probes == probes
    # within 4 of its own standard errors (seeded; a 4-sigma miss has probability ~6e-5)
    assert abs(est.trace - exact) <= 4 * est.stderr
    # and the stated error is the true one: the standard error of the mean of 400 probes
    true_se = hutchinson_sd(H) / math.sqrt(probes)
    assert 0.8 * true_se <= est.stderr <= 1.2 * true_se
    assert est.trace == pytest.approx(float(np.mean(est.samples)))


def test_trace_is_exact_on_a_diagonal_matrix_and_deflation_is_exact_on_its_span():
    d = torch.linspace(1.0, 5.0, 50, dtype=torch.float64)
    est = hutchinson_trace(lambda v: d * v, 50, probes=3, generator=torch.Generator().manual_seed(1), dtype=d.dtype)
    assert est.trace == pytest.approx(float(d.sum()), rel=1e-14) and est.stderr == pytest.approx(0.0, abs=1e-12)
    # a dense symmetric matrix, deflated by its exact top 5 eigenvectors
    A = torch.randn(60, 60, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    A = A @ A.T / 60
    lam, U = torch.linalg.eigh(A)
    top = U[:, -5:].T
    plain = hutchinson_trace(lambda v: A @ v, 60, probes=200, generator=torch.Generator().manual_seed(3), dtype=A.dtype)
    defl = hutchinson_trace(
        lambda v: A @ v, 60, probes=200, generator=torch.Generator().manual_seed(3), deflate=top, dtype=A.dtype
    )
    assert defl.deflated == 5 and defl.matvecs == 205
    assert defl.deflated_part == pytest.approx(float(lam[-5:].sum()), rel=1e-12)
    exact = float(torch.trace(A))
    for e in (plain, defl):
        assert abs(e.trace - exact) <= 4 * e.stderr
    # the remainder's variance is 2 sum_{i!=j} (PAP)_ij^2 < A's: measurably lower here
    P = torch.eye(60, dtype=A.dtype) - top.T @ top
    assert hutchinson_sd(P @ A @ P) < 0.8 * hutchinson_sd(A)
    assert defl.stderr < plain.stderr
    # deflating by arbitrary (non-eigen) vectors is still unbiased: the identity is exact
    junk = torch.randn(3, 60, generator=torch.Generator().manual_seed(4), dtype=A.dtype)
    many = hutchinson_trace(
        lambda v: A @ v, 60, probes=400, generator=torch.Generator().manual_seed(5), deflate=junk, dtype=A.dtype
    )
    assert abs(many.trace - exact) <= 4 * many.stderr


def test_slq_density_against_dense_eigenvalues():
    obj, params, H = small_net(nn.Tanh)
    eigs = torch.linalg.eigvalsh(H).numpy()
    spread = float(eigs.max() - eigs.min())
    dens = hessian_density(obj, params, probes=20, steps=30, generator=torch.Generator().manual_seed(0))
    values, weights = dens.atoms()
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert dens.matvecs == 20 * 30
    # Ritz values lie in the spectrum; the extreme ones converge first
    assert values.min() >= eigs.min() - 1e-9 * spread and values.max() <= eigs.max() + 1e-9 * spread
    assert values.max() == pytest.approx(eigs.max(), rel=1e-8)
    # Wasserstein-1 distance to the eigenvalue distribution.  The probe weights |u_i^T z|^2 / dim
    # scatter around 1/dim, so the sampling part is of order spread / sqrt(probes * dim) (0.022
    # spread here); measured over seeds 0-14: median 0.0075, max 0.0101 spread.  Bound: 0.015.
    bound = 0.015 * spread
    assert dens.wasserstein(eigs) <= bound
    # the bound discriminates: the spectrum shifted by 3% of its spread is outside it
    assert dens.wasserstein(eigs + 0.03 * spread) > bound
    # the smoothed density is a probability density
    grid = np.linspace(eigs.min() - 0.1 * spread, eigs.max() + 0.1 * spread, 4000)
    assert np.trapezoid(dens.density(grid), grid) == pytest.approx(1.0, abs=1e-3)


def test_full_lanczos_quadrature_is_exact_and_slq_trace_is_hutchinson():
    """With as many steps as dimensions each probe's quadrature is exact: the nodes are the
    eigenvalues and ``dim * E[lambda]`` is ``z^T A z`` of the same Rademacher probe."""
    lam = np.array([-1.0, 0.5, 2.0, 2.5, 4.0, 7.0])
    Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 6)))
    A = torch.as_tensor(Q @ np.diag(lam) @ Q.T)
    dens = slq_density(lambda v: A @ v, 6, probes=5, steps=6, generator=torch.Generator().manual_seed(7), dtype=A.dtype)
    for p in range(5):
        np.testing.assert_allclose(np.sort(dens.nodes[p]), lam, atol=1e-10)
    hutch = hutchinson_trace(lambda v: A @ v, 6, probes=5, generator=torch.Generator().manual_seed(7), dtype=A.dtype)
    assert dens.trace == pytest.approx(hutch.trace, rel=1e-12)
    # empirical CDF of the measure vs the weights of exact quadrature: W1 to the eigenvalues is
    # only the probe weights' deviation from 1/6
    assert dens.wasserstein(lam) == pytest.approx(
        scipy.stats.wasserstein_distance(dens.nodes.ravel(), lam, dens.weights.ravel()), rel=1e-12
    )


def test_seeded_and_deterministic():
    obj, params, _ = small_net(nn.ReLU)

    def both(seed):
        g = torch.Generator().manual_seed(seed)
        return hessian_trace(obj, params, probes=5, generator=g), hessian_density(obj, params, steps=10, generator=g)

    (t1, d1), (t2, d2), (t3, _) = both(0), both(0), both(1)
    assert t1.trace == t2.trace and t1.stderr == t2.stderr
    assert np.array_equal(d1.nodes, d2.nodes) and np.array_equal(d1.weights, d2.weights)
    assert t3.trace != t1.trace


@pytest.mark.slow
def test_tracker_trace_and_density():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    tracker = SharpnessTracker(model, nn.MSELoss(), (x, y), chunk_size=20)
    m = tracker.measure(eta=0.1, rho=0.05)
    H = torch.autograd.functional.hessian(
        lambda flat: nn.MSELoss()(
            functional_call(model, dict(zip([n for n, _ in model.named_parameters()], unflatten(flat, params))), (x,)),
            y,
        ),
        flatten(params := tracker.objective.parameters()),
    )
    exact = float(torch.trace(H))
    t = tracker.trace(probes=200)
    assert abs(t.trace - exact) <= 4 * t.stderr
    td = tracker.trace(probes=200, deflate=True)
    assert td.deflated == 1 and td.deflated_part == pytest.approx(m.sharpness, rel=1e-6)
    assert abs(td.trace - exact) <= 4 * td.stderr
    d = tracker.density(probes=2, steps=20)
    assert d.wasserstein(torch.linalg.eigvalsh(H).numpy()) < 0.02 * float(torch.linalg.eigvalsh(H).max())
    # reproducible: a fresh tracker draws the same probes
    again = SharpnessTracker(model, nn.MSELoss(), (x, y), chunk_size=20)
    assert again.trace(probes=200).trace == t.trace


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="probes must be >= 2"):
        hutchinson_trace(lambda v: v, 4, probes=1)
    with pytest.raises(ValueError, match="deflation vectors"):
        hutchinson_trace(lambda v: v, 4, deflate=torch.zeros(4))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        slq_density(lambda v: v, 4, steps=0)


# --- run measurements: settings, columns, files, resume -------------------------------------

RUN = ["run", "mnist", "--n-train", "200", "--n-test", "100", "--width", "16", "--depth", "2", "--no-progress"]
SPEC = ["--steps", "12", "--measure-every", "2", "--trace-every", "4", "--trace-probes", "6", "--density-every", "6"]


def test_bad_spectrum_settings_exit_2(tmp_path, capsys):
    from samedge.experiment.cli import main

    for flags, needle in (
        (["--trace-every", "3"], "'trace_every' (3) must be a multiple of measure_every"),
        (["--density-every", "5", "--measure-every", "2"], "'density_every' (5) must be a multiple"),
        (["--trace-probes", "1"], "'trace_probes' must be >= 2"),
        (["--density-steps", "0"], "'density_steps' must be >= 1"),
    ):
        assert main([*RUN, *flags, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("samedge: error:") and needle in err and "\n" not in err
        assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_run_trace_density_columns_and_resume_identical(tmp_path):
    import csv

    from samedge.experiment.cli import main
    from samedge.experiment.config import build_config
    from samedge.experiment.run.runner import run
    from samedge.experiment.store.density import read_density

    ref = tmp_path / "ref"
    assert main([*RUN, *SPEC, "--out", str(ref)]) == 0
    rows = list(csv.DictReader(open(ref / "metrics.csv")))
    traced = {int(r["step"]) for r in rows if r["trace"]}
    assert traced == {0, 4, 8, 12}  # every 4 steps and the last
    assert all(float(r["trace_stderr"]) > 0 and r["trace_hvps"] == "6" for r in rows if r["trace"])
    assert all(r["trace"] == r["trace_stderr"] == "" for r in rows if int(r["step"]) not in traced)
    dens = read_density(ref / "density.csv")
    assert sorted(dens) == [0, 6, 12]
    for _nodes, weights in dens.values():
        assert weights.sum() == pytest.approx(1.0, abs=1e-6)
    assert (ref / "density.png").exists() and (ref / "trace.png").exists()
    # interrupted (Ctrl-C) at step 7, then resumed: the same rows and the same density file
    cfg = build_config(
        "mnist",
        overrides=dict(
            n_train=200,
            n_test=100,
            width=16,
            depth=2,
            steps=12,
            measure_every=2,
            trace_every=4,
            trace_probes=6,
            density_every=6,
            checkpoint_every=3,
        ),
    )
    out = tmp_path / "cut"

    def ctrl_c(t):
        if t == 7:
            raise KeyboardInterrupt

    assert run(cfg, out, progress=False, on_step=ctrl_c).summary["interrupted"]
    assert run(cfg, out, progress=False, resume=True).summary["interrupted"] is False

    def strip(path):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(open(path))]

    assert strip(out / "metrics.csv") == strip(ref / "metrics.csv")
    assert (out / "density.csv").read_text() == (ref / "density.csv").read_text()


def test_default_run_has_no_spectrum_columns_or_files():
    from samedge.experiment.config import RunConfig
    from samedge.experiment.store.metrics import base_columns

    cfg = RunConfig()
    assert cfg.trace_every == 0 and cfg.density_every == 0
    assert "trace" not in base_columns() and "trace" in base_columns(trace=True)


# --- the flat-region check -------------------------------------------------------------------


def _rows(sharp, trace, se, loss):
    return [
        {"step": 10 * i, "sharpness": s, "trace": t, "trace_stderr": e, "train_loss": lo, "test_accuracy": 0.9}
        for i, (s, t, e, lo) in enumerate(zip(sharp, trace, se, loss))
    ]


def test_flatness_compare_departure_and_trace_verdict():
    from samedge.experiment.analysis.flatness import gd_vs_sam as compare

    gd = _rows([2.0, 2.2, 2.6, 3.0], [60, None, 70, 80.0], [1, None, 1, 3.0], [0.1, 0.09, 0.08, 0.07])
    sam = _rows([2.0, 2.1, 2.3, 2.4], [60, None, 65, 70.0], [1, None, 1, 4.0], [0.1, 0.095, 0.085, 0.075])
    c = compare(gd, sam, depart=0.1)
    # |2.1/2.2 - 1| = 0.045; |2.3/2.6 - 1| = 0.115 > 0.1: departs at step 20
    assert c["departed_step"] == 20 and c["departed_sharpness_ratio"] == pytest.approx(2.3 / 2.6)
    assert c["departed_sam_train_loss"] == 0.085 and c["departed_gd_train_loss"] == 0.08
    assert c["final_sharpness_ratio"] == pytest.approx(0.8) and c["final_step"] == 30
    # final traces 80 +- 3 vs 70 +- 4: difference 10 +- 5, exactly 2 s.e.: not (strictly) flatter
    assert c["trace_difference"] == 10 and c["trace_difference_stderr"] == pytest.approx(5.0)
    assert c["sam_flatter_by_trace"] is False
    sam[-1]["trace"] = 69.0
    assert compare(gd, sam)["sam_flatter_by_trace"] is True
    assert compare(gd, sam, depart=0.5)["departed_step"] is None


def test_flatness_cli_refuses_bad_input(tmp_path, capsys):
    from samedge.experiment.cli import main

    for flags, needle in (
        (["--optimizer", "gd"], "--optimizer cannot be given to flatness"),
        (["--rho", "0"], "'rho' must be > 0 for the flatness check"),
        (["--depart", "1.5"], "--depart must be in (0, 1)"),
    ):
        assert main(["flatness", "mnist", *flags, "--out", str(tmp_path / "f")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("samedge: error:") and needle in err
        assert not (tmp_path / "f").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    assert main(["flatness", "mnist", "--steps", "1", "--out", str(tmp_path / "busy")]) == 2
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"


@pytest.mark.slow
def test_flatness_command_end_to_end(tmp_path, capsys):
    import json

    from samedge.experiment.cli import main

    small = ["--n-train", "200", "--n-test", "100", "--width", "16", "--depth", "2", "--no-progress"]
    out = tmp_path / "f"
    assert (
        main(
            [
                "flatness",
                "mnist",
                "--steps",
                "6",
                "--measure-every",
                "3",
                "--trace-probes",
                "4",
                *small,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    c = json.loads((out / "flatness.json").read_text())
    assert (out / "flatness.png").exists() and (out / "gd" / "metrics.csv").exists()
    gd_cfg = json.loads((out / "gd" / "config.json").read_text())["config"]
    sam_cfg = json.loads((out / "sam" / "config.json").read_text())["config"]
    assert gd_cfg["optimizer"] == "gd" and gd_cfg["rho"] == 0 and sam_cfg["optimizer"] == "sam"
    assert gd_cfg["seed"] == sam_cfg["seed"] and gd_cfg["eta"] == sam_cfg["eta"]
    # the same initialization: identical first rows' loss and sharpness
    first = [open(out / n / "metrics.csv").read().split("\n")[1].split(",")[:5] for n in ("gd", "sam")]
    assert first[0][1] == first[1][1] and first[0][4] == first[1][4]
    assert c["trace_step"] == 6 and "by trace" in printed and c["final_step"] == 6
