"""No data lost: guarded --overwrite, complete resumes, verified checkpoints, one writer per run
directory, and environment errors as one line (real files, real processes)."""

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import as_earlier_samedge, rows_without_time

from samedge.errors import CheckpointError, ConfigError, RunDirError
from samedge.experiment.cli import main
from samedge.experiment.config import RunConfig
from samedge.experiment.store.checkpoint import content_digest, read_checkpoint
from samedge.experiment.store.create import create_run_dir
from samedge.experiment.store.lock import RunLock
from samedge.experiment.store.metrics import write_summary

TINY = ["--n-train", "200", "--n-test", "100", "--width", "32", "--depth", "2", "--no-progress", "--no-plots"]
ARGS = ["run", "mnist", "--steps", "30", "--measure-every", "5", "--checkpoint-every", "10", *TINY]


def tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def interrupted(out: Path, step: int) -> None:
    """A run of ARGS into ``out`` stopped by Ctrl-C before the update of ``step``."""
    from test_resume import run_interrupted

    run_interrupted(ARGS, out, step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


# --- 1. --overwrite replaces only a samedge run directory, and only once the new one is set up


def test_overwrite_refuses_a_directory_samedge_did_not_write(tmp_path, capsys):
    p = tmp_path / "p"
    (p / "src").mkdir(parents=True)
    (p / "config.json").write_text("{}")
    (p / "src" / "keep.py").write_text("x = 1\n")
    before = tree(p)
    assert main([*ARGS, "--out", str(p), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "not a samedge run directory" in err and "src/" in err and err.count("\n") == 1
    assert tree(p) == before
    (p / "src" / "keep.py").unlink()
    (p / "src").rmdir()
    assert main([*ARGS, "--out", str(p), "--overwrite"]) == 2  # config.json without a 'config' object
    assert "was not written by samedge" in capsys.readouterr().err
    assert (p / "config.json").read_text() == "{}"


@pytest.mark.slow
def test_failed_overwrite_leaves_the_old_run_intact(tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = tree(out)
    import samedge.experiment.store.layout as rundir

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "somewhere"))

    monkeypatch.setattr(rundir, "write_json", full_disk)
    assert main([*ARGS, "--out", str(out), "--overwrite"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("samedge: error: No space left on device") and err.count("\n") == 1
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging directory left


@pytest.mark.slow
def test_overwrite_replaces_a_run_and_symlinks_are_refused(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "metrics.csv").write_text("stale\n")
    assert main([*ARGS, "--out", str(out), "--overwrite"]) == 0
    assert rows_without_time(out / "metrics.csv") == rows_without_time(reference / "metrics.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    link = tmp_path / "link"
    link.symlink_to(out)
    capsys.readouterr()
    assert main([*ARGS, "--out", str(link), "--overwrite"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert (out / "metrics.csv").exists()


@pytest.mark.slow
def test_overwrite_under_a_read_only_parent_keeps_the_old_run(tmp_path, reference):
    """As root, dropped capabilities make a mode-555 parent really read-only."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    parent = tmp_path / "q"
    parent.mkdir()
    out = parent / "run"
    shutil.copytree(reference, out)
    before = tree(out)
    parent.chmod(0o555)
    try:
        cmd = [sys.executable, "-m", "samedge", *ARGS, "--out", str(out), "--overwrite"]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        parent.chmod(0o755)
    if proc.returncode == 0:
        pytest.skip("the parent directory could not be made read-only here")
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr and "Permission denied" in proc.stderr
    assert tree(out) == before
    assert sorted(p.name for p in parent.iterdir()) == ["run"]


# --- 2. a resume restores metrics.csv exactly, or refuses naming the missing steps


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "cut inside a row", "row edited"])
def test_resume_restores_a_missing_or_damaged_metrics_file(tmp_path, reference, damage, capsys):
    out = tmp_path / "run"
    interrupted(out, 22)
    path = out / "metrics.csv"
    if damage == "deleted":
        path.unlink()
    elif damage == "cut inside a row":
        text = path.read_bytes()
        lines = text.split(b"\n")
        path.write_bytes(text[: sum(len(x) + 1 for x in lines[:2]) + len(lines[2]) // 2])
    else:
        path.write_text(path.read_text().replace("\n5,", "\n5.5,", 1))
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert "restored its 5 rows before step 22 from the checkpoint" in capsys.readouterr().err
    assert rows_without_time(path) == rows_without_time(reference / "metrics.csv")
    assert json.loads((out / "summary.json").read_text())["final_step"] == 30


@pytest.mark.slow
def test_finished_run_with_its_last_row_cut_is_restored(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    summary = (out / "summary.json").read_text()
    text = (out / "metrics.csv").read_bytes()
    (out / "metrics.csv").write_bytes(text[: len(text) - 20])
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert (out / "metrics.csv").read_bytes() == text
    assert json.loads((out / "summary.json").read_text())["final_step"] == json.loads(summary)["final_step"] == 30


@pytest.mark.slow
def test_legacy_checkpoint_with_rows_missing_is_refused(tmp_path, capsys):
    """A checkpoint of an earlier samedge carries no rows: missing ones are named, nothing changes."""
    out = tmp_path / "run"
    interrupted(out, 22)
    payload = as_earlier_samedge(torch.load(out / "checkpoint.pt", weights_only=True))
    del payload["digest"], payload["metrics"]
    payload["format"] = 1
    torch.save(payload, out / "checkpoint.pt")
    lines = (out / "metrics.csv").read_text().split("\n")
    (out / "metrics.csv").write_text("\n".join(lines[:1] + lines[3:]))  # drop the rows of steps 0 and 5
    before = tree(out)
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lacks the rows of steps 0, 5" in err and err.count("\n") == 1
    assert {k: v for k, v in tree(out).items() if k != "run.lock"} == {
        k: v for k, v in before.items() if k != "run.lock"
    }


def test_summary_is_never_rewritten_from_fewer_rows(tmp_path):
    path = tmp_path / "summary.json"
    assert write_summary(path, {"measurements": 7, "final_step": 30})
    assert not write_summary(path, {"measurements": 3, "final_step": 10})
    assert json.loads(path.read_text()) == {"measurements": 7, "final_step": 30}
    assert write_summary(path, {"measurements": 7, "final_step": 31})
    assert json.loads(path.read_text())["final_step"] == 31


# --- 3. verified checkpoints: a digest, checked on load; fall back to the previous one


def flip_a_parameter_bit(path: Path) -> None:
    """Flip one bit inside the bytes of the first parameter tensor as stored in the file."""
    first = torch.load(path, weights_only=True)["params"][0]
    data = bytearray(path.read_bytes())
    at = bytes(data).find(first.numpy().tobytes())
    assert at > 0
    data[at + 101] ^= 0x10
    path.write_bytes(bytes(data))


def test_digest_covers_every_tensor_byte_and_value():
    payload = {"a": [torch.arange(4.0)], "b": 1.5, "c": None}
    digest = content_digest(payload)
    assert digest == content_digest({"c": None, "b": 1.5, "a": [torch.arange(4.0)]})
    flipped = torch.arange(4.0)
    flipped.view(torch.int32)[2] ^= 1  # one bit of one float
    assert content_digest({**payload, "a": [flipped]}) != digest
    assert content_digest({**payload, "b": 1.5000000000000002}) != digest
    assert content_digest({**payload, "a": [torch.arange(4.0, dtype=torch.float64)]}) != digest


@pytest.mark.slow
def test_a_flipped_bit_is_caught_and_the_previous_checkpoint_used(tmp_path, reference, capsys):
    out = tmp_path / "run"
    interrupted(out, 22)
    path = out / "checkpoint.pt"
    flip_a_parameter_bit(path)
    damaged = path.read_bytes()
    with pytest.raises(CheckpointError, match="corrupted: its content does not match its SHA-256 digest"):
        read_checkpoint(path)
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "kept it as checkpoint.pt.corrupt and resumed from checkpoint.prev.pt (step 20)" in err
    assert (out / "checkpoint.pt.corrupt").read_bytes() == damaged
    assert rows_without_time(out / "metrics.csv") == rows_without_time(reference / "metrics.csv")


@pytest.mark.slow
def test_damaged_checkpoint_without_a_good_one_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    interrupted(out, 22)
    (out / "checkpoint.prev.pt").unlink()
    flip_a_parameter_bit(out / "checkpoint.pt")
    before = tree(out)
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert tree(out)["checkpoint.pt"] == before["checkpoint.pt"]
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    del payload["params"]  # a checkpoint without params
    torch.save(payload, out / "checkpoint.pt")
    assert main(["run", "--resume", str(out)]) == 2
    assert "has no 'params'" in capsys.readouterr().err


# --- 4. one writer per run directory


@pytest.mark.slow
def test_a_locked_directory_is_refused_naming_the_holder(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import time
                from pathlib import Path
                from samedge.experiment.store.lock import RunLock
                lock = RunLock(Path({str(out)!r}))
                print("locked", flush=True)
                time.sleep(60)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
            RunLock(out)
        for argv in (["run", "--resume", str(out)], [*ARGS, "--out", str(out), "--overwrite"]):
            capsys.readouterr()
            assert main(argv) == 2
            assert f"in use by another samedge process (pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(out).release()  # the OS dropped the killed holder's lock


def _start(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        lock = create_run_dir(
            Path(path), setup=lambda d: (d / "config.json").write_text(f'{{"config": {{"pid": {os.getpid()}}}}}')
        )
        time.sleep(0.5)  # hold it as a run would
        lock.release()
        results.put("ok")
    except RunDirError as err:
        results.put(str(err))


@pytest.mark.slow
def test_simultaneous_starts_leave_exactly_one_writer(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for trial in range(3):
        path = tmp_path / f"run{trial}"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_start, args=(str(path), barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        outcomes = [results.get(timeout=5) for _ in procs]
        assert outcomes.count("ok") == 1, outcomes
        assert all("in use by another" in o or "already exists" in o for o in outcomes if o != "ok")


# --- 5. environment errors and settings the dtype cannot hold


def test_eta_overflowing_the_dtype_is_refused_before_any_file(tmp_path, capsys):
    with pytest.raises(ConfigError, match="cannot be represented in float32"):
        RunConfig(eta=1e39)
    assert RunConfig(eta=1e39, dtype="float64").eta == 1e39
    with pytest.raises(ConfigError, match="'rho'"):
        RunConfig(rho=1e-45)
    assert main([*ARGS, "--eta", "1e39", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_malformed_run_files_are_one_line_errors(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "config.json").write_text('{"config": null}')
    assert main(["run", "--resume", str(out)]) == 2
    (out / "config.json").write_text("[]")
    assert main(["plot", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("samedge: error:") == 2 and "Traceback" not in err


@pytest.mark.slow
def test_full_disk_is_a_clean_error_without_temporary_files(tmp_path):
    """A 300 kB tmpfs in a private mount namespace: the second checkpoint does not fit."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no private mount namespaces here (unshare -rm failed)")
    script = (
        f"mount -t tmpfs -o size=300k tmpfs {mnt} && "
        # without the secant pairs (2 MB), so that exactly the second checkpoint does not fit
        f"{sys.executable} -m samedge {' '.join(ARGS)} --secant-pairs 0 --out {mnt}/run; "
        f'echo "rc=$?"; ls -a {mnt}/run; cat {mnt}/run/metrics.csv | wc -l'
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=180)
    out = proc.stdout.split()
    assert "rc=4" in out, proc.stdout + proc.stderr
    assert "No space left on device" in proc.stderr and "Traceback" not in proc.stderr
    assert not [name for name in out if name.endswith(".tmp")]  # no stale temporary file
    assert "checkpoint.pt" in out and "config.json" in out
