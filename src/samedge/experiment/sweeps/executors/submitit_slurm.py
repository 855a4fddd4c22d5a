"""The ``submitit`` executor: the points as one SLURM job array through submitit (extra
``samedge[slurm]``), or, with the same code, as processes on this machine (``--submitit-cluster
local``) or in this process (``debug``).

Each job runs :func:`~samedge.experiment.sweeps.point.execute_point` on one point, which decides
from the run directory alone whether to skip, resume or start it; so a job may be run twice, be
requeued or be killed at any moment, and the next attempt continues from the run's checkpoint.

**Preemption and the time limit.**  In a job, SIGTERM, SIGUSR1 and submitit's own signal (USR2,
which submitit asks SLURM to send 90 s before the time limit and, with ``PreemptParameters=
send_user_signal``, on preemption) interrupt the run as Ctrl-C does: it writes a checkpoint at the
step it is at and stops.  After submitit's signal (or SIGUSR1) the job is then requeued through
submitit (``scontrol requeue``; the local cluster restarts it) and resumes from that checkpoint,
at most :data:`MAX_REQUEUES` times after a time limit.  After SIGTERM alone the job only ends:
SLURM requeues a job it preempts in ``PreemptMode=REQUEUE`` itself, and a ``scancel`` stays a
cancel; calling the sweep again resumes such a run.

**Waiting or not.**  By default the call waits for its jobs and reports each as it ends; with
``--no-wait`` it submits them and returns (their points are ``submitted`` in ``sweep.csv``).
The sweep directory keeps ``.submitit/``: one folder per submission (submitit's pickles and each
job's logs) and ``jobs.json`` (each point's last job).  A later call attaches to the jobs still
queued or running instead of submitting them again, collects those that ended with an outcome
(a failed or broken run is reported once, with its log, then retried by the call after), and
submits again the points whose job ended without one (killed): their runs resume.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import importlib.util
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from samedge.errors import ConfigError
from samedge.experiment.store.files import read_json_object, write_json
from samedge.experiment.sweeps.executors.base import Executor, Reporter
from samedge.experiment.sweeps.point import describe_bug, execute_point
from samedge.experiment.sweeps.spec import SweepPoint

__all__ = ["SubmititExecutor", "PointJob", "SUBMITIT_INSTALL_HINT", "MAX_REQUEUES", "JOBS_DIR", "parse_slurm_time"]

SUBMITIT_INSTALL_HINT = (
    '--executor submitit needs submitit: pip install -c constraints.txt -e ".[slurm]" '
    "(or pip install 'samedge[slurm]')"
)
#: how many times a job that reached its time limit is requeued (preemptions are not counted)
MAX_REQUEUES = 20
#: the sweep directory's folder of submissions, logs and ``jobs.json``
JOBS_DIR = ".submitit"
#: how long the result of a SLURM job that ended may take to show on a shared file system
RESULT_GRACE_S = 15.0
CLUSTERS = ("slurm", "local", "debug")
DEFAULT_TIME = "24:00:00"
#: sbatch options that have their own flag, or that submitit sets itself
_OWN_FLAGS = {
    "partition": "--slurm-partition",
    "time": "--slurm-time",
    "cpus-per-task": "--slurm-cpus-per-task",
    "gpus-per-node": "--slurm-gpus-per-node",
}
_SUBMITIT_SETS = ("array", "output", "error", "open-mode", "wckey")


def parse_slurm_time(text: str) -> int:
    """A SLURM time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in
    whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if m is None:
        raise ConfigError(f"--slurm-time {text!r}: expected MINUTES, HH:MM:SS or D-HH:MM:SS (SLURM's formats)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    assert a is not None
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + (b or 0) * 60 + c
    else:  # MM[:SS]
        seconds = a * 60 + (b or 0)
    if seconds < 60:
        raise ConfigError(f"--slurm-time {text!r} is under a minute")
    return math.ceil(seconds / 60)


def _parse_params(items: Sequence[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", key) or not value.strip():
            raise ConfigError(f"--slurm-param {item!r}: expected KEY=VALUE, an sbatch option (for example account=lab)")
        if key in _OWN_FLAGS:
            raise ConfigError(f"--slurm-param {key}=...: use {_OWN_FLAGS[key]}")
        if key in _SUBMITIT_SETS:
            raise ConfigError(f"--slurm-param {key}=...: submitit sets --{key} of the job array itself")
        if key in params:
            raise ConfigError(f"--slurm-param {key} is given twice")
        params[key] = value.strip()
    return params


class SubmititExecutor(Executor):
    name = "submitit"
    summary = "one SLURM job array through submitit, or --submitit-cluster local|debug (samedge[slurm])"

    def __init__(
        self,
        cluster: str = "slurm",
        partition: str | None = None,
        time_limit: str = DEFAULT_TIME,
        cpus_per_task: int | None = None,
        gpus_per_node: int | None = None,
        array_parallelism: int | None = None,
        params: Sequence[str] = (),
        wait: bool = True,
        threads: int = 1,
    ):
        self.cluster = cluster
        self.partition = partition
        self.time_limit = time_limit
        self.cpus_per_task = cpus_per_task
        self.gpus_per_node = gpus_per_node
        self.array_parallelism = array_parallelism
        self.params = list(params)
        self.wait = wait
        self.threads = threads
        self.poll_s = 0.2 if cluster == "local" else 5.0

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--submitit-cluster",
            choices=CLUSTERS,
            default="slurm",
            help="submitit: slurm (default), local (processes on this machine) or debug (in this process)",
        )
        parser.add_argument("--slurm-partition", metavar="NAME", help="submitit: the SLURM partition")
        parser.add_argument(
            "--slurm-time",
            metavar="TIME",
            default=DEFAULT_TIME,
            help=f"submitit: time limit of each job (SLURM's formats; default {DEFAULT_TIME}); a job at its limit "
            "checkpoints and is requeued",
        )
        parser.add_argument(
            "--slurm-cpus-per-task", type=int, metavar="N", help="submitit: CPUs per job (default --threads-per-run)"
        )
        parser.add_argument("--slurm-gpus-per-node", type=int, metavar="N", help="submitit: GPUs per job (default 0)")
        parser.add_argument(
            "--slurm-array-parallelism", type=int, metavar="N", help="submitit: most jobs of the array running at once"
        )
        parser.add_argument(
            "--slurm-param",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="submitit: another sbatch option (repeat), for example account=lab or qos=high",
        )
        parser.add_argument(
            "--no-wait",
            action="store_true",
            help="submitit: submit and return; the same command later collects what finished",
        )

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> SubmititExecutor:
        return cls(
            cluster=args.submitit_cluster,
            partition=args.slurm_partition,
            time_limit=args.slurm_time,
            cpus_per_task=args.slurm_cpus_per_task,
            gpus_per_node=args.slurm_gpus_per_node,
            array_parallelism=args.slurm_array_parallelism,
            params=args.slurm_param,
            wait=not args.no_wait,
            threads=getattr(args, "threads_per_run", 1),
        )

    def check(self) -> None:
        if importlib.util.find_spec("submitit") is None:
            raise ConfigError(SUBMITIT_INSTALL_HINT)
        if self.cluster not in CLUSTERS:
            raise ConfigError(f"unknown --submitit-cluster {self.cluster!r}; choose one of {', '.join(CLUSTERS)}")
        parse_slurm_time(self.time_limit)
        _parse_params(self.params)
        for flag, value, least in (
            ("--slurm-cpus-per-task", self.cpus_per_task, 1),
            ("--slurm-gpus-per-node", self.gpus_per_node, 0),
            ("--slurm-array-parallelism", self.array_parallelism, 1),
        ):
            if value is not None and value < least:
                raise ConfigError(f"{flag} must be >= {least}, got {value}")
        if self.cpus_per_task is not None and self.cpus_per_task < self.threads:
            raise ConfigError(f"--slurm-cpus-per-task {self.cpus_per_task} is below --threads-per-run {self.threads}")
        if self.cluster == "debug" and not self.wait:
            raise ConfigError(
                "--no-wait needs jobs that run by themselves: --submitit-cluster slurm or local, not debug"
            )
        if self.cluster == "slurm":
            missing = [c for c in ("sbatch", "srun", "sacct") if shutil.which(c) is None]
            if missing:
                raise ConfigError(
                    f"--submitit-cluster slurm needs SLURM's {', '.join(missing)} on PATH (run on a login node); "
                    "--submitit-cluster local runs the jobs on this machine"
                )

    # --- the sweep's side: submit, attach, wait, collect ----------------------------------------

    def _executor(self, folder: Path, threads: int, job_name: str) -> Any:
        import submitit

        executor = submitit.AutoExecutor(
            folder=folder,
            cluster=self.cluster,
            slurm_max_num_timeout=MAX_REQUEUES,
            local_max_num_timeout=MAX_REQUEUES,
        )
        options: dict[str, Any] = {
            "name": job_name,
            "timeout_min": parse_slurm_time(self.time_limit),
            "cpus_per_task": self.cpus_per_task or threads,
        }
        if self.gpus_per_node is not None:
            options["gpus_per_node"] = self.gpus_per_node
        if self.cluster == "slurm":
            if self.partition:
                options["slurm_partition"] = self.partition
            if self.array_parallelism is not None:
                options["slurm_array_parallelism"] = self.array_parallelism
            params = _parse_params(self.params)
            if params:
                options["slurm_additional_parameters"] = params
        executor.update_parameters(**options)
        return executor

    def run(self, out: Path, points: Sequence[SweepPoint], threads: int, progress: bool, reporter: Reporter) -> None:
        if importlib.util.find_spec("submitit") is None:
            raise ConfigError(SUBMITIT_INSTALL_HINT)
        if not points:
            return
        book = _JobBook(out / JOBS_DIR)
        attached: list[tuple[SweepPoint, _Job]] = []
        with book.locked():
            records = book.read()
            resubmit: list[SweepPoint] = []
            earlier: list[tuple[SweepPoint, _Job]] = []
            for p in points:
                rec = records.get(p.name)
                if rec is None or rec.get("collected") or rec["cluster"] == "debug":
                    resubmit.append(p)
                else:
                    earlier.append((p, _Job.from_record(out / JOBS_DIR, rec)))
            _refresh_slurm_states([job for _, job in earlier])
            for p, job in earlier:
                if job.poll() != "ended":
                    attached.append((p, job))
                    continue
                outcome = job.outcome()
                if outcome is not None and outcome["status"] in ("failed", "error"):
                    reporter.finished(p, outcome)  # reported once; the call after retries the point
                    records[p.name]["collected"] = True
                    continue
                if outcome is None:
                    print(
                        f"samedge: note: {job.describe()} of {p.name} ended without a result{job.last_state()}; "
                        f"its log: {job.log}; submitting it again (the run resumes from its checkpoint)",
                        file=sys.stderr,
                    )
                resubmit.append(p)
            submitted = self._submit(out, resubmit, threads, progress, book) if resubmit else []
            for p, job in submitted:
                records[p.name] = job.record(book.folder)
            book.write(records)
        jobs = attached + submitted
        if progress and jobs:
            what = f"{len(submitted)} submitted" + (f", {len(attached)} already queued or running" if attached else "")
            where = f"; logs in {submitted[0][1].folder}" if submitted else ""
            print(f"sweep: {len(jobs)} jobs on {self.cluster} ({what}){where}", file=sys.stderr, flush=True)
        if not self.wait:
            for p, job in jobs:
                reporter.submitted(p, job.describe())
            return
        try:
            self._wait(jobs, reporter, book)
        except KeyboardInterrupt:
            if any(job.cluster == "slurm" for _, job in jobs):
                print(
                    "samedge: stopped waiting; the SLURM jobs run on: the same command again waits for them",
                    file=sys.stderr,
                )
            raise

    def _submit(
        self, out: Path, points: Sequence[SweepPoint], threads: int, progress: bool, book: _JobBook
    ) -> list[tuple[SweepPoint, _Job]]:
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        folder = book.new_submission()
        executor = self._executor(folder, threads, f"samedge-{out.name}")
        fns = [PointJob(p.settings(), str(out / p.name), threads, progress) for p in points]
        try:
            with _output_to(folder / "controllers.log") if self.cluster == "local" else contextlib.nullcontext():
                jobs = executor.submit_array(fns)
        except (FailedJobError, FailedSubmissionError) as err:  # sbatch refused: a partition, a time limit, an account
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            detail = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
            raise ConfigError(f"{self.cluster} refused the job array: {detail.strip()}") from None
        return [(p, _Job(self.cluster, str(j.job_id), folder, j)) for p, j in zip(points, jobs)]

    def _wait(self, jobs: list[tuple[SweepPoint, _Job]], reporter: Reporter, book: _JobBook) -> None:
        for p, job in jobs:
            if job.cluster == "debug":  # in this process, one after another
                reporter.started()
                reporter.finished(p, job.run_here())
        pending = [(p, job) for p, job in jobs if job.cluster != "debug"]
        while pending:
            still: list[tuple[SweepPoint, _Job]] = []
            for p, job in pending:
                state = job.poll()
                if state == "running" and not job.started:
                    job.started = True
                    reporter.started()
                elif state == "ended":
                    outcome = job.outcome()
                    if outcome is None:
                        outcome = {
                            "status": "error",
                            "reason": f"{job.describe()} ended without a result{job.last_state()}; "
                            f"log: {job.log} (the same command again resumes the run)",
                        }
                    if not job.started:
                        reporter.started()
                    reporter.finished(p, outcome)
                    book.mark_collected(p.name, job.job_id)
                    continue
                still.append((p, job))
            pending = still
            if pending:
                time.sleep(self.poll_s)


class _Job:
    """A submitted job as the sweep sees it: queued, running or ended, and its outcome if it left one."""

    #: a job sacct does not know this long after its submission is looked for with squeue
    UNKNOWN_AFTER_S = 60.0

    def __init__(self, cluster: str, job_id: str, folder: Path, handle: Any = None, since: float | None = None):
        from submitit.core.utils import JobPaths

        self.cluster, self.job_id, self.folder = cluster, job_id, folder
        self.handle = handle  # the submitit job; None for a local job another call started
        self.since = time.time() if since is None else since
        self.paths = JobPaths(folder, job_id=job_id, task_id=0)
        self.log = self.paths.stderr
        self.started = False
        self._state = ""

    @classmethod
    def from_record(cls, jobs_dir: Path, rec: dict[str, Any]) -> _Job:
        folder = jobs_dir / rec["folder"]
        handle: Any = None
        if rec["cluster"] == "slurm":
            import submitit

            handle = submitit.SlurmJob(folder=folder, job_id=rec["job_id"])
        return cls(rec["cluster"], rec["job_id"], folder, handle, float(rec.get("submitted_at", 0.0)))

    def record(self, jobs_dir: Path) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "cluster": self.cluster,
            "folder": str(self.folder.relative_to(jobs_dir)),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.since)),
            "submitted_at": self.since,
            "collected": False,
        }

    def describe(self) -> str:
        return f"{self.cluster} job {self.job_id}"

    def last_state(self) -> str:
        return f" ({self._state})" if self._state else ""

    def poll(self) -> str:
        """``queued``, ``running`` or ``ended``."""
        if self.paths.result_pickle.exists():
            return "ended"
        if self.cluster == "local":
            process = getattr(self.handle, "_process", None)
            if process is not None:
                return "running" if process.poll() is None else "ended"
            return "running" if _local_controller_alive(self.job_id, self.folder) else "ended"
        if self.cluster == "slurm":
            state = str(self.handle.state).upper()  # sacct, through submitit's shared watcher
            self._state = state
            if state == "UNKNOWN" and time.time() - self.since > self.UNKNOWN_AFTER_S:
                listed = _SQUEUE.job_ids()
                if listed is not None and self.job_id not in listed:
                    self._state = "not in sacct or squeue"
                    return "ended"
            if not self.handle.watcher.is_done(self.job_id, mode="cache"):
                return "running" if state in ("RUNNING", "COMPLETING") else "queued"
            return "ended"
        return "ended"

    def outcome(self) -> dict[str, Any] | None:
        """The point's outcome as the job returned it; ``None`` if the job ended without one."""
        from submitit.core.utils import pickle_load

        deadline = time.time() + (RESULT_GRACE_S if self.cluster == "slurm" else 0.0)
        while not self.paths.result_pickle.exists() and time.time() < deadline:
            time.sleep(1.0)
        try:
            kind, value = pickle_load(self.paths.result_pickle)
        except FileNotFoundError:
            return None
        except Exception as err:  # a damaged result file
            return {"status": "error", "reason": f"{self.describe()}: unreadable result ({err}); log: {self.log}"}
        if kind != "success":
            last = [ln for ln in str(value).splitlines() if ln.strip()][-1:] or [""]
            return {"status": "error", "reason": f"{self.describe()} raised {last[0].strip()}; log: {self.log}"}
        outcome = dict(value)
        if outcome.get("status") == "error":
            outcome["reason"] = f"{outcome.get('reason', '')}; log: {self.log}"
        return outcome

    def run_here(self) -> dict[str, Any]:
        """A ``debug`` job: run now, in this process."""
        return self.handle.result()


def _refresh_slurm_states(jobs: Sequence[_Job]) -> None:
    """One sacct call for the SLURM jobs of an earlier call (submitit's watcher asks for all it knows)."""
    slurm = [job for job in jobs if job.cluster == "slurm"]
    if slurm:
        slurm[0].handle.watcher.update()


class _Squeue:
    """The ids of this user's jobs that squeue lists (array tasks one by one), asked at most every 30 s."""

    def __init__(self) -> None:
        self.at = -math.inf
        self.ids: set[str] | None = None

    def job_ids(self) -> set[str] | None:
        if time.time() - self.at > 30.0:
            self.at = time.time()
            try:
                done = subprocess.run(
                    ["squeue", "-h", "-r", "-o", "%i", "-u", getpass.getuser()],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            except (OSError, subprocess.TimeoutExpired):
                self.ids = None
            else:
                self.ids = set(done.stdout.split()) if done.returncode == 0 else None
        return self.ids


_SQUEUE = _Squeue()


def _local_controller_alive(job_id: str, folder: Path) -> bool:
    """Whether the local job ``job_id`` (its controller's process id) still runs: that process
    exists and is submitit's controller of ``folder`` (not a later process given the same id)."""
    try:
        pid = int(job_id)
    except ValueError:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: the process id alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return b"submitit.local._local" in cmdline and str(folder).encode() in cmdline


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """File descriptors 1 and 2 to ``path`` meanwhile: the local cluster's controllers, started
    now, inherit them, and would otherwise hold this command's output (a pipe) open."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no standard output to keep
        yield
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


class _JobBook:
    """``.submitit/jobs.json``: each point's last job; one folder per submission beside it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "jobs.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while a call decides what to submit: two calls on one sweep directory submit each point once."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / "submit.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        jobs = read_json_object(self.path, "record of jobs").get("jobs", {})
        return {k: v for k, v in jobs.items() if isinstance(v, dict) and {"job_id", "cluster", "folder"} <= set(v)}

    def write(self, records: dict[str, dict[str, Any]]) -> None:
        write_json(self.path, {"format": 1, "jobs": records})

    def mark_collected(self, name: str, job_id: str) -> None:
        with self.locked():
            records = self.read()
            if name in records and records[name]["job_id"] == job_id:
                records[name]["collected"] = True
                self.write(records)

    def new_submission(self) -> Path:
        taken = [int(p.name) for p in self.folder.iterdir() if p.is_dir() and p.name.isdigit()]
        folder = self.folder / str(max(taken, default=0) + 1)
        folder.mkdir()
        return folder


# --- the job's side ------------------------------------------------------------------------------


class PointJob:
    """One point as a submitit job (pickled into the job): runs the point in the job's process;
    on the scheduler's signal, checkpoints the run and has submitit requeue the job
    (:meth:`checkpoint` is submitit's hook: the requeued job runs this same object again)."""

    def __init__(self, settings: dict[str, Any], run_dir: str, threads: int, progress: bool):
        self.settings, self.run_dir, self.threads, self.progress = settings, run_dir, threads, progress

    def __call__(self) -> dict[str, Any]:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(self.threads)
        guard = _Preemption() if _in_scheduled_job() else None
        try:
            with guard if guard is not None else contextlib.nullcontext():
                try:
                    if guard is not None:
                        guard.enter_run()
                    return execute_point(self.settings, self.run_dir, self.threads, self.progress)
                finally:
                    if guard is not None:
                        guard.running = False
        except KeyboardInterrupt:
            if guard is None or not guard.received:
                raise  # Ctrl-C (the local cluster shares the terminal): stop like the serial sweep
            guard.stop()
        except Exception as err:  # a samedge bug in this run: its traceback goes to the job's log
            traceback.print_exc()
            return {"status": "error", "reason": describe_bug(err)}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook: the same point again (it resumes from the run's checkpoint)."""
        from submitit.core.utils import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def _in_scheduled_job() -> bool:
    """A submitit job process of SLURM or of the local cluster (not ``debug``, which runs in the
    sweep's own process), in its main thread (where signal handlers live)."""
    return (
        os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local")
        and "SUBMITIT_DEBUG_JOB_ID" not in os.environ
        and threading.current_thread() is threading.main_thread()
    )


class _Preemption:
    """In a job: SIGTERM, SIGUSR1 and submitit's signal interrupt the run once, as Ctrl-C does
    (the run checkpoints at the step it is at); :meth:`stop` then requeues or ends the job."""

    def __init__(self) -> None:
        from submitit.core.job_environment import JobEnvironment

        self.requeue_signal = getattr(signal, "SIG" + JobEnvironment.USR_SIG, signal.SIGUSR2)
        self.signals = {signal.SIGTERM, signal.SIGUSR1, self.requeue_signal}
        self.received: list[int] = []
        self.running = False
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> _Preemption:
        for s in self.signals:
            self.saved[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        first = not self.received
        self.received.append(signum)
        what = ": checkpointing the run" if first and self.running else ""
        # os.write, not print: the run may be inside a write to stderr (its progress lines)
        os.write(2, f"samedge: job got {signal.Signals(signum).name}{what}\n".encode())
        if first and self.running:
            raise KeyboardInterrupt

    def enter_run(self) -> None:
        if self.received:  # a signal before the run began: nothing to checkpoint
            raise KeyboardInterrupt
        self.running = True

    def stop(self) -> NoReturn:
        """After the checkpoint: requeue through submitit (its signal or SIGUSR1), or end (SIGTERM)."""
        handler = self.saved.get(self.requeue_signal)
        if any(s != signal.SIGTERM for s in self.received) and callable(handler):
            print("samedge: requeueing the job; it resumes from the checkpoint", file=sys.stderr, flush=True)
            handler(self.requeue_signal, None)  # submitit: our checkpoint(), requeue, exit
        name = signal.Signals(self.received[0]).name
        print(f"samedge: job ended by {name} after its checkpoint, not requeued", file=sys.stderr, flush=True)
        sys.exit(128 + self.received[0])
