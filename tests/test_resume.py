"""Checkpoints and exact resume, including after SIGKILL of a real process."""

import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import fields

import pytest
from helpers import as_earlier_samedge, rows_without_time

from samedge.experiment.cli import build_parser, main
from samedge.experiment.config import RunConfig, build_config
from samedge.experiment.run.runner import run

SMALL = ["--n-train", "200", "--n-test", "100", "--width", "32", "--depth", "3", "--no-progress", "--no-plots"]
ARGS = ["run", "mnist", "--steps", "40", "--measure-every", "2", "--checkpoint-every", "5", *SMALL]


def run_interrupted(args, out, step):
    """``samedge`` with ``args`` into ``out``, interrupted by Ctrl-C before the update of ``step``."""
    ns = build_parser().parse_args([*args, "--out", str(out)])
    overrides = {f.name: getattr(ns, f.name) for f in fields(RunConfig) if f.name != "task"}
    result = run(build_config(ns.task, overrides=overrides), out, progress=False, on_step=ctrl_c_at(step))
    assert result.summary["interrupted"] is True and result.summary["interrupted_step"] == step
    return result


def ctrl_c_at(step):
    """An ``on_step`` hook that raises KeyboardInterrupt (as Ctrl-C would) before the update of ``step``."""

    def hook(t):
        if t == step:
            raise KeyboardInterrupt

    return hook


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    return rows_without_time(out / "metrics.csv")


@pytest.fixture(scope="module")
def reference_steps(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_steps") / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    return (out / "steps.csv").read_text()


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_rows(tmp_path, reference, reference_steps):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "samedge", *ARGS, "--out", str(out)]
    rng = random.Random(1234)
    killed = False
    for attempt in range(3):  # kill at a random moment after the first checkpoint exists
        proc = subprocess.Popen(
            cmd
            if attempt == 0
            else [sys.executable, "-m", "samedge", "run", "--resume", str(out), "--no-progress", "--no-plots"]
        )
        deadline = time.time() + 60
        while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed = True
        proc.wait()
        rows = rows_without_time(out / "metrics.csv")  # parseable after every kill
        assert all(r["step"] for r in rows)
    assert killed, "the run finished before it could be killed"
    code = subprocess.run(
        [sys.executable, "-m", "samedge", "run", "--resume", str(out), "--no-progress", "--no-plots"]
    ).returncode
    assert code == 0
    assert rows_without_time(out / "metrics.csv") == reference
    assert (out / "steps.csv").read_text() == reference_steps  # one row per step, bit for bit
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] is False and summary["final_step"] == 40


def test_resume_of_finished_run_changes_nothing(tmp_path, reference):
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    before = (out / "metrics.csv").read_text()
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert (out / "metrics.csv").read_text() == before


def test_keyboard_interrupt_checkpoints_and_resumes(tmp_path, reference, reference_steps):
    out = tmp_path / "run"
    run_interrupted(ARGS, out, 12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["interrupted_step"] == 12
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert rows_without_time(out / "metrics.csv") == reference
    assert (out / "steps.csv").read_text() == reference_steps  # one row per step, bit for bit


def test_bad_resume_inputs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*ARGS[:3], "6", *ARGS[4:], "--out", str(a)]) == 0
    assert main([*ARGS[:3], "6", *ARGS[4:], "--out", str(b), "--eta", "0.05"]) == 0
    capsys.readouterr()
    # a checkpoint from another configuration
    (a / "checkpoint.pt").write_bytes((b / "checkpoint.pt").read_bytes())
    assert main(["run", "--resume", str(a)]) == 2
    assert "eta" in capsys.readouterr().err
    # a corrupted checkpoint, and no previous one to fall back to
    (a / "checkpoint.prev.pt").unlink()
    (a / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["run", "--resume", str(a)]) == 2
    assert "corrupted" in capsys.readouterr().err
    # no checkpoint, not a run directory, settings with --resume
    (a / "checkpoint.pt").unlink()
    assert main(["run", "--resume", str(a)]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["run", "--resume", str(b), "--eta", "0.2"]) == 2
    assert "--eta cannot be combined with --resume" in capsys.readouterr().err


def test_minibatch_run_with_evaluation_batch_resumes_exactly(tmp_path):
    """Minibatch SAM on MNIST with a fixed evaluation batch: the evaluation batch's warm-started
    solver is part of the checkpoint, so an interrupted and resumed run repeats every row."""
    args = [
        "run",
        "mnist",
        "--steps",
        "12",
        "--measure-every",
        "2",
        "--batch-size",
        "50",
        "--eval-batch-size",
        "100",
        *SMALL,
    ]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main([*args, "--out", str(ref)]) == 0
    reference = rows_without_time(ref / "metrics.csv")
    assert all(r["eval_sharpness"] and r["eval_eig_converged"] == "1" for r in reference)
    assert len({r["train_loss"] for r in reference}) == len(reference)  # a new minibatch every step
    run_interrupted(args, out, 5)
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert rows_without_time(out / "metrics.csv") == reference


def test_resume_of_a_run_written_before_newer_settings(tmp_path):
    """A run directory from an earlier samedge (its config.json and checkpoint lack settings added
    since, such as vocab, eval_batch_size and threads) resumes with those settings at their defaults and
    repeats the rows of a run that never stopped."""
    import torch

    args = ["run", "mnist", "--steps", "6", "--measure-every", "2", *SMALL]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main([*args, "--out", str(ref)]) == 0
    run_interrupted(args, out, 3)
    saved = json.loads((out / "config.json").read_text())
    newer = ("vocab", "eval_batch_size", "base", "dampening", "nesterov", "weight_decay", "beta1", "beta2", "eps")
    newer += ("alpha", "threads")
    for key in newer:
        del saved["config"][key]
    (out / "config.json").write_text(json.dumps(saved))
    checkpoint = as_earlier_samedge(torch.load(out / "checkpoint.pt", weights_only=True))
    for key in newer:
        del checkpoint["config"][key]
    for key in ("eval_solver", "digest", "metrics", "adaptive_solvers"):  # format 1 had no digest, no metrics rows
        del checkpoint[key]
    checkpoint["format"] = 1
    torch.save(checkpoint, out / "checkpoint.pt")
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert rows_without_time(out / "metrics.csv") == rows_without_time(ref / "metrics.csv")


MOMENTUM = ["run", "mnist", "--steps", "8", "--measure-every", "2", "--optimizer", "gd", "--eta", "0.05"]
MOMENTUM += ["--momentum", "0.9", *SMALL]


def test_resume_of_a_momentum_run_from_a_velocity_checkpoint(tmp_path):
    """A heavy-ball run whose checkpoint an earlier samedge wrote (format 2: a ``velocity``, no
    update rule) resumes with that velocity as the sgd rule's state and repeats the rows of a run
    that never stopped (a lost velocity would change every row after the checkpoint)."""
    import torch

    from samedge.experiment.store.checkpoint import content_digest

    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main([*MOMENTUM, "--out", str(ref)]) == 0
    run_interrupted(MOMENTUM, out, 5)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["format"] == 3 and checkpoint["rule"] == "sgd"
    assert len(checkpoint["rule_state"]["velocity"]) == len(checkpoint["params"])
    checkpoint = as_earlier_samedge(checkpoint)
    del checkpoint["digest"]
    checkpoint["format"] = 2
    checkpoint["digest"] = content_digest(checkpoint)
    torch.save(checkpoint, out / "checkpoint.pt")
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert rows_without_time(out / "metrics.csv") == rows_without_time(ref / "metrics.csv")
    assert (out / "steps.csv").read_text() == (ref / "steps.csv").read_text()


def test_a_checkpoint_of_another_update_rule_is_refused(tmp_path, capsys):
    import torch

    from samedge.experiment.store.checkpoint import content_digest

    out = tmp_path / "run"
    run_interrupted(MOMENTUM, out, 3)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    del checkpoint["digest"]
    checkpoint["rule"] = "adam"
    checkpoint["digest"] = content_digest(checkpoint)
    torch.save(checkpoint, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 2
    assert "holds the state of update rule 'adam', the run's is 'sgd'" in capsys.readouterr().err
