"""The cifar10 and shakespeare tasks end to end on the real excerpts in ../shared/data."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from independent import top_eigenvalue

from samedge.core.curvature import HessianEigensolver
from samedge.core.params import flatten
from samedge.core.thresholds import sam_edge
from samedge.data.sampling import MinibatchSampler, fixed_sample
from samedge.experiment.cli import main
from samedge.experiment.config import build_config
from samedge.experiment.tasks import build_task

CIFAR_SMALL = ["--n-train", "64", "--n-test", "64", "--cnn-channels", "4", "--chunk-size", "16", "--no-progress"]
SHAKE_SMALL = [
    "--batch-size",
    "8",
    "--n-train",
    "64",
    "--n-test",
    "16",
    "--seq-len",
    "16",
    "--d-model",
    "16",
    "--layers",
    "1",
    "--heads",
    "2",
    "--key-size",
    "8",
    "--eval-batch-size",
    "16",
    "--no-progress",
]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cifar10_short_run(shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "cifar10", "--data", str(shared_data / "cifar10-1k"), "--steps", "3", "--measure-every", "1"]
    assert main([*args, "--out", str(out), *CIFAR_SMALL]) == 0
    rows = read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    cfg = json.loads((out / "config.json").read_text())["config"]
    for r in rows:
        assert float(r["sam_edge"]) == pytest.approx(sam_edge(cfg["eta"], cfg["rho"], float(r["grad_norm"])), rel=1e-12)
        assert r["eig_converged"] == "1"
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["test_error"] <= 1.0
    assert (out / "sharpness.png").exists()


def test_cifar10_chunked_equals_unchunked(shared_data):
    base = dict(data=str(shared_data / "cifar10-1k"), n_train=100, n_test=10, cnn_channels=4)
    whole = build_task(build_config("cifar10", overrides={**base, "chunk_size": None})).train
    chunked = build_task(build_config("cifar10", overrides={**base, "chunk_size": 30})).train
    assert len(chunked.chunks) == 4 and len(whole.chunks) == 1
    params = whole.parameters()
    torch.manual_seed(0)
    v = tuple(torch.randn_like(p) for p in params)
    a, b = whole.loss_and_grad(params), chunked.loss_and_grad(params)
    assert b.loss == pytest.approx(a.loss, rel=1e-5)
    ga, gb = flatten(a.grad), flatten(b.grad)
    assert float((ga - gb).norm() / ga.norm()) < 1e-5
    ha, hb = flatten(whole.hvp(params, v)), flatten(chunked.hvp(params, v))
    assert float((ha - hb).norm() / ha.norm()) < 1e-5


def test_cifar10_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "cifar10", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "samedge download cifar10" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_shakespeare_run_uses_the_minibatch(shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    text = shared_data / "tinyshakespeare" / "input.txt"
    args = ["run", "shakespeare", "--data", str(text), "--steps", "4", "--measure-every", "2", "--dtype", "float64"]
    assert main([*args, "--out", str(out), *SHAKE_SMALL]) == 0
    rows = read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert all(r["test_loss"] != "" for r in rows)
    saved = json.loads((out / "config.json").read_text())["config"]
    # step 0: the recorded loss and gradient norm are the minibatch's, computed independently here
    cfg = build_config("shakespeare", overrides={k: v for k, v in saved.items() if k != "task"})
    task = build_task(cfg)
    model = task.model
    sampler = MinibatchSampler(cfg.n_train, cfg.batch_size, seed=cfg.seed)
    idx = sampler.batch_indices(0)
    x, y = task.train.chunks[0][0][idx], task.train.chunks[0][1][idx]
    loss = F.cross_entropy(model(x).reshape(-1, model(x).shape[-1]), y.reshape(-1))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    g_norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
    assert float(rows[0]["train_loss"]) == pytest.approx(loss.item(), rel=1e-10)
    assert float(rows[0]["grad_norm"]) == pytest.approx(g_norm, rel=1e-10)
    assert float(rows[0]["sam_edge"]) == pytest.approx(sam_edge(cfg.eta, cfg.rho, g_norm), rel=1e-10)


def test_stochastic_sam_step_by_hand(shared_data, tmp_path, capsys):
    """w1 = w0 - eta * grad L_B0(w0 + rho g/||g||), g = grad L_B0(w0), B0 the step-0 minibatch."""
    out = tmp_path / "run"
    text = shared_data / "tinyshakespeare" / "input.txt"
    args = ["run", "shakespeare", "--data", str(text), "--steps", "1", "--dtype", "float64", "--no-plots"]
    assert main([*args, "--out", str(out), *SHAKE_SMALL, "--eval-batch-size", "0"]) == 0
    assert not any(c.startswith("eval_") for c in read_csv(out / "metrics.csv")[0])  # 0: off
    saved = json.loads((out / "config.json").read_text())["config"]
    cfg = build_config("shakespeare", overrides={k: v for k, v in saved.items() if k != "task"})
    task = build_task(cfg)
    model = task.model
    idx = MinibatchSampler(cfg.n_train, cfg.batch_size, seed=cfg.seed).batch_indices(0)
    x, y = task.train.chunks[0][0][idx], task.train.chunks[0][1][idx]
    names = [n for n, _ in model.named_parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]

    def grad_at(ws):
        leaves = [w.clone().requires_grad_(True) for w in ws]
        out_ = torch.func.functional_call(model, dict(zip(names, leaves)), (x,))
        loss = F.cross_entropy(out_.reshape(-1, out_.shape[-1]), y.reshape(-1))
        return torch.autograd.grad(loss, leaves)

    g = grad_at(w0)
    g_norm = torch.sqrt(sum((t * t).sum() for t in g))
    g_sam = grad_at([w + cfg.rho * t / g_norm for w, t in zip(w0, g)])
    w1 = [w - cfg.eta * t for w, t in zip(w0, g_sam)]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    for a, b in zip(checkpoint["params"], w1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_shakespeare_needs_a_batch_size(shared_data, tmp_path, capsys):
    text = shared_data / "tinyshakespeare" / "input.txt"
    code = main(
        [
            "run",
            "shakespeare",
            "--data",
            str(text),
            "--batch-size",
            "100",
            "--out",
            str(tmp_path / "r"),
            *SHAKE_SMALL[2:],
        ]
    )
    assert code == 2 and "batch_size" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluation_batch_sharpness_is_recorded_beside_the_minibatch(shared_data, tmp_path, capsys):
    """With --eval-batch-size the sharpness and SAM-edge are also measured on a fixed, seeded batch
    of training windows; at step 0 both match an independent eigsh over that batch's Hessian."""
    out = tmp_path / "run"
    text = shared_data / "tinyshakespeare" / "input.txt"
    args = [
        "run",
        "shakespeare",
        "--data",
        str(text),
        "--steps",
        "2",
        "--measure-every",
        "2",
        "--dtype",
        "float64",
        "--eig-tol",
        "1e-8",
        "--no-plots",
    ]
    assert main([*args, "--out", str(out), *SHAKE_SMALL]) == 0
    rows = read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 2]
    saved = json.loads((out / "config.json").read_text())["config"]
    cfg = build_config("shakespeare", overrides={k: v for k, v in saved.items() if k != "task"})
    task = build_task(cfg)
    model = task.model
    idx = fixed_sample(cfg.n_train, 16, cfg.seed)
    assert len(set(idx.tolist())) == 16
    x, y = task.train.chunks[0][0][idx], task.train.chunks[0][1][idx]
    names = [n for n, _ in model.named_parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]

    def loss_at(ws):
        out_ = torch.func.functional_call(model, dict(zip(names, ws)), (x,))
        return F.cross_entropy(out_.reshape(-1, out_.shape[-1]), y.reshape(-1))

    leaves = [w.clone().requires_grad_(True) for w in w0]
    grads = torch.autograd.grad(loss_at(leaves), leaves, create_graph=True)
    g_norm = float(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads)))

    def hvp(vs):  # double backward through this test's own graph of the loss
        dot = sum((g * t).sum() for g, t in zip(grads, vs))
        return torch.autograd.grad(dot, leaves, retain_graph=True)

    top = top_eigenvalue(hvp, w0, tol=1e-10)
    row = rows[0]
    assert float(row["eval_grad_norm"]) == pytest.approx(g_norm, rel=1e-10)
    assert float(row["eval_edge"]) == pytest.approx(sam_edge(cfg.eta, cfg.rho, g_norm), rel=1e-10)
    assert float(row["eval_sharpness"]) == pytest.approx(top, rel=1e-6)
    assert float(row["eval_sharpness_over_edge"]) == pytest.approx(top / float(row["eval_edge"]), rel=1e-6)
    assert float(row["eval_sharpness"]) != pytest.approx(float(row["sharpness"]), rel=1e-3)  # another batch
    summary = json.loads((out / "summary.json").read_text())
    assert "eval_ratio_median" in summary
    assert summary["total_hvps"] == sum(int(r["hvps"]) + int(r["eval_hvps"]) for r in rows)


def test_evaluation_batch_needs_minibatch_training(tmp_path, capsys):
    code = main(["run", "mnist", "--eval-batch-size", "10", "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "eval_batch_size" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cifar10_paper_preset_starts_and_measures_on_cpu(shared_data, tmp_path, capsys):
    """The paper-scale preset is the GPU configuration; on a CPU it must at least start and measure.
    Here only the number of images is reduced (the excerpt has 1,000)."""
    out = tmp_path / "run"
    data = str(shared_data / "cifar10-1k")
    common = ["run", "cifar10", "--preset", "cifar10-paper", "--data", data, "--no-plots", "--no-progress"]
    assert main([*common, "--n-train", "100", "--n-test", "50", "--steps", "0", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["eta"], cfg["rho"], cfg["device"], cfg["chunk_size"], cfg["n_train"]) == (0.002, 0.05, "auto", 500, 100)
    (row,) = read_csv(out / "metrics.csv")
    assert row["eig_converged"] == "1" and float(row["sharpness"]) > 0
    # With the preset's own 50,000 images asked of the 1,000-image excerpt: a clear error, nothing written.
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "50000" in err
    assert not (tmp_path / "full").exists()


def test_shakespeare_ascii_vocabulary(shared_data):
    """vocab = "ascii" (the paper code's 128 codes) widens the embedding and the untied output
    layer (weights and bias) from the text's 65 characters to 128."""
    base = {
        "data": str(shared_data / "tinyshakespeare" / "input.txt"),
        "batch_size": 8,
        "n_train": 64,
        "n_test": 16,
        "seq_len": 16,
        "d_model": 16,
        "layers": 1,
        "heads": 2,
        "key_size": 8,
        "eval_batch_size": 0,
    }
    text = build_task(build_config("shakespeare", overrides=base))
    ascii_ = build_task(build_config("shakespeare", overrides={**base, "vocab": "ascii"}))
    assert ascii_.n_parameters - text.n_parameters == (128 - 65) * (16 + 16 + 1)
    # the same text, encoded by code point: the first training window is the same characters
    x_text, x_ascii = text.train.chunks[0][0][0], ascii_.train.chunks[0][0][0]
    assert int(x_ascii.max()) < 128 and x_ascii.shape == x_text.shape


@pytest.mark.slow
def test_shakespeare_preset_tolerance_reads_the_top_eigenvalue(shared_data):
    """The default preset's warm-started readings (its ``eig_tol``, 1e-3) along a SAM run give each
    minibatch's top Hessian eigenvalue to within that tolerance, against ARPACK (to 1e-6) on the
    same minibatch (float64, small model)."""
    text = shared_data / "tinyshakespeare" / "input.txt"
    small = dict(n_train=64, n_test=16, seq_len=16, d_model=16, layers=1, heads=2, key_size=8, batch_size=8)
    cfg = build_config("shakespeare", overrides=dict(data=str(text), dtype="float64", eval_batch_size=0, **small))
    assert cfg.eig_tol == pytest.approx(1e-3)  # the preset's setting is what is tested
    task = build_task(cfg)
    method = cfg.method()
    solver = HessianEigensolver(k=1, method=cfg.eig_method, tol=cfg.eig_tol, max_iter=cfg.eig_max_iter, seed=cfg.seed)
    params = task.train.parameters()
    for step in range(2):
        objective = task.objective_at(step)
        reading = solver(objective, params)
        exact = top_eigenvalue(lambda v, o=objective, p=params: o.hvp(p, v), params, tol=1e-6)
        assert float(reading.eigenvalues[0]) == pytest.approx(exact, rel=cfg.eig_tol)
        grad = objective.loss_and_grad(params).grad
        params, _ = method.update(params, method.direction(objective.grad, params, grad))
