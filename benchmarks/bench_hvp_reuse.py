"""HVP time / gradient time through the public ``Objective``, with and without graph reuse, on the
three default models (random inputs of the default shapes: the cost does not depend on the values).

Repeated ``Objective.hvp(p, v)`` at the same parameter tensors (as within one eigen-solve) reuses
the gradient graph; ``hvp_graph_budget=0`` rebuilds it every time (samedge before graph reuse).
Interleaved timing, median of N.  usage: python benchmarks/bench_hvp_reuse.py [N]
"""

import statistics
import sys
import time

import torch
from torch import nn

from samedge import Objective
from samedge.core.losses import get_loss
from samedge.models import MLP
from samedge.models.cnn import CNN
from samedge.models.transformer import Transformer


def problems():
    torch.manual_seed(0)
    mse = get_loss("mse")
    yield (
        "MNIST MLP (2,000 x 784, one chunk)",
        MLP((784,), 10),
        torch.randn(2000, 784),
        torch.randint(0, 10, (2000,)),
        mse,
        None,
    )
    x = torch.randn(1000, 3, 32, 32)
    yield "CIFAR-10 CNN (1,000 images, chunks of 500)", CNN(), x, torch.randint(0, 10, (1000,)), mse, 500
    seq, vocab = 64, 65
    model = Transformer(vocab, seq)
    tokens = torch.randint(0, vocab, (64, seq))
    xent = lambda out, t: nn.functional.cross_entropy(out.reshape(-1, vocab), t.reshape(-1))  # noqa: E731
    yield (
        "Shakespeare Transformer (64 x 64 tokens, one chunk)",
        model,
        tokens,
        torch.randint(0, vocab, (64, seq)),
        xent,
        None,
    )


def main(n: int) -> None:
    torch.set_num_threads(2)
    print("| model | gradient ms | HVP reused / gradient | HVP rebuilt / gradient | graph held MiB |")
    print("|---|---|---|---|---|")
    for name, model, x, y, loss, chunk in problems():
        reuse = Objective.from_tensors(model, loss, x, y, chunk)
        fresh = Objective.from_tensors(model, loss, x, y, chunk, hvp_graph_budget=0)
        p = reuse.parameters()
        v = tuple(torch.randn_like(t) for t in p)
        for _ in range(2):
            reuse.grad(p), reuse.hvp(p, v), fresh.hvp(p, v)
        tg, tr, tf = [], [], []
        for _ in range(n):
            for obj, acc in ((None, tg), (reuse, tr), (fresh, tf)):
                t0 = time.perf_counter()
                reuse.grad(p) if obj is None else obj.hvp(p, v)
                acc.append(time.perf_counter() - t0)
        g = statistics.median(tg)
        mib = reuse.hvp_graph_bytes / 2**20
        print(
            f"| {name} | {g * 1e3:.1f} | {statistics.median(tr) / g:.2f} | {statistics.median(tf) / g:.2f} | {mib:.0f} |"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 11)
