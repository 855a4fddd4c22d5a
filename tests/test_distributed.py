"""Full batch over many processes: sharded objective, tracker and ``samedge run --nproc``.

Real processes (spawn), gloo on CPU, one thread each.  Every value of 2 processes with unequal
shards is compared with the same computation in one process (which the other test files check
against dense Hessians), and the HVP also directly with a dense float64 Hessian.
"""

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from samedge import ShardedObjective, SharpnessTracker
from samedge.core.curvature import HessianEigensolver
from samedge.core.distributed import all_reduce_bytes, shard_bounds
from samedge.core.method import Method
from samedge.core.objective import Objective
from samedge.core.params import flatten, unflatten
from samedge.experiment.config import build_config
from samedge.experiment.run.runner import run

N_EXAMPLES, N_STEPS = 37, 3  # 37 over 2 ranks: shards of 19 and 18


def _problem(dtype):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x = torch.randn(N_EXAMPLES, 5, dtype=dtype)
    y = torch.randint(0, 3, (N_EXAMPLES,))
    return model, nn.CrossEntropyLoss(), x, y


def _compute(objective, model, loss_fn, data, dtype):
    """Everything compared between 1 and 2 processes, in a fixed order of collective calls."""
    params = objective.parameters()
    v = unflatten(torch.linspace(-1, 1, sum(p.numel() for p in params), dtype=dtype), params)
    ev = objective.loss_and_grad(params)
    out = {
        "loss": torch.tensor(ev.loss),
        "accuracy": torch.tensor(ev.accuracy),
        "grad": flatten(ev.grad),
        "hvp": flatten(objective.hvp(params, v)),
        # the second product at the same parameters runs through the kept gradient graph
        "hvp_reused": flatten(objective.hvp(params, unflatten(torch.linspace(1, -1, len(flatten(v)), dtype=dtype), v))),
        "fd_hvp": flatten(objective.finite_difference_hvp(params, v)),
        "sharpness": torch.tensor(float(HessianEigensolver(tol=1e-9, seed=1)(objective, params).eigenvalues[0])),
    }
    method = Method("sam", 0.1, 0.05)
    velocity = None
    for _ in range(N_STEPS):
        g = objective.grad(params)
        params, velocity = method.update(params, method.direction(objective.grad, params, g), velocity)
    out["sam_params"] = flatten(params)
    tracker_kw = {"distributed": True} if isinstance(objective, ShardedObjective) else {}
    m = SharpnessTracker(model, loss_fn, data, chunk_size=7, tol=1e-9, **tracker_kw).measure(eta=0.1, rho=0.05)
    out["tracker"] = torch.tensor([m.sharpness, m.grad_norm, m.edge])
    return out


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for dtype in (torch.float64, torch.float32):
            model, loss_fn, x, y = _problem(dtype)
            lo, hi = shard_bounds(N_EXAMPLES, world, rank)
            local = Objective.from_tensors(model, loss_fn, x[lo:hi], y[lo:hi], chunk_size=7)
            objective = ShardedObjective(local)
            result = _compute(objective, model, loss_fn, (x[lo:hi], y[lo:hi]), dtype)
            result["shard"] = torch.tensor([lo, hi, objective.num_targets])
            result["bytes"] = torch.tensor(objective.reduced_bytes)
            torch.save(result, Path(out_dir) / f"{str(dtype)[6:]}-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(2, str(out / "store"), str(out)), nprocs=2, start_method="spawn")
    return out


def test_shard_bounds_cover_the_data_with_near_equal_slices():
    for n, world in ((401, 2), (10, 3), (5, 5), (7, 1)):
        bounds = [shard_bounds(n, world, r) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1 and sorted(sizes, reverse=True) == sizes
    with pytest.raises(ValueError, match="rank 2"):
        shard_bounds(10, 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_two_processes_equal_one_process(two_processes, dtype, rtol):
    model, loss_fn, x, y = _problem(dtype)
    one = _compute(Objective.from_tensors(model, loss_fn, x, y, chunk_size=7), model, loss_fn, (x, y), dtype)
    ranks = [torch.load(two_processes / f"{str(dtype)[6:]}-rank{r}.pt") for r in range(2)]
    assert [r["shard"].tolist() for r in ranks] == [[0, 19, 37], [19, 37, 37]]  # unequal shards
    for key, expected in one.items():
        # a finite-difference HVP divides the rounding of two gradients by 2 eps = 2e-3: in float32
        # that alone is ~1e-4 relative, whatever the number of processes
        tol = 1e-3 if key == "fd_hvp" and dtype == torch.float32 else rtol
        for rank in ranks:
            got = rank[key]
            scale = float(expected.abs().max())
            assert float((got - expected).abs().max()) <= tol * scale, (key, got, expected)
    # every rank holds the same parameters, bit for bit
    assert torch.equal(ranks[0]["sam_params"], ranks[1]["sam_params"])
    # the HVP against a dense Hessian in float64 (independent of the objective code)
    if dtype == torch.float64:
        params = tuple(p.detach() for p in model.parameters())
        names = [n for n, _ in model.named_parameters()]

        def loss_of(flat):
            ps = unflatten(flat, params)
            return loss_fn(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

        hessian = torch.autograd.functional.hessian(loss_of, flatten(params))
        v = torch.linspace(-1, 1, hessian.shape[0], dtype=dtype)
        assert torch.allclose(ranks[1]["hvp"], hessian @ v, rtol=1e-10, atol=1e-12)
        assert torch.allclose(ranks[0]["hvp_reused"], hessian @ v.flip(0), rtol=1e-10, atol=1e-12)
        assert math.isclose(
            float(ranks[0]["sharpness"]), float(torch.linalg.eigvalsh(hessian)[-1]), rel_tol=1e-6
        )  # Lanczos stops at residual 1e-9
    # one all-reduce of the flattened vector per gradient and HVP: the bytes are counted
    assert int(ranks[0]["bytes"]) % all_reduce_bytes(tuple(model.parameters())) == 0


# ---------------------------------------------------------------------------- the command line

ARGS = ["--optimizer", "sam", "--eta", "0.1", "--rho", "0.1", "--measure-every", "10", "--n-train", "201"]
ARGS += ["--width", "16", "--depth", "2", "--seed", "4", "--dtype", "float64", "--checkpoint-every", "20"]


def _cfg(steps):
    flags = dict(zip(ARGS[::2], ARGS[1::2]))
    values = {k[2:].replace("-", "_"): v for k, v in flags.items()}
    typed = {k: (v if k in ("optimizer", "dtype") else float(v) if "." in v else int(v)) for k, v in values.items()}
    return build_config("mnist", overrides={**typed, "steps": steps})


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _assert_close_rows(a, b, rtol=1e-9):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for col in ra:
            if col in ("elapsed_s", "hvps", "eig_residual", "eig_converged") or ra[col] == "":
                assert col in rb
                continue
            u, v = float(ra[col]), float(rb[col])
            tol = 1e-6 if "alignment" in col else rtol
            assert abs(u - v) <= tol * max(abs(u), abs(v), 1e-12), (ra["step"], col, u, v)


def _samedge(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "samedge", "run", *args], env=env, **kw)


@pytest.mark.slow
def test_nproc_2_run_matches_one_process_and_records_world_size(tmp_path):
    ref = run(_cfg(20), tmp_path / "one", progress=False)
    proc = _samedge("mnist", *ARGS, "--steps", "20", "--nproc", "2", "--out", str(tmp_path / "two"), "--no-plots")
    assert proc.wait(300) == 0
    _assert_close_rows(_rows(ref.run_dir / "metrics.csv"), _rows(tmp_path / "two" / "metrics.csv"))
    # layers.csv: the eigenvector is replicated, so its masses are the same; rank 0 alone writes the file
    one, two = _rows(ref.run_dir / "layers.csv"), _rows(tmp_path / "two" / "layers.csv")
    assert [(r["step"], r["block"]) for r in one] == [(r["step"], r["block"]) for r in two]
    for ra, rb in zip(one, two):
        assert float(ra["mass"]) == pytest.approx(float(rb["mass"]), abs=1e-4)
    import json

    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert (config["world_size"], config["backend"]) == (2, "gloo")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


def _children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_killed_worker_ends_the_run_and_resume_with_another_n_continues(tmp_path):
    """SIGKILL of one worker: the launcher stops the other and exits 5 within seconds, naming the
    rank; the checkpoint is intact, and resuming in ONE process gives the uninterrupted rows."""
    steps = 150
    out = tmp_path / "two"
    proc = _samedge("mnist", *ARGS, "--steps", str(steps), "--nproc", "2", "--out", str(out), "--no-plots",
                    stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = out / "metrics.csv"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    killed = time.monotonic()
    code = proc.wait(120)
    assert time.monotonic() - killed < 30
    stderr = proc.stderr.read() if proc.stderr else ""
    assert code == 5, stderr
    assert "worker rank 1 of 2" in stderr and "SIGKILL" in stderr and "--resume" in stderr
    assert not any(Path(f"/proc/{w}").exists() and _alive(w) for w in workers)
    rows_before = len(_rows(metrics))
    assert rows_before < steps // 10 + 1  # it really stopped mid-run
    # resume with another number of processes: allowed (results agree up to float rounding)
    assert _samedge("--resume", str(out), "--nproc", "1", "--no-plots").wait(300) == 0
    ref = run(_cfg(steps), tmp_path / "ref", progress=False)
    _assert_close_rows(_rows(ref.run_dir / "metrics.csv"), _rows(metrics))


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_nproc_bad_input(tmp_path, capsys):
    from samedge.experiment.cli import main

    assert main(["run", "mnist", "--nproc", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err
    assert main(["run", "mnist", "--n-train", "3", "--nproc", "4", "--out", str(tmp_path / "b")]) == 2
    assert "'n_train' (3) is below --nproc 4" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
