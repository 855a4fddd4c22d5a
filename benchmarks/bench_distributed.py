"""Time per full-batch gradient, exact HVP and SAM step at N = 1 and 2 processes (gloo, one
thread per process), and the bytes each rank all-reduces per HVP.

    python benchmarks/bench_distributed.py [--n-train 2000] [--width 256] [--depth 4] [--repeats 10]

The model and data are the default MNIST task's (embedded digits, float32).  Each process
computes its own shard; the time of one call is the median over ``--repeats`` calls, taken on
rank 0 after a barrier, so it includes the all-reduce and waiting for the slower rank.
Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from samedge.core.distributed import ShardedObjective, all_reduce_bytes, shard_bounds
from samedge.core.method import Method
from samedge.core.objective import Objective
from samedge.core.params import unflatten
from samedge.data.mnist import load_mnist
from samedge.models import MLP


def _time(fn, repeats: int, world: int) -> float:
    times = []
    for _ in range(repeats + 1):
        if world > 1:
            dist.barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])  # the first call warms up


def _worker(rank: int, world: int, store: str, args, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from samedge.core.losses import get_loss

    split = load_mnist(None, n_train=args.n_train, n_test=10, seed=0, dtype=torch.float32)
    torch.manual_seed(0)
    model = MLP(tuple(split.x_train.shape[1:]), 10, width=args.width, depth=args.depth, activation="relu")
    lo, hi = shard_bounds(args.n_train, world, rank)
    objective: Objective = Objective.from_tensors(model, get_loss("mse"), split.x_train[lo:hi], split.y_train[lo:hi])
    if world > 1:
        objective = ShardedObjective(objective)
    params = objective.parameters()
    v = unflatten(torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1)), params)
    method = Method("sam", 0.1, 0.1)
    grad = objective.grad(params)
    result = {
        "grad": _time(lambda: objective.grad(params), args.repeats, world),
        "hvp": _time(lambda: objective.hvp(params, v), args.repeats, world),
        "sam": _time(
            lambda: method.update(params, method.direction(objective.grad, params, grad), None), args.repeats, world
        ),
        "bytes": all_reduce_bytes(params),
        "n_params": sum(p.numel() for p in params),
    }
    if rank == 0:
        torch.save(result, Path(out) / f"world{world}.pt")
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            mp.start_processes(
                _worker, args=(world, f"{tmp}/store{world}", args, tmp), nprocs=world, start_method="spawn"
            )
        r1, r2 = (torch.load(Path(tmp) / f"world{w}.pt") for w in (1, 2))
    print(
        f"MLP {args.depth}x{args.width} ({r1['n_params']:,} parameters), {args.n_train} MNIST digits, float32, "
        f"gloo, 1 thread per process; median of {args.repeats} calls"
    )
    print("\n| operation | N = 1 (ms) | N = 2 (ms) | N=2 / N=1 |\n|---|---|---|---|")
    for key, name in (("grad", "gradient"), ("hvp", "exact HVP"), ("sam", "SAM step (given g: one more gradient)")):
        print(f"| {name} | {1e3 * r1[key]:.1f} | {1e3 * r2[key]:.1f} | {r2[key] / r1[key]:.2f} |")
    print(
        f"\nbytes all-reduced per HVP (and per gradient), per rank: {r2['bytes']:,} "
        f"({r2['bytes'] / 2**20:.2f} MiB, the flattened float32 vector)"
    )


if __name__ == "__main__":
    main()
