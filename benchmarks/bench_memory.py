"""Peak memory of full-batch sums is governed by the chunk size (CIFAR-10 CNN).

Every configuration runs in a fresh subprocess, so its peak resident set size (RSS) is its own.
The subprocess builds the ``cifar10`` task (the default preset's CNN) with ``n_train`` images in
chunks of ``chunk_size``, records its RSS (the baseline: Python, torch, the data and the model),
then computes one gradient and one exact Hessian-vector product (HVP) over the whole training set
and records the peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``).  The figure reported is
the **increment** ``peak - baseline``: the memory that the computation itself needed.

Before the computation the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``, Linux >= 4.0)
so that a transient peak while loading the data does not hide the computation's peak; where the
reset is not available the table says so (the increment is then a lower bound).

Compared:

* (a) all ``N`` images in chunks of ``C`` against (b) one chunk alone (``n_train = C``): the
  chunked full-batch sum should need about what one chunk needs (target (a)/(b) <= 2);
* unchunked ``N`` against unchunked ``C``: without chunks the memory grows with ``N`` (contrast).

It also checks that chunked and unchunked loss, gradient and HVP agree (relative error).

    python benchmarks/bench_memory.py --data DIR              # prints a markdown report
    python benchmarks/bench_memory.py --data DIR --write      # also writes benchmarks/MEMORY.md

``DIR`` holds CIFAR-10 (``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``; default
``data/cifar10``, where ``samedge download cifar10`` puts it); it needs at least ``N`` training
images (default 1000).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from _report import machine, publish  # benchmarks/_report.py (the script's folder is on sys.path)

MIB = 1024 * 1024


def _rss_bytes() -> int:
    """Current resident set size (Linux ``/proc/self/statm``; else the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _maxrss_bytes()


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); True if it worked."""
    try:
        before = _maxrss_bytes()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _maxrss_bytes() <= before
    except OSError:
        return False


def child(data: str, n_train: int, chunk_size: int | None, threads: int | None) -> dict:
    """One configuration, in this (fresh) process."""
    import gc

    import torch

    from samedge.experiment import build_config, build_task

    if threads:
        torch.set_num_threads(threads)
    # chunk_size=None would fall back to the preset's chunk size: n_train means one chunk
    cfg = build_config(
        "cifar10", overrides=dict(data=data, n_train=n_train, n_test=1, chunk_size=chunk_size or n_train)
    )
    task = build_task(cfg)
    obj = task.train
    params = obj.parameters()
    gen = torch.Generator().manual_seed(0)
    vector = tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params)
    gc.collect()
    reset = _reset_peak()
    baseline = _rss_bytes()
    peak_before = _maxrss_bytes()
    ev = obj.loss_and_grad(params)
    after_grad = _maxrss_bytes()
    hv = obj.hvp(params, vector)
    peak = _maxrss_bytes()
    assert torch.isfinite(torch.cat([h.flatten() for h in hv])).all() and ev.grad is not None
    return {
        "n_train": n_train,
        "chunk_size": chunk_size or n_train,
        "chunks": len(obj.chunks),
        "baseline_mib": baseline / MIB,
        "peak_mib": peak / MIB,
        "grad_increment_mib": max(after_grad - baseline, 0) / MIB,
        "increment_mib": max(peak - baseline, 0) / MIB,
        "peak_reset": reset,
        "peak_before_computation_mib": peak_before / MIB,
        "threads": torch.get_num_threads(),
    }


def measure(data: str, n_train: int, chunk_size: int | None, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--data", data, "--n", str(n_train), "--chunk", str(chunk_size or 0)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child {cmd} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def equivalence(data: str, n_train: int, chunk_size: int) -> dict:
    """Max relative error (norm of the difference / norm) of chunked vs unchunked loss, gradient, HVP."""
    import torch

    from samedge.core.objective import Objective
    from samedge.core.params import flatten
    from samedge.experiment import build_config, build_task

    cfg = build_config("cifar10", overrides=dict(data=data, n_train=n_train, n_test=1, chunk_size=n_train))
    task = build_task(cfg)
    whole = task.train
    ((x, y),) = whole.chunks
    chunked = Objective.from_tensors(whole.model, whole.loss_fn, x, y, chunk_size)
    gen = torch.Generator().manual_seed(1)
    params = whole.parameters()
    vector = tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params)

    def rel(a, b) -> float:
        a, b = flatten(a).double(), flatten(b).double()
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))

    e_whole, e_chunked = whole.loss_and_grad(params), chunked.loss_and_grad(params)
    return {
        "chunks": len(chunked.chunks),
        "loss": abs(e_chunked.loss - e_whole.loss) / abs(e_whole.loss),
        "grad": rel(e_chunked.grad, e_whole.grad),
        "hvp": rel(chunked.hvp(params, vector), whole.hvp(params, vector)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/cifar10", help="CIFAR-10 directory or archive")
    parser.add_argument("--n", type=int, default=1000, help="training images of the full-batch sum")
    parser.add_argument("--chunk", type=int, default=100, help="chunk size C")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the subprocesses")
    parser.add_argument("--write", action="store_true", help="write benchmarks/MEMORY.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.data, args.n, args.chunk or None, args.threads)))
        return

    n, c = args.n, args.chunk
    runs = {
        "a": measure(args.data, n, c, args.threads),  # N images in chunks of C
        "b": measure(args.data, c, None, args.threads),  # one chunk of C alone
        "whole_n": measure(args.data, n, None, args.threads),  # N images, unchunked
    }
    runs["whole_c"] = runs["b"]  # unchunked C is configuration (b)
    eq = equivalence(args.data, n, c)

    lines: list[str] = []
    say = lines.append
    say(f"Machine: {machine()}.")
    say("")
    say(
        f"CIFAR-10 CNN of the `cifar10` preset ({n} training images at most), one gradient and one exact HVP "
        "(double-backward) over the whole training set, each configuration in a fresh subprocess. "
        "*Increment* = peak RSS (`ru_maxrss`) minus the RSS after building the task and data."
    )
    say("")
    say(
        "| configuration | images | chunk size | chunks | baseline RSS (MiB) | peak RSS (MiB) | increment after gradient (MiB) | increment after gradient + HVP (MiB) |"
    )
    say("|---|---:|---:|---:|---:|---:|---:|---:|")
    labels = [("a", f"(a) {n} in chunks of {c}"), ("b", f"(b) one chunk of {c} alone"), ("whole_n", f"{n} unchunked")]
    for key, label in labels:
        r = runs[key]
        say(
            f"| {label} | {r['n_train']} | {r['chunk_size'] or r['n_train']} | {r['chunks']} | {r['baseline_mib']:.1f} | "
            f"{r['peak_mib']:.1f} | {r['grad_increment_mib']:.1f} | {r['increment_mib']:.1f} |"
        )
    say("")
    ratio_chunked = runs["a"]["increment_mib"] / runs["b"]["increment_mib"]
    ratio_whole = runs["whole_n"]["increment_mib"] / runs["whole_c"]["increment_mib"]
    say("| ratio | increment ratio | target |")
    say("|---|---:|---|")
    say(f"| (a) {n} in chunks of {c} / (b) {c} alone | {ratio_chunked:.2f} | <= 2 |")
    say(f"| unchunked {n} / unchunked {c} (contrast) | {ratio_whole:.2f} | grows with the data |")
    say("")
    if not all(r["peak_reset"] for r in runs.values()):
        say("Note: the peak-RSS mark could not be reset in some subprocess; its increment is a lower bound.")
        say("")
    say(
        f"Chunked ({eq['chunks']} chunks of {c}) against unchunked, {n} images, float32, relative error "
        f"(norm of the difference / norm): loss {eq['loss']:.1e}, gradient {eq['grad']:.1e}, HVP {eq['hvp']:.1e} "
        f"({'all' if max(eq['loss'], eq['grad'], eq['hvp']) <= 1e-5 else 'NOT all'} <= 1e-5)."
    )
    publish(lines, title="Memory benchmark", script="bench_memory.py", filename="MEMORY.md" if args.write else None)


if __name__ == "__main__":
    main()
